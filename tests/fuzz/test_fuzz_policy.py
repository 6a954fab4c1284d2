"""Property-based tests of the policy and API key file loaders.

Whatever YAML an operator writes (documents built from the policy's real keys with random values
and layouts, or the shipped policies with characters and lines deleted, inserted, duplicated,
moved), loading it either succeeds or raises PolicyError, every issue of which names the file, a
line of the document and a reason; any other exception is a bug. The API key file's loader,
which shares the machinery, is held to the same property.
"""

from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, event, given
from hypothesis import strategies as st

from guard.access.keys import KeyFile, hash_key
from guard.policy.loader import LoadedPolicy, PolicyError, load_policy_text, load_yaml_model
from tests.fuzz.conftest import examples

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {path.name: path.read_text() for path in sorted((ROOT / "policies").glob("*.yaml"))}
KEY_FILE = f"""\
# tenants and the hashes of their keys
tenants:
  - name: acme
    policies: [safe-assistant, cot]
    default_policy: safe-assistant
    trace: false
    refusal_details: true
    rate_limit: {{requests_per_second: 5, burst: 10, tokens_per_minute: 20000}}
  - name: ops
    policies: ["*"]
    default_policy: default
keys:
  - {{name: acme-ci, tenant: acme, sha256: {hash_key("gk_one")}}}
  - name: ops-admin
    tenant: ops
    sha256: {hash_key("gk_two")}
"""


def line_count(text: str) -> int:
    """Lines as editors count them (\\n, \\r\\n or \\r ends one); a final line break opens one more
    line, where an error at the end of the document is reported."""
    return len(re.split(r"\r\n|\r|\n", text))


def lines_of(text: str) -> list[str]:
    return re.split(r"\r\n|\r|\n", text)


def load(text: str, source: str, loader) -> tuple[Any, PolicyError | None]:
    """(what loaded, None), or (None, the PolicyError, its issues checked). Any other exception fails."""
    try:
        loaded = loader(text)
    except PolicyError as error:
        check_issues(error, text, source)
        return None, error
    event("loaded")
    return loaded, None


def check_issues(error: PolicyError, text: str, source: str) -> None:
    assert error.issues, "a PolicyError without issues"
    count = line_count(text)
    for issue in error.issues:
        assert issue.file == source, issue
        assert isinstance(issue.line, int) and 1 <= issue.line <= count, f"line {issue.line} of a {count}-line document: {issue}"
        assert isinstance(issue.reason, str) and issue.reason.strip(), issue
        assert isinstance(issue.path, str), issue
        assert str(issue).startswith(f"{source}:{issue.line}: "), str(issue)
        event(f"issue: {issue.reason.split(' ')[0]}")


def load_policy(text: str) -> LoadedPolicy:
    return load_policy_text(text, "fuzz.yaml", expect_name=None)


def load_keys(text: str) -> KeyFile:
    return load_yaml_model(text, "keys.yaml", KeyFile)


# A small YAML writer: random block and flow layouts, quoting styles and duplicate keys, which
# yaml.safe_dump would never produce. Mappings are lists of (key, value) pairs.

RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def scalar(value: Any, style: int) -> str:
    if value is None:
        return ["null", "~", "Null"][style % 3]
    if isinstance(value, bool):
        return ["true", "false"][not value] if style % 2 else ["True", "No"][not value]
    if isinstance(value, int):
        return str(value) if style % 3 else hex(value) if value >= 0 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ ./-]*", text) and text.lower() not in RESERVED and not text.endswith(" ")
    if plain and style % 3:
        return text
    if style % 3 == 1 and not re.search(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", text):
        return "'" + text.replace("'", "''") + "'"
    return json.dumps(text, ensure_ascii=False)  # JSON strings are YAML double-quoted scalars


class Pairs(list):
    """A mapping as written: (key, value) pairs, keys possibly repeated."""


def flow(value: Any, style: int) -> str:
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{scalar(k, style)}: {flow(v, style)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(flow(v, style) for v in value) + "]"
    return scalar(value, style)


def block(value: Any, indent: int, width: int, styles: list[int]) -> list[str]:
    """Lines of `value` as a block collection at `indent`, children in block or flow style by turns."""
    pad = " " * indent
    style = styles[indent % len(styles)]
    lines: list[str] = []
    for key, item in (value if isinstance(value, Pairs) else [(None, v) for v in value]):
        head = f"{pad}{scalar(key, style)}:" if isinstance(value, Pairs) else f"{pad}-"
        if isinstance(item, (list, Pairs)) and item and style % 2 == 0:
            lines.append(head)
            lines += block(item, indent + width, width, styles)
        else:
            lines.append(f"{head} {flow(item, style)}")
    return lines


@st.composite
def documents(draw, content: st.SearchStrategy) -> str:
    value = draw(content)
    if not isinstance(value, Pairs) or draw(st.integers(0, 9)) == 0:
        return flow(value, draw(st.integers(0, 5)))
    styles = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    lines = block(value, 0, draw(st.sampled_from([2, 4])), styles)
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["# a comment", "", "   ", "---"][: 3 if lines else 4])))
    newline = draw(st.sampled_from(["\n", "\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from([newline, ""]))


# Values. In a "tame" example (half of them) every value is one the key accepts, so a document
# often loads or has a single fault deep inside; otherwise a value is out of range or anything
# at all now and then.

TAME = st.shared(st.booleans(), key="tame")
printable = st.characters(exclude_categories=("Cs",))
any_text = st.one_of(
    st.text(printable, max_size=12),
    st.sampled_from(["", " ", "é", "{marker}", "{prompt} {response}", "a: b", "- x", "#", "x\ny", "\t", "\x85", "\u2028"]),
)
wild_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, -1, 1, 2, 16, 17, 64, 65, 32768, 32769, 0.0, 1e-300, 2.0000001, math.nan, math.inf, -math.inf]),
    st.floats(),
    any_text,
)
wild = st.recursive(
    wild_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.lists(st.tuples(any_text, children), max_size=3).map(Pairs)),
    max_leaves=6,
)


def value(valid: st.SearchStrategy, invalid: st.SearchStrategy | None = None) -> st.SearchStrategy:
    """`valid` in a tame example; otherwise mostly `valid`, sometimes `invalid` or anything."""
    untamed = st.one_of(valid, valid, valid, *([invalid] if invalid is not None else []), wild)
    return TAME.flatmap(lambda tame: valid if tame else untamed)


def ints(low: int, high: int) -> st.SearchStrategy:
    return value(st.integers(low, high), st.sampled_from([low - 1, high + 1, -(2**63), 2**64]))


def floats(low: float, high: float, exclude_min: bool = False) -> st.SearchStrategy:
    return value(st.floats(low, high, exclude_min=exclude_min), st.sampled_from([low - 0.001, high + 0.001, math.nan, math.inf]))


def choice(*allowed: str) -> st.SearchStrategy:
    return value(st.sampled_from(allowed), st.sampled_from(["", allowed[0].upper(), allowed[0] + "x"]))


def identifiers(first: str, rest: str, longest: int = 10) -> st.SearchStrategy:
    """Words like NAME_PATTERN's (st.from_regex is slow to draw from)."""
    return st.builds(str.__add__, st.sampled_from(first), st.text(rest, max_size=longest))


LOWER = string.ascii_lowercase
names = value(identifiers(LOWER + string.digits, LOWER + string.digits + "._-"), st.one_of(st.text(max_size=8), st.just("x" * 65)))
texts = value(st.text(printable, min_size=1, max_size=12), any_text)
strings = value(st.lists(st.text(printable, min_size=1, max_size=8), max_size=3), st.lists(any_text, max_size=3))
regexes = value(
    st.sampled_from([r"\bbomb\w*", r"(?i)x", r"\p{L}+", r"(?P<x>a)(?P=x)", r"a|b", r"[0-9]{3}"]),
    st.one_of(
        st.sampled_from([r"(", r"a{2,1}", r"[z-a]", r"a**", "\\", r"(?<=a+)b"]),
        st.text("ab()[]{}*+?|\\^$.,-:0123456789pP", max_size=8),
    ),
)
booleans = value(st.booleans())


