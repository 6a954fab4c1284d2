"""Retrieval: the ANN library comparison, index build throughput, query latency at 10k and 100k chunks, and what the
retrieve step adds to a request through guard.

    python -m benchmarks.retrieval              # every part (~6 min on 2 cores)
    python -m benchmarks.retrieval --smoke      # seconds: small sizes, no 100k
    python -m benchmarks.retrieval --only ann query

Parts, each against the strongest baseline it measures in the same run:
- ann: synthetic unit vectors (384-d, MiniLM's size; a hard mixture of 2,000-point topics, 20 sub-topics each, and
  noise, so that a query's 10th neighbour is barely less similar than its first: nearest cosine ~0.45, 10th ~0.41).
  faiss (HNSW), hnswlib and usearch with the same graph (M=32, efConstruction=128, efSearch=64), built on 2
  threads, queried one at a time on one thread in interleaved order; baseline: exact search in numpy
  (matrix-vector product + argpartition), which also gives the true neighbours for recall@10.
- build: `guard index build` on a generated corpus of made-up product manuals (real text, real MiniLM embeddings):
  chunks/s and the time per phase (loading the encoder not counted); baseline: the encoder alone embedding the same
  chunks (the floor of any build).
- query: guard's Index.search (faiss graph + SQLite chunk lookup) on guard indexes of 10k and 100k synthetic chunks,
  against exact numpy search over the same vectors; and MiniLM embedding one query (what every retrieve adds).
- step: `guard serve` in front of benchmarks.instant_upstream; the passthrough policy (baseline) against retrieve
  over the manuals index, retrieve over the 100k index, and retrieve + grounding_check; interleaved rounds, CPU and
  latency added over passthrough as in benchmarks/step_cost.py (and ÷ one MiniLM query embedding, the step's floor).
torch and BLAS run on one thread (OMP_NUM_THREADS=1), as guard serves by default. Writes
benchmarks/results/retrieval.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy, faiss and torch load their thread pools
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import percentile, stop_processes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DIM = 384
K = 10
M, EF_CONSTRUCTION, EF_SEARCH = 32, 128, 64
BUILD_THREADS = 2
QUESTIONS = [
    "How long does the {p} take to charge?",
    "What does error {e} mean on the {p}?",
    "How often should I clean the filter of the {p}?",
    "How do I reset the {p} to factory settings?",
    "What is the warranty on the {p}?",
    "How do I pair the {p} with my phone?",
]


# -- data -----------------------------------------------------------------------------------------


def synthetic_vectors(n: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors from topics (one per 2,000 points), 20 sub-topics each, and noise; queries from the same mix."""
    rng = np.random.default_rng(seed)
    topics = max(n // 2000, 4)
    topic = rng.standard_normal((topics, DIM)).astype(np.float32)
    sub = rng.standard_normal((topics * 20, DIM)).astype(np.float32)
    topic /= np.linalg.norm(topic, axis=1, keepdims=True)
    sub /= np.linalg.norm(sub, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        s = rng.integers(0, topics * 20, m)
        x = topic[s // 20] + 0.5 * sub[s] + 1.5 * rng.standard_normal((m, DIM)).astype(np.float32) / np.sqrt(DIM)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(queries)


PRODUCTS = ["Aurora", "Nimbus", "Tundra", "Quill", "Zephyr", "Orbit", "Cobalt", "Lumen", "Vortex", "Ember", "Solace", "Atlas"]
KINDS = ["cordless vacuum", "espresso machine", "smart thermostat", "e-reader", "drone", "air purifier", "robot mower",
         "dishwasher", "electric kettle", "baby monitor", "soundbar", "treadmill"]


def manuals(count: int, seed: int = 0) -> dict[str, str]:
    """`count` made-up product manuals (markdown, ~10 sections each), with numbers that differ per product."""
    rng = random.Random(seed)
    out = {}
    for i in range(count):
        name = f"{rng.choice(PRODUCTS)} {rng.choice('KTXZQ')}{rng.randint(1, 999)} {rng.choice(KINDS)}"
        r = lambda a, b: rng.randint(a, b)  # noqa: E731
        sections = {
            "Charging": f"Place the unit on its dock. A full charge takes {r(1, 9)} hours. The light turns green when full. "
                        f"Do not charge it below {r(0, 10)} degrees Celsius. The battery lasts {r(20, 90)} minutes on eco.",
            "Cleaning": f"Clean the filter every {r(1, 8)} weeks with cold water. Let it dry for {r(6, 48)} hours. "
                        "Never use detergent or a dishwasher for the filter. Wipe the outside with a damp cloth.",
            "Error codes": " ".join(f"E{c}: {rng.choice(['the motor is too hot', 'the tank is empty', 'a sensor is blocked', 'the battery is faulty', 'the lid is open'])}."
                                    for c in rng.sample(range(1, 40), 4)),
            "Factory reset": f"Hold the power button for {r(5, 30)} seconds until the light blinks {rng.choice(['blue', 'red', 'white'])}. "
                             "All settings are erased. Pair the device again afterwards.",
            "Pairing": f"Open the app and choose Add device. The device supports {rng.choice(['2.4 GHz', '5 GHz', 'both 2.4 and 5 GHz'])} "
                       f"networks. Pairing times out after {r(1, 5)} minutes.",
            "Warranty": f"The warranty covers {r(1, 5)} years from purchase. It does not cover wear parts such as filters, "
                        "brushes or seals. Keep your receipt.",
            "Safety": "Keep the device away from water and heat. Do not open the housing. Children must not play with it. "
                      f"Use only the supplied adapter rated {r(5, 24)} volts.",
            "Specifications": f"Weight {r(1, 20)}.{r(0, 9)} kg. Noise {r(30, 80)} dB. Power {r(20, 2000)} W. "
                              f"Dimensions {r(10, 90)} by {r(10, 90)} by {r(10, 90)} cm.",
            "Maintenance": f"Replace the seals every {r(6, 36)} months. Check the brushes for hair every week. "
                           f"Update the firmware when the app asks. A service every {r(1, 3)} years keeps it running.",
            "Troubleshooting": "If the device does not start, check the fuse and the adapter. If it is noisy, clean the "
                               f"filter. If the app cannot find it, restart your router and wait {r(1, 5)} minutes.",
        }
        text = f"# {name}\n\n" + "".join(f"## {title}\n{body}\n\n" for title, body in sections.items())
        out[f"manual-{i:04d}.md"] = text
    return out


def _machine() -> dict:
    import faiss
    import torch

    return {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "faiss": faiss.__version__, "env": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "load_average_at_start": os.getloadavg(),
    }


# -- ann: the library comparison ------------------------------------------------------------------


class Exact:
    name = "numpy-exact"

    def build(self, vectors: np.ndarray) -> None:
        self.vectors = vectors

    def search(self, query: np.ndarray) -> np.ndarray:
        scores = self.vectors @ query
        top = np.argpartition(-scores, K)[:K]
        return top[np.argsort(-scores[top])]

    def save(self, path: Path) -> int:
        np.save(path, self.vectors)
        return path.with_suffix(".npy").stat().st_size


class Faiss:
    name = "faiss-hnsw"

    def build(self, vectors: np.ndarray) -> None:
        import faiss

        faiss.omp_set_num_threads(BUILD_THREADS)
        self.index = faiss.IndexHNSWFlat(DIM, M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.add(vectors)
        self.index.hnsw.efSearch = EF_SEARCH
        faiss.omp_set_num_threads(1)

    def search(self, query: np.ndarray) -> np.ndarray:
        return self.index.search(query[None], K)[1][0]

    def save(self, path: Path) -> int:
        import faiss

        faiss.write_index(self.index, str(path))
        return path.stat().st_size


class Hnswlib:
    name = "hnswlib"

    def build(self, vectors: np.ndarray) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=DIM)
        self.index.init_index(max_elements=len(vectors), ef_construction=EF_CONSTRUCTION, M=M)
        self.index.add_items(vectors, np.arange(len(vectors)), num_threads=BUILD_THREADS)
        self.index.set_ef(EF_SEARCH)
        self.index.set_num_threads(1)

    def search(self, query: np.ndarray) -> np.ndarray:
        return self.index.knn_query(query[None], k=K)[0][0]

    def save(self, path: Path) -> int:
        self.index.save_index(str(path))
        return path.stat().st_size


class Usearch:
    name = "usearch"

    def build(self, vectors: np.ndarray) -> None:
        from usearch.index import Index

        self.index = Index(ndim=DIM, metric="ip", dtype="f32", connectivity=M, expansion_add=EF_CONSTRUCTION, expansion_search=EF_SEARCH)
        self.index.add(np.arange(len(vectors)), vectors, threads=BUILD_THREADS)

    def search(self, query: np.ndarray) -> np.ndarray:
        return self.index.search(query, K, threads=1).keys

    def save(self, path: Path) -> int:
        self.index.save(str(path))
        return path.stat().st_size


def _available(libraries) -> tuple[list, list[str]]:
    present, skipped = [], []
    for library in libraries:
        module = {"faiss-hnsw": "faiss", "hnswlib": "hnswlib", "usearch": "usearch"}.get(library.name)
        try:
            if module:
                __import__(module)
            present.append(library)
        except ImportError:
            skipped.append(f"{library.name}: not installed (pip install {module})")
    return present, skipped


def compare_ann(size: int, queries: int, workdir: Path) -> tuple[list[dict], list[str]]:
    vectors, asked = synthetic_vectors(size, queries)
    libraries, skipped = _available([Exact(), Faiss(), Hnswlib(), Usearch()])
    built = {}
    for library in libraries:
        started = time.perf_counter()
        library.build(vectors)
        built[library.name] = (time.perf_counter() - started, library.save(workdir / f"{library.name}-{size}"))
    latencies = {library.name: [] for library in libraries}
    found = {library.name: [] for library in libraries}
    for query in asked:  # interleaved: the machine's drift falls on every library alike
        for library in libraries:
            started = time.perf_counter()
            rows = library.search(query)
            latencies[library.name].append(time.perf_counter() - started)
            found[library.name].append({int(row) for row in rows})
    truth = found["numpy-exact"]
    exact_p50 = statistics.median(latencies["numpy-exact"])
    rows = []
    for library in libraries:
        build_s, size_bytes = built[library.name]
        p50 = statistics.median(latencies[library.name])
        rows.append({
            "part": "ann", "chunks": size, "library": library.name,
            "query_p50_ms": p50 * 1e3, "query_p99_ms": percentile(latencies[library.name], 0.99) * 1e3,
            "p50_speedup_vs_exact": exact_p50 / p50,
            "recall_at_10": statistics.fmean(len(a & b) / K for a, b in zip(found[library.name], truth)),
            "build_s": build_s, "vectors_per_s": size / build_s if build_s > 1e-6 else None,
            "file_mb": size_bytes / 2**20, "queries": queries,
        })
    return rows, skipped


# -- build: guard index build on real text --------------------------------------------------------


def measure_build(documents: int, workdir: Path) -> dict:
    from guard.retrieval.build import EMBED_BATCH, build_index
    from guard.retrieval.chunking import ChunkingParams, chunk_document, read_documents
    from guard.safety.embedder import Embedder
    from tests.support.manuals import write_manuals

    docs = write_manuals(workdir / "manuals", manuals(documents))
    report = build_index(docs, workdir / "manuals.index")
    # The floor: the encoder alone on the same chunk texts, in the same batches, already loaded.
    texts = [c.embedded_text() for d in read_documents(docs) for c in chunk_document(d, ChunkingParams())]
    encoder = Embedder()
    started = time.perf_counter()
    for start in range(0, len(texts), EMBED_BATCH):
        encoder.encode(texts[start : start + EMBED_BATCH])
    encoder_rate = len(texts) / (time.perf_counter() - started)
    return {
        "part": "build", "documents": report.documents, "chunks": report.chunks,
        "chunks_per_s": report.chunks_per_second, "encoder_alone_chunks_per_s": encoder_rate,
        "ratio_to_encoder_alone": report.chunks_per_second / encoder_rate,
        **{f"{phase}_s": seconds for phase, seconds in report.seconds.items()},
    }


# -- query: guard's Index.search at scale ---------------------------------------------------------


def synthetic_index(size: int, workdir: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    from guard.retrieval.chunking import Chunk, ChunkingParams
    from guard.retrieval.index import write_index
    from guard.safety.embedder import BUNDLED

    vectors, queries = synthetic_vectors(size, 300, seed=1)
    chunks = [Chunk(f"synthetic-{i // 100:05d}.md", i % 100, "Synthetic", f"Synthetic chunk {i}: " + "lorem ipsum " * 40) for i in range(size)]
    path = write_index(workdir / f"synthetic-{size}.index", [], chunks, vectors, encoder=BUNDLED, params=ChunkingParams(),
                       threads=BUILD_THREADS)
    return path, vectors, queries


def measure_query(size: int, workdir: Path) -> tuple[dict, Path]:
    from guard.retrieval.index import load_index

    path, vectors, queries = synthetic_index(size, workdir)
    started = time.perf_counter()
    index = load_index(path)
    load_s = time.perf_counter() - started
    exact = Exact()
    exact.build(vectors)
    guard_s, exact_s = [], []
    for query in queries:
        started = time.perf_counter()
        index.search(query, 5)
        guard_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        exact.search(query)
        exact_s.append(time.perf_counter() - started)
    return {
        "part": "query", "chunks": size, "what": "Index.search k=5 (faiss graph + SQLite lookup)",
        "query_p50_ms": statistics.median(guard_s) * 1e3, "query_p99_ms": percentile(guard_s, 0.99) * 1e3,
        "exact_p50_ms": statistics.median(exact_s) * 1e3, "exact_p99_ms": percentile(exact_s, 0.99) * 1e3,
        "p50_speedup_vs_exact": statistics.median(exact_s) / statistics.median(guard_s),
        "load_s": load_s, "index_mb": sum(f.stat().st_size for f in path.iterdir()) / 2**20, "queries": len(queries),
    }, path


def measure_query_embedding(queries: int) -> dict:
    from guard.safety.embedder import Embedder

    encoder = Embedder()
    texts = [q.format(p=f"{PRODUCTS[i % 12]} X{i}", e=f"E{i % 40}") for i, q in enumerate(QUESTIONS * (queries // len(QUESTIONS) + 1))][:queries]
    encoder.encode(texts[:4])
    seconds = []
    for text in texts:
        started = time.perf_counter()
        encoder.encode([text])
        seconds.append(time.perf_counter() - started)
    return {"part": "query", "chunks": None, "what": "MiniLM embedding of one question (1 thread)",
            "query_p50_ms": statistics.median(seconds) * 1e3, "query_p99_ms": percentile(seconds, 0.99) * 1e3, "queries": queries}


# -- step: through guard --------------------------------------------------------------------------

BASELINE = "passthrough"


def step_policies(manuals_index: str, big_index: str | None) -> dict[str, tuple[str, list[dict]]]:
    policies = {
        BASELINE: ("no steps", []),
        "retrieve": ("retrieve, top_k 4, over the manuals index", [{"type": "retrieve", "index": manuals_index, "top_k": 4, "min_score": 0.0}]),
        "retrieve-grounding": ("retrieve + grounding_check (flag)", [
            {"type": "retrieve", "index": manuals_index, "top_k": 4, "min_score": 0.0}, {"type": "grounding_check"}]),
    }
    if big_index is not None:
        policies["retrieve-100k"] = ("retrieve, top_k 4, over the 100k synthetic index",
                                     [{"type": "retrieve", "index": big_index, "top_k": 4, "min_score": -1.0}])
    return policies


async def measure_step(policies: dict[str, tuple[str, list[dict]]], rounds: int, requests: int, workdir: Path) -> tuple[list[dict], dict]:
    import grpc
    import yaml

    from benchmarks.proxy_cost import measure, start_guard, start_upstream
    from benchmarks.step_cost import aggregate
    from guard.v1 import guard_pb2 as pb
    from guard.v1 import guard_pb2_grpc

    directory = workdir / "policies"
    directory.mkdir(exist_ok=True)
    for name, (description, steps) in policies.items():
        (directory / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "description": description, "steps": steps}))
    questions = [q.format(p=f"{PRODUCTS[i % 12]} X{i}", e=f"E{i % 40}") for i, q in enumerate(QUESTIONS * 4)]
    upstream_process, upstream = start_upstream(16)
    processes = [upstream_process]
    samples, latencies = [], {name: [] for name in policies}
    try:
        started = time.monotonic()
        guard_process, port, _ = start_guard(upstream, workdir, extra=["--policies", str(directory)])
        processes.append(guard_process)
        startup_s = time.monotonic() - started
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = guard_pb2_grpc.GuardStub(channel)
        traced = {}
        for name in policies:
            request = pb.GenerateRequest(policy=name, include_trace=True, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=questions[0])]))
            reply = await stub.Generate(request, timeout=120)
            traced[name] = {"steps": sorted({s.type for s in reply.trace.steps}), "sources": len(reply.sources)}
            if name != BASELINE and not reply.sources:
                raise SystemExit(f"policy {name}: no sources in {reply}")

        def caller(name: str):
            turn = iter(range(10**9))
            timed: list[float] = []

            async def call() -> None:
                question = questions[next(turn) % len(questions)]
                request = pb.GenerateRequest(policy=name, messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)]))
                request.sampling.max_tokens = 16
                begun = time.perf_counter()
                await stub.Generate(request, timeout=30)
                timed.append(time.perf_counter() - begun)

            return call, timed

        rng = random.Random(0)
        for round_ in range(rounds):
            order = list(policies)
            rng.shuffle(order)
            for name in order:
                call, timed = caller(name)
                result = await measure(guard_process.pid, call, requests, 1)
                latencies[name] += timed[-requests:]
                samples.append({"round": round_, "policy": name, **{k: result[k] for k in ("p50_ms", "p99_ms", "cpu_ms_per_request")}})
        await channel.close()
    finally:
        stop_processes(processes)
    rows = aggregate(samples, latencies, {name: description for name, (description, _) in policies.items()})
    return [{"part": "step", **row} for row in rows], {"guard_startup_s": startup_s, "traced": traced}


