"""Reranking throughput and latency: naive per-candidate vs batched vs shared-prefix batched.

One request = a 512-token prompt and n 128-token replies, scored by a locally
built random-weight Llama reward model (hidden 512, 8 layers; weights do not
change the cost). Three ways, same model, same run, interleaved per iteration
so machine noise hits all of them alike:

  naive   one forward pass per candidate over prompt + reply (TRL's BestOfNSampler
          runs its reward pipeline this way);
  batched all n full sequences in one padded batch;
  shared  guard's path: the prompt once, the n replies as a batch of suffixes on its KV cache.

    python benchmarks/rerank_bench.py [--iters 5] [--threads 1]

Prints p50/p99 latency and candidates/s per n, the ratio to naive and shared's ratio to the
strongest baseline (the faster of naive and batched, in the same run), and
writes benchmarks/results/rerank.json. On CUDA it runs bf16 and reports MFU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NS = (1, 2, 4, 8, 16)
VARIANTS = ("naive", "batched", "shared")
# Dense bf16 peak, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def build_model(device, dtype, prompt_tokens: int, reply_tokens: int):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=prompt_tokens + reply_tokens + 16,
        pad_token_id=0,
        num_labels=1,
    )
    return LlamaForSequenceClassification(config).to(device=device, dtype=dtype).eval()


def flops_per_request(model, n: int, prompt: int, reply: int, variant: str) -> float:
    """Matmul FLOPs actually needed (2 x params x tokens + attention), for MFU."""
    config = model.config
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per n (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (2 threads stall on 2-core VMs)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--reply-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rerank.json")
    args = parser.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from guard.rerank.causal import CausalHidden, Seq

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_model(device, dtype, args.prompt_tokens, args.reply_tokens)
    engines = {
        share: CausalHidden(model.base_model, max_batch_tokens=32768, share_prefix=share) for share in (False, True)
    }
    generator = torch.Generator().manual_seed(1)

    def request(n: int) -> list[Seq]:
        prompt = torch.randint(1, 32000, (args.prompt_tokens,), generator=generator).tolist()
        seqs = []
        for _ in range(n):
            ids = prompt + torch.randint(1, 32000, (args.reply_tokens,), generator=generator).tolist()
            seqs.append(Seq(ids, [len(ids) - 1]))
        return seqs

    @torch.inference_mode()
    def run(variant: str, seqs: list[Seq]) -> list[float]:
        if variant == "naive":
            return [model(torch.tensor([s.ids], device=device)).logits[0, 0].float().item() for s in seqs]
        [hidden] = engines[variant == "shared"].hidden([seqs])
        return [model.score(h[-1]).float()[0].item() for h in hidden]

    def timed(variant: str, seqs: list[Seq]) -> tuple[float, list[float]]:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        scores = run(variant, seqs)  # .item() synchronizes
        return time.perf_counter() - started, scores

    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-3
    results: dict[str, dict] = {}
    for n in NS:
        seqs = request(n)
        for variant in VARIANTS:  # warm-up (allocator, kernels)
            run(variant, seqs)
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for iteration in range(args.iters):
            # Rotate the order so no variant always runs first (cache state, thermal).
            order = VARIANTS[iteration % 3 :] + VARIANTS[: iteration % 3]
            scores = {}
            for variant in order:
                seconds, scores[variant] = timed(variant, seqs)
                samples[variant].append(seconds)
            for variant in ("batched", "shared"):
                worst = max(abs(a - b) for a, b in zip(scores[variant], scores["naive"], strict=True))
                assert worst < tolerance, f"{variant} disagrees with naive by {worst} at n={n}"
        row = {}
        naive_p50 = statistics.median(samples["naive"])
        # The strongest baseline is whichever of the two stock ways was faster in this run (the plain
        # padded batch, for small models): guard's path is judged against it, not against naive alone.
        baseline = min(("naive", "batched"), key=lambda v: statistics.median(samples[v]))
        baseline_p50 = statistics.median(samples[baseline])
        for variant in VARIANTS:
            p50 = statistics.median(samples[variant])
            p99 = statistics.quantiles(samples[variant], n=100, method="inclusive")[98] if args.iters > 1 else p50
            row[variant] = {
                "p50_s": p50,
                "p99_s": p99,
                "candidates_per_s": n / p50,
                "speedup_vs_naive": naive_p50 / p50,
                "speedup_vs_strongest_baseline": baseline_p50 / p50,
            }
            if cuda:
                name = torch.cuda.get_device_name()
                peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
                if peak is not None:
                    flops = flops_per_request(model, n, args.prompt_tokens, args.reply_tokens, variant)
                    row[variant]["mfu"] = flops / p50 / (peak * 1e12)
        row["strongest_baseline"] = baseline
        results[str(n)] = row
        cells = "  ".join(
            f"{v}: p50 {row[v]['p50_s'] * 1e3:7.1f} ms p99 {row[v]['p99_s'] * 1e3:7.1f} ms "
            f"{row[v]['candidates_per_s']:6.1f} cand/s x{row[v]['speedup_vs_naive']:.2f}"
            + (f" MFU {row[v]['mfu']:.1%}" if "mfu" in row[v] else "")
            for v in VARIANTS
        )
        print(f"n={n:<2}  {cells}  shared ÷ {baseline}: x{row['shared']['speedup_vs_strongest_baseline']:.2f}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "setup": {
                    "model": "random LlamaForSequenceClassification, hidden 512, 8 layers, 8 heads, ffn 1408",
                    "prompt_tokens": args.prompt_tokens,
                    "reply_tokens": args.reply_tokens,
                    "iterations": args.iters,
                    "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
                    "dtype": str(dtype),
                    "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                },
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
