"""Reward reached vs compute spent: best_of_n with speculative_rejection vs plain best_of_n.

    python benchmarks/speculative_rejection.py                    # bundled Gemma 3 270M, embedding reward
    python benchmarks/speculative_rejection.py --n 8 16 32 --max-tokens 64 256 --prompts 4
    python benchmarks/speculative_rejection.py --smoke            # n 4, 16/32 tokens, one prompt

One vLLM, one `guard serve` with, per (n, max_tokens), two policies that differ only in early pruning:
  plain    best_of_n n=N: every candidate runs to max_tokens (or its end) in one upstream call
  pruned   the same plus speculative_rejection {chunk_tokens, keep_fraction}: each round re-sends
           prompt + partial answer of every surviving candidate as a new upstream call
Each prompt goes to both policies in shuffled order. Per request, compute is counted three ways:
  usage      what guard reports to its client (for pruned: every upstream call's prompt and completion)
  engine     vLLM's own Prometheus counters read before and after the request: prompt tokens it was
             asked to prefill (vLLM fans n out into n requests, each prefilling the prompt), prefix-cache
             hits among them, generation tokens
  compute    prefill actually computed (engine prompt tokens - prefix-cache hits) + generation tokens
Reward is the chosen candidate's (from the trace). Printed per (n, max_tokens): means per policy and
pruned ÷ plain for reward, compute and median latency. Writes the JSON (rows: one per policy and
configuration; requests: every request) and a PNG of reward vs compute per n next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import start_guard, stop_processes, upstream_model  # noqa: E402
from guard.client import GuardClient  # noqa: E402
from guard.upstream.launcher import ManagedVLLM  # noqa: E402

QUESTIONS = [
    "Why is the sky blue?",
    "What do plants need to grow?",
    "How does a bicycle stay upright?",
    "Why do we have seasons on Earth?",
    "What is the difference between weather and climate?",
    "How do bees make honey?",
    "Why does ice float on water?",
    "What causes thunder?",
]
# vLLM counters (summed over their label sets): engine-side prefill, prefix-cache hits, decode.
COUNTERS = {
    "engine_prompt_tokens": "vllm:prompt_tokens_total",
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "generation_tokens": "vllm:generation_tokens_total",
}
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")
# Per-request figures averaged per policy and configuration.
MEANS = (
    "reward", "usage_prompt_tokens", "usage_completion_tokens", "engine_prompt_tokens", "prefix_cache_hits",
    "computed_prompt_tokens", "generation_tokens", "compute_tokens", "sent_tokens", "upstream_calls",
)


def policy(name: str, n: int, max_tokens: int, pruning: str) -> str:
    return (
        f"name: {name}\n"
        f"sampling: {{max_tokens: {max_tokens}}}\n"
        "steps:\n"
        "  - type: best_of_n\n"
        f"    n: {n}\n"
        "    temperature: 0.9\n"
        "    reward: {type: embedding}\n"
        f"{pruning}"
    )


def counters(url: str) -> dict[str, float]:
    totals = dict.fromkeys(COUNTERS, 0.0)
    names = {metric: key for key, metric in COUNTERS.items()}
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            match = SAMPLE.match(line)
            if match and match[1] in names:
                totals[names[match[1]]] += float(match[2])
    return totals


def engine_delta(url: str, before: dict[str, float], generated: int) -> dict[str, float]:
    """Counter deltas since `before`, once vLLM has counted all `generated` tokens (its stats lag the response)."""
    deadline = time.monotonic() + 10
    while True:
        after = counters(url)
        delta = {key: after[key] - before[key] for key in COUNTERS}
        if delta["generation_tokens"] >= generated or time.monotonic() > deadline:
            return delta
        time.sleep(0.05)


def detail(trace: dict, phase: str) -> dict:
    [step] = [s for s in trace["steps"] if s["type"] == "best_of_n" and s["phase"] == phase]
    return step["detail"]


def summarize(requests: list[dict], configs: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for n, max_tokens in configs:
        by_policy = {}
        for arm in ("plain", "pruned"):
            mine = [r for r in requests if r["n"] == n and r["max_tokens"] == max_tokens and r["policy"] == arm]
            row = {"n": n, "max_tokens": max_tokens, "policy": arm, "requests": len(mine)}
            row.update({f"mean_{key}": statistics.mean(r[key] for r in mine) for key in MEANS})
            row["median_seconds"] = statistics.median(r["seconds"] for r in mine)
            by_policy[arm] = row
        plain, pruned = by_policy["plain"], by_policy["pruned"]
        paired = {(r["question"], r["seed"]): r["reward"] for r in requests
                  if r["n"] == n and r["max_tokens"] == max_tokens and r["policy"] == "plain"}
        differences = [r["reward"] - paired[(r["question"], r["seed"])] for r in requests
                       if r["n"] == n and r["max_tokens"] == max_tokens and r["policy"] == "pruned"]
        pruned.update({
            "reward_ratio": pruned["mean_reward"] / plain["mean_reward"],
            "reward_paired_difference": statistics.mean(differences),
            "reward_paired_difference_se": statistics.stdev(differences) / len(differences) ** 0.5
            if len(differences) > 1 else None,
            "compute_ratio": pruned["mean_compute_tokens"] / plain["mean_compute_tokens"],
            "sent_ratio": pruned["mean_sent_tokens"] / plain["mean_sent_tokens"],
            "computed_prefill_ratio": pruned["mean_computed_prompt_tokens"] / plain["mean_computed_prompt_tokens"],
            "decode_ratio": pruned["mean_generation_tokens"] / plain["mean_generation_tokens"],
            "usage_ratio": (pruned["mean_usage_prompt_tokens"] + pruned["mean_usage_completion_tokens"])
            / (plain["mean_usage_prompt_tokens"] + plain["mean_usage_completion_tokens"]),
            "latency_ratio": pruned["median_seconds"] / plain["median_seconds"],
        })
        rows += [plain, pruned]
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = [
        f"{'n':>3} {'max':>4} {'policy':7} {'reward':>7} {'usage p+c':>11} {'engine prompt':>13} {'cache hit':>9} "
        f"{'prefill':>8} {'decode':>7} {'compute':>8} {'calls':>6} {'median s':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['n']:3d} {r['max_tokens']:4d} {r['policy']:7} {r['mean_reward']:7.4f} "
            f"{r['mean_usage_prompt_tokens']:5.0f}+{r['mean_usage_completion_tokens']:<5.0f} "
            f"{r['mean_engine_prompt_tokens']:13.0f} {r['mean_prefix_cache_hits']:9.0f} "
            f"{r['mean_computed_prompt_tokens']:8.0f} {r['mean_generation_tokens']:7.0f} "
            f"{r['mean_compute_tokens']:8.0f} "
            f"{r['mean_upstream_calls']:6.1f} {r['median_seconds']:8.2f}"
        )
    lines += ["", "pruned ÷ plain (compute = prefill computed after prefix-cache hits + decode; "
                  "sent = engine prompt + decode):"]
    lines.append(f"{'n':>3} {'max':>4} {'reward':>7} {'Δreward ± se':>16} {'compute':>8} {'sent':>6} "
                 f"{'prefill':>8} {'decode':>7} {'usage':>6} {'latency':>8}")
    for r in rows:
        if r["policy"] == "pruned":
            se = r["reward_paired_difference_se"]
            lines.append(
                f"{r['n']:3d} {r['max_tokens']:4d} {r['reward_ratio']:7.3f} "
                f"{r['reward_paired_difference']:+8.4f} ± {'-' if se is None else f'{se:.4f}':>6} "
                f"{r['compute_ratio']:8.3f} {r['sent_ratio']:6.3f} {r['computed_prefill_ratio']:8.2f} "
                f"{r['decode_ratio']:7.3f} {r['usage_ratio']:6.3f} {r['latency_ratio']:8.3f}"
            )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in rows})
    lengths = sorted({r["max_tokens"] for r in rows})
    colours = dict(zip(lengths, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, axes = plt.subplots(1, len(ns), figsize=(4.2 * len(ns), 3.6), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        for length in lengths:
            pair = {r["policy"]: r for r in rows if r["n"] == n and r["max_tokens"] == length}
            xs = [pair[p]["mean_compute_tokens"] for p in ("plain", "pruned")]
            ys = [pair[p]["mean_reward"] for p in ("plain", "pruned")]
            ax.plot(xs, ys, color=colours[length], linewidth=0.8)
            ax.scatter(xs[:1], ys[:1], color=colours[length], marker="o", label=f"plain, {length} tokens")
            ax.scatter(xs[1:], ys[1:], color=colours[length], marker="^", label=f"pruned, {length} tokens")
        ax.set_title(f"best_of_n n={n}")
        ax.set_xlabel("tokens computed per request\n(prefill after prefix-cache hits + decode)", fontsize=8)
        ax.set_ylabel("mean reward of the chosen answer", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="model for vLLM (default: the bundled Gemma 3 270M)")
    parser.add_argument("--max-model-len", type=int, default=1024, help="vLLM context length (at most the model's)")
    parser.add_argument("--n", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--keep-fraction", type=float, default=0.5)
    parser.add_argument("--prompts", type=int, default=4, help=f"questions used (at most {len(QUESTIONS)})")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per question")
    parser.add_argument("--smoke", action="store_true", help="n 4, max_tokens 16 and 32, chunk 8, one prompt")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculative_rejection.json")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.max_tokens, args.chunk_tokens, args.prompts, args.seeds = [4], [16, 32], 8, 1, 1

    model_dir, served, dtype = upstream_model(args.model_dir)
    configs = [(n, max_tokens) for max_tokens in args.max_tokens for n in args.n]
    pruning = f"    speculative_rejection: {{chunk_tokens: {args.chunk_tokens}, keep_fraction: {args.keep_fraction}}}\n"
    workdir = Path(tempfile.mkdtemp(prefix="guard-sr-"))
    policy_dir = workdir / "policies"
    policy_dir.mkdir()
    (policy_dir / "default.yaml").write_text("name: default\n")  # guard is not SERVING without its default policy
    for n, max_tokens in configs:
        (policy_dir / f"plain-{n}-{max_tokens}.yaml").write_text(policy(f"plain-{n}-{max_tokens}", n, max_tokens, ""))
        (policy_dir / f"pruned-{n}-{max_tokens}.yaml").write_text(
            policy(f"pruned-{n}-{max_tokens}", n, max_tokens, pruning)
        )
    requests: list[dict] = []
    started = perf_counter()
    log = workdir / "vllm.log"
    vllm = ManagedVLLM(model_dir, served_model_name=served, dtype=dtype, max_model_len=args.max_model_len, log_path=log)
    with vllm:
        guard_process, target = start_guard(vllm.url, served, policy_dir, workdir / "guard.log")
        try:
            with GuardClient(target) as guard:
                n, max_tokens = configs[0]
                for arm in ("plain", "pruned"):  # warm-up: the embedding model loads on first use
                    prompt = f"Question: {QUESTIONS[0]}\nAnswer:"
                    guard.generate(prompt, policy=f"{arm}-{n}-{max_tokens}", seed=0, timeout=600)
                print(f"vLLM and guard ready, warmed up at {perf_counter() - started:.0f} s", flush=True)
                rng = random.Random(0)
                for n, max_tokens in configs:
                    for question in QUESTIONS[: args.prompts]:
                        for seed in range(1, args.seeds + 1):
                            order = ["plain", "pruned"]
                            rng.shuffle(order)
                            for arm in order:
                                requests.append(measure(guard, vllm.url, arm, n, max_tokens, question, seed))
                    print(f"n={n} max_tokens={max_tokens} done at {perf_counter() - started:.0f} s", flush=True)
        finally:
            stop_processes([guard_process])

    rows = summarize(requests, configs)
    print(f"\n{served}, embedding reward, chunk {args.chunk_tokens} tokens, keep {args.keep_fraction}, "
          f"{args.prompts} prompts × {args.seeds} seeds per configuration; means per request, median latency")
    print("\n".join(table(rows)))
    headlines = [
        {"name": f"speculative rejection ÷ plain best_of_n n={r['n']}, max_tokens {r['max_tokens']}: {what}",
         "value": round(r[key], 3), "unit": "×"}
        for r in rows if r["policy"] == "pruned"
        for key, what in (("compute_ratio", "compute (prefill computed + decode)"), ("reward_ratio", "mean reward"))
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "speculative_rejection", "model": served, "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", "benchmarks/speculative_rejection.py", *sys.argv[1:]]),
        "baseline": "plain", "chunk_tokens": args.chunk_tokens, "keep_fraction": args.keep_fraction,
        "prompts": args.prompts, "seeds": args.seeds, "seconds": perf_counter() - started,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows, "headlines": headlines, "requests": requests,
    }, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    print(f"written: {args.out}, {args.out.with_suffix('.png')} ({perf_counter() - started:.0f} s in all)")


def measure(guard: GuardClient, url: str, arm: str, n: int, max_tokens: int, question: str, seed: int) -> dict:
    before = counters(url)
    started = perf_counter()
    answer = guard.generate(
        f"Question: {question}\nAnswer:", policy=f"{arm}-{n}-{max_tokens}", seed=seed, trace=True, timeout=900
    )
    seconds = perf_counter() - started
    engine = engine_delta(url, before, answer.completion_tokens)
    computed = engine["engine_prompt_tokens"] - engine["prefix_cache_hits"]
    generate = detail(answer.trace, "generate") if arm == "pruned" else {}
    return {
        "policy": arm, "n": n, "max_tokens": max_tokens, "question": question, "seed": seed,
        "reward": float(detail(answer.trace, "select")["chosen_score"]),
        "usage_prompt_tokens": answer.prompt_tokens, "usage_completion_tokens": answer.completion_tokens,
        **engine, "computed_prompt_tokens": computed,
        "compute_tokens": computed + engine["generation_tokens"],
        "sent_tokens": engine["engine_prompt_tokens"] + engine["generation_tokens"],
        "upstream_calls": int(generate.get("upstream_calls", 1)),
        "resent_prompt_tokens": int(generate.get("resent_prompt_tokens", 0)),
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