# -- the run --------------------------------------------------------------------------------------


def headlines(rows: list[dict]) -> list[dict]:
    out = []
    by_part = {}
    for row in rows:
        by_part.setdefault(row["part"], []).append(row)
    for row in by_part.get("build", []):
        out.append({"name": f"index build throughput ({row['chunks']} chunks of real text, MiniLM on 1 thread)",
                    "value": row["chunks_per_s"], "unit": f"chunks/s ({row['ratio_to_encoder_alone']:.2f}× the encoder alone)"})
    for row in by_part.get("query", []):
        if row["chunks"]:
            out.append({"name": f"guard Index.search p50 / p99 at {row['chunks']:,} chunks", "value": row["query_p50_ms"],
                        "unit": f"ms p50, {row['query_p99_ms']:.2f} ms p99 ({row['p50_speedup_vs_exact']:.1f}× faster than exact numpy)"})
    embedding = next((row["query_p50_ms"] for row in by_part.get("query", []) if not row["chunks"]), None)
    for row in by_part.get("step", []):
        if row["policy"] != BASELINE:
            floor = f"; {row['added_p50_ms'] / embedding:.2f}× one query embedding" if embedding else ""
            out.append({"name": f"{row['policy']} over passthrough", "value": row["added_p50_ms"],
                        "unit": f"ms added p50, {row['added_cpu_ms']:.2f} ms CPU added ({row['p50_ratio_to_passthrough']:.1f}× "
                                f"passthrough p50{floor})"})
    return out


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="guard-retrieval-bench-"))
    result = {
        "benchmark": "retrieval",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python -m benchmarks.retrieval", *sys.argv[1:]]),
        "machine": _machine(),
        "baseline": "ann and query: exact search in numpy over the same vectors; build: the encoder alone on the same "
                    "chunks; step: the passthrough policy through the same guard",
        "data": "ann/query: synthetic unit vectors (384-d topic/sub-topic/noise mixture; hard: 10th neighbour nearly as "
                "similar as the 1st); build/step: generated product manuals (real text, MiniLM embeddings)",
        "method": {"hnsw": {"M": M, "ef_construction": EF_CONSTRUCTION, "ef_search": EF_SEARCH}, "build_threads": BUILD_THREADS,
                   "query_threads": 1, "k": K, "smoke": args.smoke},
        "rows": [], "skipped": [],
    }
    timings = {}
    big_index = None
    manuals_index = None
    if "ann" in args.only:
        for size in args.sizes:
            began = time.perf_counter()
            rows, skipped = compare_ann(size, args.queries, workdir)
            result["rows"] += rows
            result["skipped"] = sorted(set(result["skipped"]) | set(skipped))
            timings[f"ann-{size}"] = time.perf_counter() - began
            print(f"ann {size}: done in {timings[f'ann-{size}']:.0f} s", flush=True)
    if "build" in args.only or "step" in args.only:
        began = time.perf_counter()
        row = measure_build(args.documents, workdir)
        manuals_index = str(workdir / "manuals.index")
        result["rows"].append(row)
        timings["build"] = time.perf_counter() - began
        print(f"build: {row['chunks']} chunks at {row['chunks_per_s']:.0f} chunks/s", flush=True)
    if "query" in args.only or "step" in args.only:
        began = time.perf_counter()
        for size in args.sizes:
            row, path = measure_query(size, workdir)
            result["rows"].append(row)
            if size == max(args.sizes):
                big_index = str(path)
        result["rows"].append(measure_query_embedding(args.queries))
        timings["query"] = time.perf_counter() - began
        print("query: done", flush=True)
    if "step" in args.only:
        began = time.perf_counter()
        policies = step_policies(manuals_index, big_index if max(args.sizes) >= 100_000 else None)
        rows, extra = asyncio.run(measure_step(policies, args.rounds, args.requests, workdir))
        result["rows"] += rows
        result.update(extra)
        timings["step"] = time.perf_counter() - began
    result["seconds"] = timings
    result["headlines"] = headlines(result["rows"])
    return result


def table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items() if v is not None}
        lines.append("  ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["ann", "build", "query", "step"], default=["ann", "build", "query", "step"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000], help="chunks in the ann and query parts")
    parser.add_argument("--queries", type=int, default=300, help="timed queries per size")
    parser.add_argument("--documents", type=int, default=200, help="generated manuals for the build and step parts (~10 chunks each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=40, help="timed calls per policy per round")
    parser.add_argument("--smoke", action="store_true", help="2,000 chunks, 20 manuals, 1 round of 10 calls: seconds, for CI")
    parser.add_argument("--out", type=Path, default=RESULTS / "retrieval.json")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.queries, args.documents, args.rounds, args.requests = [2000], 50, 20, 1, 10
    result = run(args)
    print(table(result["rows"]))
    for headline in result["headlines"]:
        print(f"{headline['name']}: {headline['value']:.2f} {headline['unit']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_rounded(result), indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
