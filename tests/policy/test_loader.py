"""Loading policy YAML: errors name the real file, line, path and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from guard.policy.loader import (
    PolicyError,
    PolicyIssue,
    load_policy_dir,
    load_policy_file,
    load_policy_text,
)

GOOD = """\
name: good
description: fine
steps:
  - type: system_prompt
    content: Be kind.
"""


def issues(text: str) -> list[PolicyIssue]:
    with pytest.raises(PolicyError) as raised:
        load_policy_text(text, "p.yaml")
    return raised.value.issues


def only_issue(text: str) -> PolicyIssue:
    [issue] = issues(text)
    return issue


def test_a_good_policy_loads_with_a_content_version() -> None:
    loaded = load_policy_text(GOOD, "policies/good.yaml")
    assert loaded.policy.name == "good" and loaded.source == "policies/good.yaml"
    assert len(loaded.version) == 12 and int(loaded.version, 16) >= 0


def test_the_error_string_is_file_line_path_reason() -> None:
    text = """\
name: p
steps:
  - type: input_filter
    rules:
      - name: ok
        keywords: [a]
  - type: output_filter
    rules:
      - name: ok
        keywords: [a]
      - name: bad
        regex: ['(']
"""
    with pytest.raises(PolicyError) as raised:
        load_policy_text(text, "policies/safe.yaml")
    assert str(raised.value).startswith(
        "policies/safe.yaml:12: steps[1].rules[1].regex: invalid regular expression '(': missing )"
    )


@pytest.mark.parametrize(
    ("text", "line", "path", "reason"),
    [
        # Unknown keys point at the key, name it and suggest the closest allowed one.
        ("name: p\n\nstepz:\n  - type: chain_of_thought\n", 3, "stepz", "unknown key 'stepz' (did you mean 'steps'?"),
        (
            "name: p\nsteps:\n  - type: system_prompt\n    content: hi\n    mdoe: append\n",
            5,
            "steps[0].mdoe",
            "unknown key 'mdoe' (did you mean 'mode'? allowed: content, mode, name, type)",
        ),
        (
            "name: p\nsteps:\n  - type: best_of_n\n    reward:\n      type: embedding\n      modle: x\n",
            6,
            "steps[0].reward.modle",
            "unknown key 'modle' (did you mean 'model'?",
        ),
        # An unknown step type points at the `type:` line.
        (
            "name: p\nsteps:\n  - name: first\n    type: moderation\n",
            4,
            "steps[0].type",
            "unknown type 'moderation' (expected one of: 'system_prompt'",
        ),
        ("name: p\nsteps:\n  - content: hi\n", 3, "steps[0]", "missing 'type'"),
        ("name: p\nsteps:\n  - type: system_prompt\n    mode: append\n", 3, "steps[0].content", "missing required key 'content'"),
        ("name: p\nsampling:\n  max_tokens: 10\n  temperature: hot\n", 4, "sampling.temperature", "got 'hot'"),
        (
            "name: p\nsteps:\n  - type: input_filter\n    rules:\n      - name: empty\n",
            5,
            "steps[0].rules[0]",
            "rule 'empty' has neither keywords nor regex",
        ),
        ("name: p\nsteps:\n  - type: input_filter\n    rules: []\n", 3, "steps[0]", "at least one entry in rules, semantic, classifiers or guard_models"),
        ("description: x\nname: p\nname: q\n", 3, "name", "duplicate key 'name'"),
    ],
)
def test_errors_point_at_the_offending_line(text: str, line: int, path: str, reason: str) -> None:
    issue = only_issue(text)
    assert (issue.file, issue.line, issue.path) == ("p.yaml", line, path), issue
    assert reason in issue.reason, issue


def test_all_issues_are_reported_in_line_order() -> None:
    found = issues("name: p\nsampling:\n  top_p: 3\n  temperature: 9\nextra: 1\n")
    assert [(issue.line, issue.path) for issue in found] == [
        (3, "sampling.top_p"), (4, "sampling.temperature"), (5, "extra"),
    ]


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("name: p\nsteps:\n  - type: [system_prompt\n", 4, "invalid YAML"),
        ("name: p\n  description: bad indent\n", 2, "invalid YAML"),
        ("name: p\n---\nname: q\n", 2, "expected a single document"),
        ("", 1, "empty file"),
        ("# only a comment\n", 1, "empty file"),
        ("- name: p\n", 1, "the top level must be a mapping"),
        ("just words\n", 1, "not the value 'just words'"),
        ("name: !!python/name:os.system p\n", 1, "could not determine a constructor"),
    ],
)
def test_documents_that_are_not_a_policy_mapping(text: str, line: int, reason: str) -> None:
    issue = only_issue(text)
    assert issue.line == line and issue.path == "" and reason in issue.reason, issue


def test_a_file_must_be_named_after_its_policy(tmp_path: Path) -> None:
    path = tmp_path / "safe.yaml"
    path.write_text("description: x\nname: unsafe\n")
    with pytest.raises(PolicyError) as raised:
        load_policy_file(path)
    assert str(raised.value) == f"{path}:2: name: policy name 'unsafe' must match its file name (expected 'safe')"


def test_an_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(b"name: p\ndescription: \xff\n")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy_file(path)


def test_the_version_changes_iff_the_content_does(tmp_path: Path) -> None:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    first = load_policy_file(path)
    path.write_text(GOOD)
    assert load_policy_file(path).version == first.version
    path.write_text(GOOD + "# a comment is a change too\n")
    assert load_policy_file(path).version != first.version


def test_a_directory_loads_its_good_files_and_reports_the_broken_ones(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "other.yml").write_text("name: other\n")
    (tmp_path / "broken.yaml").write_text("name: broken\nsteps:\n  - type: nope\n")
    (tmp_path / "misnamed.yaml").write_text("name: something-else\n")
    (tmp_path / "notes.txt").write_text("not a policy")
    (tmp_path / ".good.yaml.swp").write_text("editor junk")

    result = load_policy_dir(tmp_path)

    assert sorted(result.policies) == ["good", "other"]
    assert result.policies["other"].source == str(tmp_path / "other.yml")
    assert sorted(result.errors) == [str(tmp_path / "broken.yaml"), str(tmp_path / "misnamed.yaml")]
    assert str(result.errors[str(tmp_path / "broken.yaml")]).startswith(f"{tmp_path / 'broken.yaml'}:3: steps[0].type:")


def test_one_name_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "twin.yaml").write_text("name: twin\n")
    (tmp_path / "twin.yml").write_text("name: twin\ndescription: second\n")

    result = load_policy_dir(tmp_path)

    assert result.policies["twin"].source == str(tmp_path / "twin.yaml")  # sorted order decides
    [error] = result.errors.values()
    assert str(error) == f"{tmp_path / 'twin.yml'}: name: policy 'twin' is already defined in {tmp_path / 'twin.yaml'}"
