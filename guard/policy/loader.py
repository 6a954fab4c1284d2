"""Reads policy YAML into validated `Policy` objects, with errors that point at a line.

The YAML is composed into a node tree first (nodes keep their line numbers),
then constructed into plain data for pydantic. A pydantic error's `loc` is
walked back down that tree, so every error names the file, the line, the
dotted path and the reason:

    policies/safe.yaml:12: steps[1].rules[0].regex: invalid regular expression '(': ...
"""

from __future__ import annotations

import difflib
import hashlib
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from guard.policy.model import Policy

POLICY_SUFFIXES = (".yaml", ".yml")
VERSION_LENGTH = 12

Loc = tuple[int | str, ...]
M = TypeVar("M", bound=BaseModel)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class PolicyIssue:
    file: str
    line: int | None  # 1-based; None when the problem is not in the text (unreadable file)
    path: str  # dotted path into the policy, e.g. "steps[1].rules[0].regex"; "" for the whole file
    reason: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class PolicyError(Exception):
    """A policy file that cannot be used; one issue per problem found."""

    def __init__(self, issues: list[PolicyIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class PolicyBuildError(Exception):
    """A valid policy whose steps cannot be built (a model or artefact that does not load, ...).

    `loc` points into the policy, e.g. ("steps", 2), so the error can name the line.
    """

    def __init__(self, loc: Loc, reason: str) -> None:
        super().__init__(reason)
        self.loc = loc
        self.reason = reason


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    version: str  # first hex digits of the sha256 of the file's bytes: changes iff the content does
    source: str


@dataclass
class LoadResult:
    policies: dict[str, LoadedPolicy] = field(default_factory=dict)  # by policy name
    errors: dict[str, PolicyError] = field(default_factory=dict)  # by file


def content_version(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:VERSION_LENGTH]


Builder = Callable[["LoadedPolicy"], object]


def load_policy_text(
    text: str, source: str, *, expect_name: str | None = None, build: Builder | None = None
) -> LoadedPolicy:
    """Validates one policy document. `expect_name`: the name the policy must have (its file stem).

    `build` (the server's pipeline builder) runs on the valid policy, so what cannot run is rejected
    at load time like any other error, and the last good version keeps serving.
    """
    node, data = _parse(text, source)
    issues = _duplicate_keys(node, source, ())
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        issues += [_issue_for(error, node, data, source) for error in exc.errors()]
        raise PolicyError(sorted(issues, key=lambda issue: issue.line or 0)) from None
    if issues:
        raise PolicyError(issues)
    if expect_name is not None and policy.name != expect_name:
        line = _locate(node, data, ("name",))[1]
        reason = f"policy name {policy.name!r} must match its file name (expected {expect_name!r})"
        raise PolicyError([PolicyIssue(source, line, "name", reason)])
    loaded = LoadedPolicy(policy, content_version(text.encode()), source)
    if build is not None:
        try:
            build(loaded)
        except PolicyBuildError as exc:
            line = _locate(node, data, exc.loc)[1]
            raise PolicyError([PolicyIssue(source, line, format_path(exc.loc), exc.reason)]) from None
    return loaded


def load_yaml_model(text: str, source: str, model: type[M]) -> M:
    """Validates a YAML document (another config file guard reads, such as the API key file) into
    `model`, with the same file:line: path: reason errors as policies (raised as PolicyError)."""
    node, data = _parse(text, source, what=f"{model.__name__} keys")
    issues = _duplicate_keys(node, source, ())
    try:
        value = model.model_validate(data)
    except ValidationError as exc:
        issues += [_issue_for(error, node, data, source, model) for error in exc.errors()]
        raise PolicyError(sorted(issues, key=lambda issue: issue.line or 0)) from None
    if issues:
        raise PolicyError(issues)
    return value


def load_policy_file(path: Path | str, *, build: Builder | None = None) -> LoadedPolicy:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyIssue(str(path), None, "", f"cannot read: {exc}")]) from None
    return load_policy_text(text, str(path), expect_name=path.stem, build=build)


