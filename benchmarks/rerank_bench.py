"""Reward scoring throughput, latency and MFU: naive vs a plain padded batch vs guard's engine.

One request = a prompt (512 tokens) and n replies (128 tokens each), scored by a
random-weight `LlamaForSequenceClassification` (num_labels=1) of a chosen shape,
built directly on the device in its dtype (bf16 on CUDA, fp32 on CPU; nothing is
downloaded, and weights do not change the cost). Four ways, same model, same run,
interleaved per iteration in rotated order so machine noise hits all of them alike:

  naive    one forward pass per candidate over prompt + reply (TRL's BestOfNSampler
           scores this way);
  batched  plain Hugging Face: all n full sequences in one right-padded batch with an
           attention mask, `model(input_ids, attention_mask)`;
  shared   guard's engine forced to share the prefix: the prompt once, the n replies as a
           batch of suffixes on its KV cache;
  auto     guard's default: the engine picks per batch between sharing the prefix and one
           plain pass, from a cost model calibrated on the device.

Every variant's scores are checked against naive's. MFU is taken against the device's
peak dense matmul throughput, measured in the run (bf16 8192^3 on CUDA, fp32 1024^3 on CPU),
twice: with the FLOPs the variant's own work needs, and "shared-equivalent" (the FLOPs of
the prompt once plus n replies, whatever the variant ran), the issue's yardstick.

    python benchmarks/rerank_bench.py                                  # small preset
    python benchmarks/rerank_bench.py --size small --size 1b --size 8b # on a GPU
    python benchmarks/rerank_bench.py --smoke --out /tmp/x.json        # seconds, for tests

Prints a table per size and n (p50, p99, candidates/s, ratio to naive and to the strongest
baseline of the run, MFU) and writes benchmarks/results/rerank_<device>.json with a plot
of candidates/s vs n beside it (same name, .png).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("naive", "batched", "shared", "auto")
BASELINES = ("naive", "batched")
PAD = 0  # pad token id; request tokens are drawn from 1.. so padding is unambiguous

# Llama shapes. small: the reward fixture the benchmark always used; 1b / 8b: Llama 3.2 1B and
# Llama 3.1 8B (GQA); tiny: --smoke only.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}

# The targets at n=8, prompt 512, reply 128, on an H100, for guard's default (auto):
# shared-equivalent MFU and speedup over naive. small: never slower than the plain batch at any n.
TARGETS = {"1b": {"mfu": 0.30, "speedup_vs_naive": 8.0}, "8b": {"mfu": 0.45, "speedup_vs_naive": 5.0}}
TARGET_SETUP = {"device": "H100", "prompt_tokens": 512, "reply_tokens": 128, "n": 8}


def build_model(size: str, device, dtype, max_positions: int):
    """Random weights allocated on `device` in `dtype` from the start: an 8B model never exists in fp32 on the host."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(**SIZES[size], max_position_embeddings=max_positions, pad_token_id=PAD, num_labels=1)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForSequenceClassification(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def same_weights(model):
    """A second module tree (and config) over the very same weight tensors: no extra memory.

    guard's engine switches its model's attention implementation to its own; the baselines run
    this untouched copy, so they stay stock Hugging Face.
    """
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def matmul_params(model) -> int:
    """Parameters that multiply every token: all but the embedding table (a lookup)."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)


def flops_per_request(model, n: int, prompt: int, reply: int, variant: str) -> float:
    """Matmul FLOPs the work needs (2 x params x tokens + attention), for MFU.

    "shared" is the prompt once and n replies on its cache; anything else is n full sequences.
    """
    config = model.config
    params = matmul_params(model)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    total = prompt + reply
    if variant == "shared":
        tokens = prompt + n * reply
        # Causal attention, QK^T and AV: 4 * hidden per (query, key) pair.
        pairs = prompt * (prompt + 1) / 2 + n * (reply * prompt + reply * (reply + 1) / 2)
    else:
        tokens = n * total
        pairs = n * total * (total + 1) / 2
    return 2 * params * tokens + 4 * hidden * layers * pairs


def measure_peak_tflops(device, dtype) -> tuple[float, str]:
    """Best of several timed dense matmuls: the throughput MFU is measured against.

    Best, not median: other load only ever slows a matmul down (many repeats on a shared CPU).
    """
    import torch

    cuda = device.type == "cuda"
    size = 8192 if cuda else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: clocks, cuBLAS heuristics, first-touch pages
        torch.mm(a, b, out=c)
    best = float("inf")
    repeats = 5 if cuda else 20
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                torch.mm(a, b, out=c)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / 10)
        else:
            started = time.perf_counter()
            torch.mm(a, b, out=c)
            best = min(best, time.perf_counter() - started)
    dtype_name = str(dtype).removeprefix("torch.")
    return 2 * size**3 / best / 1e12, f"{dtype_name} {size}x{size}x{size} matmul, best of {repeats}"


def strategy_from_rows(n: int, rows_seen: set[int]) -> str | None:
    """What auto ran, from the rows its passes took: a prefix pass adds one row to the n candidates.

    None when it varied between iterations or matches neither (then its own-work MFU is unknown).
    """
    if n == 1:
        return "whole"  # nothing to share: both strategies are one plain pass
    return {frozenset({n + 1}): "shared", frozenset({n}): "whole"}.get(frozenset(rows_seen))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str | None:
    """The commit measured, marked when the engine (guard/rerank) had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "guard/rerank"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None  # not a checkout (a copied tree)
    return head.stdout.strip() + (" + uncommitted changes in guard/rerank" if dirty.stdout.strip() else "")