def mapping(fields: dict[str, st.SearchStrategy], required: tuple[str, ...] = ()) -> st.SearchStrategy:
    """Pairs of some of `fields` (the required ones, unless untamed), now and then an unknown or repeated key."""

    @st.composite
    def build(draw) -> Pairs:
        tame = draw(TAME)
        chosen = [name for name in required if tame or draw(st.integers(0, 9))]
        chosen += draw(st.lists(st.sampled_from(sorted(fields)), max_size=min(5, len(fields))))
        chosen = list(dict.fromkeys(chosen))
        if not tame and draw(st.integers(0, 4)) == 0:
            # An unknown key, or a known one again (a duplicate key).
            chosen.append(draw(st.one_of(identifiers(LOWER + "_", LOWER + "_"), st.sampled_from(sorted(fields)))))
        return Pairs((name, draw(fields[name]) if name in fields else draw(wild)) for name in chosen)

    return value(build())


def lists_of(item: st.SearchStrategy, max_size: int = 3) -> st.SearchStrategy:
    return value(st.lists(item, max_size=max_size))


pattern_rule = mapping({"name": names, "keywords": strings, "regex": lists_of(regexes, 2)}, required=("name", "keywords"))
reward = mapping(
    {
        "type": choice("embedding", "remote", "sequence_classifier", "lm_judge", "weighted"),
        "url": value(st.just("http://127.0.0.1:9"), st.just("ftp://x")),
        "model": texts,
        "path": texts,
        "mode": choice("mean_logprob", "verdict"),
        "judge_prompt": texts,
        "sources": lists_of(mapping({"weight": floats(-2, 2), "source": st.just(Pairs([("type", "embedding")]))})),
    },
    required=("type",),
)
STEP_FIELDS: dict[str, dict[str, st.SearchStrategy]] = {
    "system_prompt": {"content": texts, "mode": choice("prepend", "replace", "append")},
    "chain_of_thought": {"instruction": texts, "marker": texts, "on_missing_marker": choice("return_all", "refuse")},
    "input_filter": {
        "rules": lists_of(pattern_rule),
        "refusal": texts,
        "on_error": choice("refuse", "allow"),
        "max_chars": ints(1, 2**40),
        "pattern_budget_seconds": floats(0, 60, exclude_min=True),
        "roles": lists_of(choice("system", "user", "assistant")),
        "guard_models": lists_of(
            mapping(
                {"name": names, "family": choice("llama_guard_3", "shieldgemma", "yes_no"), "threshold": floats(0, 1)},
                required=("name", "family"),
            )
        ),
        "semantic": lists_of(mapping({"name": names, "harmful": strings, "threshold": floats(-1, 1)}, ("name", "harmful")), 1),
    },
    "output_filter": {
        "rules": lists_of(pattern_rule),
        "stream_holdback_chars": ints(0, 500),
        "stream_check_every_chars": ints(1, 100),
        "on_error": choice("refuse", "allow"),
    },
    "best_of_n": {
        "n": ints(1, 64),
        "temperature": floats(0, 2),
        "top_p": floats(0, 1, exclude_min=True),
        "reward": reward,
        "selection": choice("argmax", "softmax"),
        "tau": floats(0, 10, exclude_min=True),
        "normalize": choice("none", "zscore"),
        "refused": choice("drop", "penalize"),
        "on_error": choice("fail", "first"),
        "speculative_rejection": mapping(
            {"chunk_tokens": ints(1, 4096), "keep_fraction": floats(0, 0.99, exclude_min=True), "min_candidates": ints(1, 9)}
        ),
    },
}
STEP_REQUIRED = {"system_prompt": ("content",), "input_filter": ("rules",), "output_filter": ("rules",), "best_of_n": ("reward",)}


