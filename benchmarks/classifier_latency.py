"""Latency of the shipped classifier rule on one CPU core, against the bare encoder and pattern rules.

    python benchmarks/classifier_latency.py [--requests 200]

Each request is one held-out prompt (data/safety/splits/heldout.jsonl) checked by an input filter
step, in one process with torch on one thread. Measured side by side, interleaved:
  - encoder: sentence-transformers encode() of the prompt alone (the floor for any embedding rule);
  - patterns: safe-assistant's pattern rules only (what shipped before the classifier);
  - classifier: the `harmful-intent` classifier rule (normalisation, windows, encode, head).
Writes benchmarks/results/classifier_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile  # noqa: E402
from guard.pipeline import filters  # noqa: E402,F401 - registers the filter steps
from guard.pipeline.base import Context, StepDeps, step_class  # noqa: E402
from guard.policy.model import Policy  # noqa: E402
from guard.safety.embedder import Embedders  # noqa: E402
from guard.types import GenerateInput, Sampling  # noqa: E402


def filter_policy(kind: str) -> Policy:
    shipped = yaml.safe_load((ROOT / "policies" / "safe-assistant.yaml").read_text())
    step = next(s for s in shipped["steps"] if s.get("name") == "harmful-requests")
    if kind == "patterns":
        step = {k: v for k, v in step.items() if k != "classifiers"}
    else:
        step = {k: v for k, v in step.items() if k != "rules"}
    return Policy.model_validate({"name": kind, "steps": [step]})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "classifier_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (ROOT / "data" / "safety" / "splits" / "heldout.jsonl").read_text().splitlines()]
    prompts = [row["text"] for row in random.Random(0).sample(rows, min(args.requests, len(rows)))]

    embedders = Embedders()
    deps = StepDeps(upstream=None, embedders=embedders)  # type: ignore[arg-type]
    steps = {}
    for kind in ("patterns", "classifier"):
        policy = filter_policy(kind)
        steps[kind] = (policy, step_class("input_filter")(policy.steps[0], deps))
    encoder = embedders.get(steps["classifier"][1].classifiers[0].encoder)

    async def check(kind: str, prompt: str) -> None:
        policy, step = steps[kind]
        ctx = Context(GenerateInput(prompt=prompt), policy, "v", "m", Sampling(), prompt=prompt)
        await step.before(ctx)

    for prompt in prompts[:10]:  # warm-up: model load, first-call allocations
        await check("classifier", prompt)
        encoder.encode([prompt])

    timings: dict[str, list[float]] = {"encoder": [], "patterns": [], "classifier": []}
    for prompt in prompts:
        for kind in timings:
            started = time.perf_counter()
            if kind == "encoder":
                encoder.encode([prompt])
            else:
                await check(kind, prompt)
            timings[kind].append(time.perf_counter() - started)
    embedders.close()

    baseline = statistics.median(timings["encoder"])
    results = {
        kind: {
            "p50_ms": statistics.median(values) * 1e3,
            "p90_ms": percentile(values, 0.9) * 1e3,
            "p99_ms": percentile(values, 0.99) * 1e3,
            "ratio_to_encoder": statistics.median(values) / baseline,
            "n": len(values),
        }
        for kind, values in timings.items()
    }
    print(f"{len(prompts)} held-out prompts, torch threads: {torch.get_num_threads()}, interleaved")
    print("| path | p50 ms | p90 ms | p99 ms | p50 ÷ bare encoder |")
    print("| --- | --- | --- | --- | --- |")
    for kind, row in results.items():
        print(f"| {kind} | {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | {row['ratio_to_encoder']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
                "results": results,
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    asyncio.run(main())