def summarise(samples: list[float]) -> tuple[float, float]:
    p50 = statistics.median(samples)
    p99 = statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) > 1 else p50
    return p50, p99


def bench_size(size: str, args, device, dtype, sample_peak) -> tuple[dict, dict]:
    """One size, every n: (results by n, size facts). MFU is added once the run's peak is known."""
    import torch

    from guard.rerank.causal import CausalHidden, Seq

    cuda = device.type == "cuda"
    model = build_model(size, device, dtype, args.prompt_tokens + args.reply_tokens + 16)
    vocab = model.config.vocab_size
    rows_run = [0]  # rows the engine ran in its last call: n + 1 when it ran a prefix pass, n when not

    def count_rows(rows: int) -> None:
        rows_run[0] += rows

    guard_model = same_weights(model)
    engines = {
        strategy: CausalHidden(
            guard_model.base_model, max_batch_tokens=args.max_batch_tokens, strategy=strategy, on_batch=count_rows
        )
        for strategy in ("shared", "auto")
    }
    # As guard does when a policy's reward model loads (guard/rerank/sources.py): on a GPU, measure the
    # device's cost model for auto; a CPU keeps the uncalibrated rule (fewer tokens win).
    calibrate_s = None
    if cuda:
        started = time.perf_counter()
        engines["auto"].calibrate()
        calibrate_s = time.perf_counter() - started

    generator = torch.Generator().manual_seed(1)

    def request(n: int) -> list[list[int]]:
        prompt = torch.randint(1, vocab, (args.prompt_tokens,), generator=generator).tolist()
        return [prompt + torch.randint(1, vocab, (args.reply_tokens,), generator=generator).tolist() for _ in range(n)]

    @torch.inference_mode()
    def run(variant: str, seqs: list[list[int]]) -> list[float]:
        # One host sync per variant (the final .tolist()), so naive is not charged a sync per candidate.
        if variant == "naive":
            logits = [model(input_ids=torch.tensor([ids], device=device)).logits[0, 0] for ids in seqs]
            return torch.stack(logits).float().tolist()
        if variant == "batched":
            width = max(len(ids) for ids in seqs)
            ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, tokens in enumerate(seqs):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                mask[row, : len(tokens)] = 1
            return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().tolist()
        [hidden] = engines[variant].hidden([[Seq(ids, [len(ids) - 1]) for ids in seqs]])
        return guard_model.score(torch.stack([h[-1] for h in hidden])).float()[:, 0].tolist()

    def timed(variant: str, seqs: list[list[int]]) -> tuple[float, list[float], int]:
        if cuda:
            torch.cuda.synchronize()
        rows_run[0] = 0
        started = time.perf_counter()
        scores = run(variant, seqs)  # .tolist() synchronizes
        return time.perf_counter() - started, scores, rows_run[0]

    # On max |score - naive| / max(1, max |naive score|).
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-3
    results: dict[str, dict] = {}
    for n in args.n:
        sample_peak()
        seqs = request(n)
        for variant in VARIANTS:  # warm-up (allocator, kernels)
            run(variant, seqs)
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        worst = dict.fromkeys(VARIANTS, 0.0)
        auto_rows: set[int] = set()
        for iteration in range(args.iters):
            # Rotate the order so no variant always runs first (cache state, clocks).
            shift = iteration % len(VARIANTS)
            scores = {}
            for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                seconds, scores[variant], rows = timed(variant, seqs)
                samples[variant].append(seconds)
                if variant == "auto":
                    auto_rows.add(rows)
            for variant in VARIANTS:
                diff = max(abs(a - b) for a, b in zip(scores[variant], scores["naive"], strict=True))
                # Relative once scores exceed 1: bf16 rounding grows with their magnitude.
                worst[variant] = max(worst[variant], diff / max(1.0, max(abs(s) for s in scores["naive"])))
        auto_choice = strategy_from_rows(n, auto_rows)

        p50s = {v: summarise(samples[v])[0] for v in VARIANTS}
        baseline = min(BASELINES, key=p50s.__getitem__)
        shared_flops = flops_per_request(model, n, args.prompt_tokens, args.reply_tokens, "shared")
        row: dict = {"strongest_baseline": baseline, "auto_choice": auto_choice, "shared_flops": shared_flops}
        for variant in VARIANTS:
            p50, p99 = summarise(samples[variant])
            work = {"naive": "whole", "batched": "whole", "shared": "shared", "auto": auto_choice}[variant]
            flops = flops_per_request(model, n, args.prompt_tokens, args.reply_tokens, work) if work else None
            row[variant] = {
                "p50_s": p50,
                "p99_s": p99,
                "samples_s": samples[variant],
                "candidates_per_s": n / p50,
                "speedup_vs_naive": p50s["naive"] / p50,
                "speedup_vs_strongest_baseline": p50s[baseline] / p50,
                "flops": flops,
                "max_diff_vs_naive": worst[variant],
                "agrees_with_naive": worst[variant] <= tolerance,
            }
        results[str(n)] = row
        print(f"{size} n={n}: " + ", ".join(f"{v} {p50s[v] * 1e3:.1f} ms" for v in VARIANTS), flush=True)

    facts = {
        "config": SIZES[size],
        "params": sum(p.numel() for p in model.parameters()),
        "params_without_embeddings": matmul_params(model),
        "calibrate_s": calibrate_s,
        "equality_tolerance": tolerance,
    }
    del model, guard_model, engines
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return results, facts