def policy_files(directory: Path) -> list[Path]:
    """The policy files of a directory, sorted; dotfiles (editor swap and lock files) are skipped."""
    return sorted(
        path
        for path in directory.iterdir()
        if path.suffix in POLICY_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def load_policy_dir(directory: Path | str, *, build: Builder | None = None) -> LoadResult:
    """Loads every policy file; a broken file is reported and the others still load.

    Two files defining one name (`a.yaml` and `a.yml`): the first in sorted order wins.
    """
    result = LoadResult()
    for path in policy_files(Path(directory)):
        try:
            loaded = load_policy_file(path, build=build)
        except PolicyError as exc:
            result.errors[str(path)] = exc
            continue
        name = loaded.policy.name
        if name in result.policies:
            result.errors[str(path)] = duplicate_name_error(path, name, result.policies[name].source)
        else:
            result.policies[name] = loaded
    return result


def duplicate_name_error(path: Path, name: str, other: str) -> PolicyError:
    return PolicyError([PolicyIssue(str(path), None, "name", f"policy {name!r} is already defined in {other}")])


def _parse(text: str, source: str, what: str = "policy keys (name, steps, ...)") -> tuple[yaml.MappingNode, dict[Any, Any]]:
    """The document's node tree (for line numbers) and the plain data built from it."""
    try:
        # Inside the try: PyYAML's reader refuses some characters (C0 controls) as it is constructed.
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        line = len(_LINE_BREAK.findall(text, 0, exc.position)) + 1
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else repr(exc.character)
        reason = f"invalid YAML: character {char} is not allowed (write it as an escape in a double-quoted string)"
        raise PolicyError([PolicyIssue(source, line, "", reason)]) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        reason = "; ".join(part for part in (exc.context, exc.problem) if part)
        raise PolicyError([PolicyIssue(source, _mark_line(mark), "", f"invalid YAML: {reason}")]) from None
    except yaml.YAMLError as exc:  # e.g. a control character PyYAML refuses before parsing
        raise PolicyError([PolicyIssue(source, None, "", f"invalid YAML: {exc}")]) from None
    except RecursionError:  # PyYAML composes recursively: a few hundred nested [ or { exhaust the stack
        raise PolicyError([PolicyIssue(source, None, "", "invalid YAML: nested too deeply")]) from None
    finally:
        loader.dispose()
    if node is None:
        raise PolicyError([PolicyIssue(source, 1, "", f"empty file: expected a mapping of {what}")])
    if not isinstance(node, yaml.MappingNode):
        kind = "a list" if isinstance(node, yaml.SequenceNode) else f"the value {node.value!r}"
        reason = f"the top level must be a mapping of {what}, not {kind}"
        raise PolicyError([PolicyIssue(source, _line(node), "", reason)])
    return node, data


def _duplicate_keys(node: yaml.Node, source: str, loc: Loc) -> list[PolicyIssue]:
    """YAML lets a later key silently replace an earlier one; in a policy that hides mistakes."""
    issues: list[PolicyIssue] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue
            if key.value in seen:
                reason = f"duplicate key {key.value!r} (only the last would take effect)"
                issues.append(PolicyIssue(source, _line(key), format_path(loc + (key.value,)), reason))
            seen.add(key.value)
            issues += _duplicate_keys(value, source, loc + (key.value,))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            issues += _duplicate_keys(item, source, loc + (index,))
    return issues


def _issue_for(error: Any, root: yaml.Node, data: Any, source: str, model: type[BaseModel] = Policy) -> PolicyIssue:
    loc: Loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "union_tag_invalid":
        loc += ("type",)  # point at the bad `type:` rather than the whole step
    path, line = _locate(root, data, loc)
    reason = error["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        reason = _unknown_key_reason(loc, model)
    elif kind == "union_tag_invalid":
        reason = f"unknown type {error['ctx']['tag']!r} (expected one of: {error['ctx']['expected_tags']})"
    elif kind == "union_tag_not_found":
        reason = "missing 'type': every step (and reward) says which kind it is"
    elif kind == "missing":
        reason = f"missing required key {loc[-1]!r}"
    elif isinstance(error.get("input"), (str, int, float, bool)):
        reason += f" (got {error['input']!r})"
    return PolicyIssue(source, line, path, reason)


def _locate(root: yaml.Node, data: Any, loc: Loc) -> tuple[str, int]:
    """Follows `loc` through the data and the node tree together: (dotted path, line).

    pydantic puts a discriminated union's tag into `loc` ("steps", 0, "input_filter", ...);
    tags match nothing in the data and are left out of the path. A key that is not
    there at all (a missing field) still goes into the path, at its parent's line.
    """
    node, path = root, []
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data, node = data[part], node.value[part]
        elif isinstance(data, dict) and part in data:
            # The last of duplicated keys is the one in the data. (PyYAML copies `<<: *anchor`
            # keys into this node, so a key is always found; the default only keeps a
            # surprise in error reporting from hiding the error itself.)
            pair = next(((k, v) for k, v in reversed(node.value) if _key_of(k) == part), None)
            data = data[part]
            if pair is not None:
                key, node = pair
                if last:  # a block collection's errors point at its key, not its first item
                    node = key if node.start_mark.line != key.start_mark.line else node
        elif isinstance(data, dict) and data.get("type") == part:
            continue
        elif isinstance(data, dict) and last:
            path.append(part)
            break
        else:
            continue  # a union member's label, e.g. "function-after[...]"
        path.append(part)
    return format_path(tuple(path)), _line(node)


def _key_of(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node) if isinstance(node, yaml.ScalarNode) else None


def _line(node: yaml.Node) -> int:
    return _mark_line(node.start_mark)


def _mark_line(mark) -> int | None:
    """1-based line as editors count it (\n, \r\n or \r): PyYAML also breaks lines at U+0085, U+2028, U+2029."""
    if mark is None:
        return None
    if mark.buffer is not None:
        return len(_LINE_BREAK.findall(mark.buffer, 0, mark.index)) + 1
    return mark.line + 1


def format_path(loc: Loc) -> str:
    """("steps", 1, "rules", 0, "regex") -> "steps[1].rules[0].regex"."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _unknown_key_reason(loc: Loc, root: type[BaseModel]) -> str:
    key = loc[-1]
    model = _model_at(loc[:-1], root)
    if model is None:
        return f"unknown key {key!r}"
    allowed = sorted(model.model_fields)
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r} ({hint}allowed: {', '.join(allowed)})"


def _model_at(loc: Loc, root: type[BaseModel]) -> type[BaseModel] | None:
    """The model class validating the mapping at `loc`, to list its keys; None if ambiguous."""
    candidates: list[Any] = [root]
    for part in loc:
        following: list[Any] = []
        for annotation in candidates:
            for member in _members(annotation):
                if isinstance(part, int) and get_origin(member) is list:
                    following.append(get_args(member)[0])
                elif _is_model(member) and part in member.model_fields:
                    following.append(member.model_fields[part].annotation)
                elif _is_model(member) and _tag(member) == part:
                    following.append(member)
        candidates = following
    models = [member for annotation in candidates for member in _members(annotation) if _is_model(member)]
    return models[0] if len(models) == 1 else None


def _members(annotation: Any) -> list[Any]:
    """Unwraps Annotated[...] and unions (X | None included) into their member types."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _tag(model: type[BaseModel]) -> str | None:
    field_info = model.model_fields.get("type")
    args = get_args(field_info.annotation) if field_info else ()
    return args[0] if len(args) == 1 else None