@st.composite
def steps(draw) -> Pairs:
    kind = draw(choice(*sorted(STEP_FIELDS)))
    known = kind if isinstance(kind, str) else ""
    fields = {"type": st.just(kind), "name": names, **STEP_FIELDS.get(known, {})}
    return draw(mapping(fields, required=("type", *STEP_REQUIRED.get(known, ()))))


policies = mapping(
    {
        "name": names,
        "description": texts,
        "model": texts,
        "refusal": texts,
        "sampling": mapping(
            {
                "max_tokens": ints(1, 32768),
                "temperature": floats(0, 2),
                "top_p": floats(0, 1, exclude_min=True),
                "seed": ints(-(2**63), 2**63),
                "stop": strings,
            }
        ),
        "limits": mapping({"max_tokens": ints(1, 32768), "max_temperature": floats(0, 2), "pin_stop": booleans, "max_n": ints(1, 16)}),
        "steps": lists_of(steps(), 4),
    },
    required=("name",),
)

sha256s = st.binary(min_size=32, max_size=32).map(bytes.hex)


@st.composite
def coherent_key_files(draw) -> Pairs:
    """A key file whose parts agree (default policies listed, keys of known tenants, hashes unique)."""
    tenants = draw(st.lists(identifiers(LOWER, LOWER + string.digits + "-", 8), min_size=1, max_size=3, unique=True))
    entries = []
    for tenant in tenants:
        allowed = draw(st.one_of(st.just(["*"]), st.lists(identifiers(LOWER, LOWER + "-", 8), min_size=1, max_size=3)))
        entry = Pairs([("name", tenant), ("policies", allowed)])
        if allowed == ["*"] or draw(st.booleans()):
            entry.append(("default_policy", draw(names if allowed == ["*"] else st.sampled_from(allowed))))
        entry += [(key, draw(fields)) for key, fields in (("trace", booleans), ("refusal_details", booleans)) if draw(st.booleans())]
        entries.append(entry)
    hashes = draw(st.lists(sha256s, max_size=3, unique=True))
    keys = [Pairs([("name", draw(names)), ("tenant", draw(st.sampled_from(tenants))), ("sha256", digest)]) for digest in hashes]
    return Pairs([("tenants", entries), ("keys", keys)])


untamed_key_files = mapping(
    {
        "tenants": lists_of(
            mapping(
                {
                    "name": names,
                    "policies": value(st.one_of(strings, st.just(["*"]))),
                    "default_policy": names,
                    "trace": booleans,
                    "refusal_details": booleans,
                    "rate_limit": mapping(
                        {
                            "requests_per_second": floats(0, 100, exclude_min=True),
                            "burst": ints(1, 100),
                            "tokens_per_minute": ints(1, 10**6),
                        }
                    ),
                },
                required=("name", "policies"),
            )
        ),
        "keys": lists_of(
            mapping(
                {
                    "name": names,
                    "tenant": names,
                    "sha256": value(sha256s, st.one_of(sha256s.map(str.upper), sha256s.map(lambda h: h[1:]), st.text("0123456789abcdef"))),
                },
                required=("name", "tenant", "sha256"),
            )
        ),
    },
    required=("tenants",),
)


key_files = TAME.flatmap(lambda tame: coherent_key_files() if tame else untamed_key_files)


# Mutations of real files: characters and lines deleted, inserted, duplicated, moved, re-indented.

YAML_CHARS = list(":-[]{}#&*!|>'\"%@`,?\\ \t\n") + ["\r\n", "\r", "  ", "- ", ": ", "<<: ", "&a ", "*a", "!!str ", "---\n", "..."]
insertions = st.one_of(
    st.sampled_from(YAML_CHARS),
    st.sampled_from(list(string.ascii_letters + string.digits)),
    st.characters(),  # any code point but surrogates, control characters included
)