def add_mfu(results: dict, peak_tflops: float) -> None:
    for row in results.values():
        for variant in VARIANTS:
            cell = row[variant]
            cell["mfu"] = cell["flops"] / cell["p50_s"] / (peak_tflops * 1e12) if cell["flops"] else None
            cell["mfu_shared_equivalent"] = row["shared_flops"] / cell["p50_s"] / (peak_tflops * 1e12)


def print_table(size: str, n: int, row: dict) -> None:
    choice = f", auto chose {row['auto_choice']}" if row["auto_choice"] else ""
    print(f"\n{size}  n={n}  (strongest baseline: {row['strongest_baseline']}{choice})")
    print(
        f"  {'variant':8} {'p50 ms':>9} {'p99 ms':>9} {'cand/s':>8} {'x naive':>8} {'x strongest':>11} "
        f"{'MFU':>7} {'MFU sh-eq':>9}  agrees"
    )
    for variant in VARIANTS:
        cell = row[variant]
        mfu = f"{cell['mfu']:.1%}" if cell["mfu"] is not None else "-"
        print(
            f"  {variant:8} {cell['p50_s'] * 1e3:9.1f} {cell['p99_s'] * 1e3:9.1f} {cell['candidates_per_s']:8.1f} "
            f"{cell['speedup_vs_naive']:8.2f} {cell['speedup_vs_strongest_baseline']:11.2f} {mfu:>7} "
            f"{cell['mfu_shared_equivalent']:9.1%}  {'yes' if cell['agrees_with_naive'] else 'NO'}",
            flush=True,
        )