@st.composite
def mutated(draw, text: str) -> str:
    for _ in range(draw(st.integers(1, 4))):
        lines = text.split("\n")
        kind = draw(st.sampled_from(["delete", "insert", "insert", "duplicate", "drop line", "copy line", "move line", "indent"]))
        at = draw(st.integers(0, max(0, len(text) - 1)))
        row = draw(st.integers(0, max(0, len(lines) - 1)))
        if kind == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 3)) :]
        elif kind == "insert":
            text = text[:at] + draw(insertions) + text[at:]
        elif kind == "duplicate":
            text = text[:at] + text[at : at + draw(st.integers(1, 8))] + text[at:]
        elif kind == "drop line":
            text = "\n".join(lines[:row] + lines[row + 1 :])
        elif kind == "copy line":
            text = "\n".join(lines[: row + 1] + [lines[draw(st.integers(0, len(lines) - 1))]] + lines[row + 1 :])
        elif kind == "move line":
            moved = lines.pop(row)
            lines.insert(draw(st.integers(0, len(lines))), moved)
            text = "\n".join(lines)
        else:
            shift = draw(st.sampled_from([-2, -1, 1, 2, 4]))
            line = lines[row]
            lines[row] = " " * shift + line if shift > 0 else line[min(-shift, len(line) - len(line.lstrip(" "))) :]
            text = "\n".join(lines)
    return text


# The properties


@examples(300)
@given(text=documents(policies))
def test_generated_policies_load_or_name_file_line_and_reason(text: str) -> None:
    loaded, error = load(text, "fuzz.yaml", load_policy)
    if loaded is not None:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", loaded.policy.name) and len(loaded.version) == 12, loaded
        return
    # An unknown key is reported on its own line.
    for issue in error.issues:
        key = issue.path.rsplit(".", 1)[-1]
        if issue.reason.startswith("unknown key") and re.fullmatch(r"[a-z_]+", key):
            line = lines_of(text)[issue.line - 1]
            assert key in line, f"{issue}, but line {issue.line} is {line!r}"


@examples(300)
@given(data=st.data(), file=st.sampled_from(sorted(SHIPPED)))
def test_mutated_shipped_policies_load_or_name_file_line_and_reason(data, file: str) -> None:
    text = data.draw(mutated(SHIPPED[file]), label="text")
    load(text, "fuzz.yaml", load_policy)


@examples(150)
@given(text=documents(key_files))
def test_generated_key_files_load_or_name_file_line_and_reason(text: str) -> None:
    load(text, "keys.yaml", load_keys)


@examples(150)
@given(data=st.data())
def test_mutated_key_files_load_or_name_file_line_and_reason(data) -> None:
    load(data.draw(mutated(KEY_FILE), label="text"), "keys.yaml", load_keys)


def test_the_unmutated_inputs_load() -> None:
    for file, text in SHIPPED.items():
        assert load_policy(text).policy.name == Path(file).stem
    assert [tenant.name for tenant in load_keys(KEY_FILE).tenants] == ["acme", "ops"]


# The bugs these properties found, one minimal example each.


@pytest.mark.parametrize("loader", [load_policy, load_keys], ids=["policy", "key file"])
def test_a_control_character_is_a_policy_error(loader) -> None:
    with pytest.raises(PolicyError) as raised:
        loader("name: a\x01\n")
    assert [issue.line for issue in raised.value.issues] == [1]


def test_a_line_separator_in_a_string_does_not_shift_line_numbers() -> None:
    with pytest.raises(PolicyError) as raised:
        load_policy('name: a\ndescription: "x\u2028y"\nfoo: 1\n')
    assert [(issue.line, issue.path) for issue in raised.value.issues] == [(3, "foo")]


@pytest.mark.parametrize("loader", [load_policy, load_keys], ids=["policy", "key file"])
def test_deep_nesting_is_a_policy_error(loader) -> None:
    with pytest.raises(PolicyError):
        loader("name: a\ndescription: " + "[" * 1000 + "]" * 1000 + "\n")