def targets(size: str, results: dict, on_target_setup: bool) -> dict | None:
    """Whether guard's default (auto) meets the issue's target for this size, from the measured numbers."""
    if size == "small":
        ratios = {n: row["batched"]["p50_s"] / row["auto"]["p50_s"] for n, row in results.items()}
        return {
            "target": "auto never slower than batched at any n (p50)",
            "auto_speedup_vs_batched": ratios,
            "met": all(ratio >= 1.0 for ratio in ratios.values()),
            "on_target_setup": on_target_setup,
        }
    if size not in TARGETS or "8" not in results:
        return None
    auto = results["8"]["auto"]
    target = TARGETS[size]
    mfu_met = auto["mfu_shared_equivalent"] >= target["mfu"]
    speedup_met = auto["speedup_vs_naive"] >= target["speedup_vs_naive"]
    return {
        "target": (
            f"auto at n=8: shared-equivalent MFU >= {target['mfu']:.0%}, >= {target['speedup_vs_naive']:g}x naive"
        ),
        "mfu_shared_equivalent": auto["mfu_shared_equivalent"],
        "speedup_vs_naive": auto["speedup_vs_naive"],
        "mfu_met": mfu_met,
        "speedup_met": speedup_met,
        "met": mfu_met and speedup_met,
        "on_target_setup": on_target_setup,
    }


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    sizes = list(report["results"])
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.6), squeeze=False)
    for axis, size in zip(axes[0], sizes, strict=True):
        by_n = report["results"][size]
        ns = [int(n) for n in by_n]
        for variant in VARIANTS:
            axis.plot(ns, [by_n[str(n)][variant]["candidates_per_s"] for n in ns], marker="o", label=variant)
        params = report["setup"]["sizes"][size]["params_without_embeddings"]
        axis.set(title=f"{size} ({params / 1e6:,.0f}M params w/o embeddings)", xlabel="candidates per request (n)",
                 ylabel="candidates/s (p50)", xscale="log", yscale="log")
        axis.set_xticks(ns, [str(n) for n in ns])
        axis.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_formatter(NullFormatter())
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    setup = report["setup"]
    threads = f", {setup['torch_threads']} thread(s)" if setup["device_type"] == "cpu" else ""
    figure.suptitle(
        f"Reward scoring, prompt {setup['prompt_tokens']} + n replies of {setup['reply_tokens']} tokens\n"
        f"{setup['device']}, {setup['dtype']}{threads}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", choices=[s for s in SIZES if s != "tiny"],
                        help="model shape; repeat to run several in turn (default: small)")
    parser.add_argument("--n", type=int, nargs="+", help="candidates per request (default 1 2 4 8 16, and 32 on CUDA)")
    parser.add_argument("--iters", type=int, help="timed iterations per n after a warm-up (default 8 on CUDA, 3 on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 threads stall on 2-core VMs)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--reply-tokens", type=int, default=128)
    parser.add_argument("--max-batch-tokens", type=int, default=32768, help="guard engine's token budget per pass")
    parser.add_argument("--out", type=Path, help="results JSON, plot beside it (default: results/rerank_<cpu|cuda>.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long check: tiny model, prompt 32, reply 8, n 1 2 4, one iteration")
    args = parser.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.smoke:
        args.size, args.n, args.iters = ["tiny"], [1, 2, 4], 1
        args.prompt_tokens, args.reply_tokens = 32, 8
        if args.out is None:
            args.out = Path(tempfile.mkdtemp(prefix="rerank_smoke_")) / "rerank_smoke.json"
    args.size = args.size or ["small"]
    args.n = args.n or ([1, 2, 4, 8, 16, 32] if cuda else [1, 2, 4, 8, 16])
    args.iters = args.iters or (8 if cuda else 3)
    args.out = args.out or ROOT / "benchmarks" / "results" / f"rerank_{device.type}.json"

    device_name = torch.cuda.get_device_name() if cuda else cpu_name()
    # Sampled before every n and at the end, the best kept: a busy machine can only lower one sample.
    peaks: list[float] = []

    def sample_peak() -> None:
        peaks.append(measure_peak_tflops(device, dtype)[0])

    on_target_setup = (
        TARGET_SETUP["device"] in device_name
        and args.prompt_tokens == TARGET_SETUP["prompt_tokens"]
        and args.reply_tokens == TARGET_SETUP["reply_tokens"]
        and TARGET_SETUP["n"] in args.n
    )

    report: dict = {
        "setup": {
            "device": device_name,
            "device_type": device.type,
            "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
            "guard_code": code_version(),
            "prompt_tokens": args.prompt_tokens,
            "reply_tokens": args.reply_tokens,
            "n": args.n,
            "iterations": args.iters,
            "max_batch_tokens": args.max_batch_tokens,
            "variants": list(VARIANTS),
            "sizes": {},
        },
        "results": {},
        "targets": {},
    }
    for size in args.size:
        report["results"][size], report["setup"]["sizes"][size] = bench_size(size, args, device, dtype, sample_peak)
    peak_tflops, peak_how = measure_peak_tflops(device, dtype)
    peaks.append(peak_tflops)
    peak_tflops = max(peaks)
    report["setup"]["peak_tflops_measured"] = peak_tflops
    report["setup"]["peak_measurement"] = f"{peak_how}, sampled before each n and at the end: best of {len(peaks)}"
    report["setup"]["peak_samples_tflops"] = peaks
    print(f"\n{device_name}: measured peak {peak_tflops:.3f} TFLOP/s ({report['setup']['peak_measurement']})")
    for size, results in report["results"].items():
        add_mfu(results, peak_tflops)
        for n, row in results.items():
            print_table(size, int(n), row)
        report["targets"][size] = targets(size, results, on_target_setup)
        if (target := report["targets"][size]) is not None:
            print(f"\n{size} target: {target['target']}: met={target['met']}", flush=True)
    agrees = all(
        row[v]["agrees_with_naive"] for results in report["results"].values() for row in results.values() for v in VARIANTS
    )
    report["agrees_with_naive"] = agrees

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(args.out.with_suffix(".png"), report)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    if not agrees:
        sys.exit("some variant's scores disagree with naive's beyond tolerance (see max_diff_vs_naive)")


if __name__ == "__main__":
    main()
