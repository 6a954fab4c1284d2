"""The `guard` command: serve, ask, health, policy check|schema, keys new|hash|check, filter train, model prepare,
audit query|summary|export, export preferences, reward train, index build|query."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path

from guard.settings import Settings

DEFAULT_TARGET = os.environ.get("GUARD_TARGET", "127.0.0.1:50051")


def _serve(args: argparse.Namespace) -> int:
    from guard import workers

    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        http_port=args.http_port,
        api_keys=args.api_keys,
        allow_policies=args.allow_policies.split(",") if args.allow_policies else None,
        policies=args.policies,
        default_policy=args.default_policy,
        upstream=args.upstream or None,
        model=args.model,
        vllm_model_dir=args.vllm_model_dir,
        vllm_max_model_len=args.vllm_max_model_len,
        grace_seconds=args.grace,
        max_in_flight=args.max_in_flight,
        log_level=args.log_level,
        torch_threads=args.torch_threads,
        workers=args.workers,
        audit_db=args.audit_db,
        audit_max_age_days=args.audit_max_age_days,
        audit_max_megabytes=args.audit_max_megabytes,
    )
    # Workers share the log: each line says whose it is.
    index = workers.worker_index()
    who = f" [worker {index} pid %(process)d]" if index is not None else ""
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
    try:
        if settings.workers < 1:
            raise RuntimeError(f"--workers must be 1 or more, not {settings.workers}")
        if settings.workers > 1:
            return workers.supervise(settings)
        import uvloop

        from guard.app import serve

        # uvloop: a fifth less CPU per request than asyncio's own loop (benchmarks/proxy_cost.py).
        uvloop.run(serve(settings))
    except RuntimeError as exc:  # a startup failure guard explains itself (a port in use, no model, ...)
        logging.getLogger("guard").error("cannot start: %s", exc)
        return 1
    return 0


def _ask(args: argparse.Namespace) -> int:
    import grpc

    from guard.client import Answer, GuardClient

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    conversation = [("system", args.system)] if args.system else []
    request = prompt if args.raw else [*conversation, ("user", prompt)]
    options = dict(
        policy=args.policy,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        trace=args.trace,
        timeout=args.timeout,
    )
    try:
        with GuardClient(args.target, api_key=args.api_key, **_tls(args)) as client:
            if args.stream:
                answer = None
                for event in client.stream(request, **options):
                    if isinstance(event, Answer):
                        answer = event
                    else:
                        print(event, end="", flush=True)
                print()
            else:
                answer = client.generate(request, **options)
                print(answer.text)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    assert answer is not None
    status = "refused" if answer.refused else answer.finish_reason
    print(
        f"[policy {answer.policy}@{answer.policy_version} | {status} | "
        f"tokens {answer.prompt_tokens}+{answer.completion_tokens}]",
        file=sys.stderr,
    )
    for source in answer.sources:
        cited = "  cited" if source.cited else ""
        print(f"[{source.number}] {source.id}  {source.score:.3f}{cited}", file=sys.stderr)
    if args.trace:
        print(json.dumps(answer.trace, indent=2), file=sys.stderr)
    return 0


def _tls(args: argparse.Namespace) -> dict:
    return {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def _client_tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-ca", default=os.environ.get("GUARD_TLS_CA"), help="talk TLS, trusting this CA (PEM) [GUARD_TLS_CA]")
    parser.add_argument("--tls-cert", default=os.environ.get("GUARD_TLS_CLIENT_CERT"), help="client certificate for mTLS [GUARD_TLS_CLIENT_CERT]")
    parser.add_argument("--tls-key", default=os.environ.get("GUARD_TLS_CLIENT_KEY"), help="its private key [GUARD_TLS_CLIENT_KEY]")


def _policies(args: argparse.Namespace) -> int:
    import grpc

    from guard.client import GuardClient

    try:
        with GuardClient(args.target, api_key=args.api_key, **_tls(args)) as client:
            policies = client.list_policies(timeout=10)
            errors = client.policy_load_errors(timeout=10)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    for policy in policies:
        print(f"{policy.name:20} {policy.version}  model: {policy.model}  steps: {', '.join(policy.steps) or '-'}")
    for issues in errors.values():
        for issue in issues:
            print(f"rejected  {issue}", file=sys.stderr)
    return 1 if errors else 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from guard.client import open_channel

    deadline = time.monotonic() + args.wait
    with open_channel(args.target, **_tls(args)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                name = exc.code().name
            if name == "SERVING" or time.monotonic() >= deadline:
                print(name)
                return 0 if name == "SERVING" else 1
            time.sleep(1)


def _policy_check(args: argparse.Namespace) -> int:
    from guard.pipeline.base import StepDeps
    from guard.pipeline.runner import Pipelines
    from guard.policy.loader import load_policy_dir
    from guard.retrieval.registry import Indexes
    from guard.safety.embedder import Embedders
    from guard.upstream.adapters import check_adapter_path

    # Build every pipeline as the server would (rules compiled, artefacts and indexes loaded), without an upstream:
    # a declared adapter's directory is checked, not whether vLLM serves it.
    pipelines = Pipelines(StepDeps(upstream=None, embedders=Embedders(), indexes=Indexes()))  # type: ignore[arg-type]

    def build(loaded):
        check_adapter_path(loaded)
        return pipelines.build(loaded)

    result = load_policy_dir(Path(args.directory), build=build)
    for loaded in sorted(result.policies.values(), key=lambda p: p.policy.name):
        adapter = f"  adapter: {loaded.policy.adapter.name}" if loaded.policy.adapter else ""
        print(f"ok     {loaded.source}  {loaded.policy.name}@{loaded.version}  steps: {', '.join(s.type for s in loaded.policy.steps) or '-'}{adapter}")
    for error in result.errors.values():
        print(f"error  {error}", file=sys.stderr)
    if not result.policies and not result.errors:
        print(f"error  {args.directory}: no *.yaml policy files", file=sys.stderr)
        return 1
    return 1 if result.errors else 0


def _filter_train(args: argparse.Namespace) -> int:
    from guard.safety.train import save, train

    logging.basicConfig(level="WARNING")
    trained = train(
        [Path(p) for p in args.data],
        head=args.head,
        encoder=args.encoder,
        target_fpr=args.target_fpr,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        finetune_layers=args.finetune_layers,
        epochs=args.epochs,
        encoder_layers=args.encoder_layers,
    )
    save(trained, Path(args.output))
    artefact = trained.artefact
    validation = artefact.training["validation"]
    print(f"wrote {args.output}: head {artefact.training['head']}, threshold {artefact.threshold:.4f}")
    for label in ("harmful", "benign", "borderline"):
        if f"n_{label}" in validation:
            print(f"  validation {label:10s} refused {validation[f'refused_{label}']:6.1%} of {validation[f'n_{label}']}")
    return 0


def _reward_train(args: argparse.Namespace) -> int:
    from guard.alignment.preferences import read_pairs
    from guard.alignment.reward_training import train_head, train_sequence_classifier

    logging.basicConfig(level="WARNING")
    try:
        pairs = read_pairs(Path(args.pairs))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not pairs:
        print(f"error: {args.pairs}: no preference pairs (guard export preferences writes them from feedback)", file=sys.stderr)
        return 1
    if args.kind == "head":
        report = train_head(pairs, Path(args.out), encoder=args.encoder, heldout_fraction=args.heldout, seed=args.seed)
        use = f"reward: {{type: trained, path: {args.out}}}"
    else:
        if args.base is None:
            print("error: --kind sequence-classifier needs --base MODEL_DIR", file=sys.stderr)
            return 2
        report = train_sequence_classifier(
            pairs, Path(args.base), Path(args.out), epochs=args.epochs, learning_rate=args.learning_rate,
            heldout_fraction=args.heldout, seed=args.seed,
        )
        use = f"reward: {{type: sequence_classifier, path: {args.out}}}"
    held = "n/a (no held-out prompts)" if report.heldout_accuracy is None else f"{report.heldout_accuracy:.1%}"
    print(
        f"wrote {args.out} in {report.seconds:.1f} s: {report.train_pairs} training pairs, {report.heldout_pairs} held out\n"
        f"  pairwise accuracy: training {report.train_accuracy:.1%}, held out {held}\n"
        f"  in a best_of_n step: {use}"
    )
    return 0


def _policy_schema(args: argparse.Namespace) -> int:
    from guard.policy.schema import policy_schema_text

    text = policy_schema_text()
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _model_prepare(args: argparse.Namespace) -> int:
    from guard.upstream.default_model import prepare_default_model

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(message)s")
    started = time.perf_counter()
    path = prepare_default_model(Path(args.cache_dir) if args.cache_dir else None)
    print(f"{path}  ({time.perf_counter() - started:.0f}s)")
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    from guard.access import hash_key, new_key

    key = new_key()
    # The key goes to stdout once, for the client; only its hash belongs in the key file.
    print(key)
    print(f"# add under keys: in the API key file (the key itself is not stored):\n"
          f"- {{name: {args.name}, tenant: {args.tenant}, sha256: {hash_key(key)}}}", file=sys.stderr)
    return 0


def _keys_hash(args: argparse.Namespace) -> int:
    from guard.access import hash_key

    key = sys.stdin.readline().strip()
    if not key:
        print("error: no key on stdin", file=sys.stderr)
        return 1
    print(hash_key(key))
    return 0


def _keys_check(args: argparse.Namespace) -> int:
    from guard.access.keys import load_key_file
    from guard.policy.loader import PolicyError

    try:
        config = load_key_file(Path(args.file))
    except PolicyError as exc:
        print(f"error  {exc}", file=sys.stderr)
        return 1
    for tenant in config.tenants:
        keys = sum(1 for key in config.keys if key.tenant == tenant.name)
        print(f"ok     tenant {tenant.name}: {keys} keys, policies {', '.join(tenant.policies)}")
    return 0


def _audit_command(command):
    """A `guard audit` command whose expected failures (no database, a bad --since) print one line and exit 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


def _audit_store(args: argparse.Namespace):
    from guard.audit import SQLiteAuditStore

    if not args.db:
        raise ValueError("no audit database: pass --db PATH (or set GUARD_AUDIT_DB)")
    return SQLiteAuditStore(Path(args.db))


def _audit_query_of(args: argparse.Namespace, **fields):
    from guard.audit import AuditQuery
    from guard.audit.report import parse_time

    return AuditQuery(
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        **fields,
    )


@_audit_command
def _audit_query(args: argparse.Namespace) -> int:
    from guard.audit.report import print_records, write_jsonl

    query = _audit_query_of(
        args,
        policy=args.policy,
        rule=args.rule,
        outcome=args.outcome,
        status=args.status,
        request_id=args.request_id,
        tenant=args.tenant,
        limit=args.limit,
    )
    records = _audit_store(args).query(query)
    if args.json:
        write_jsonl(records, sys.stdout.buffer)
    else:
        print_records(records, sys.stdout)
    return 0


@_audit_command
def _audit_summary(args: argparse.Namespace) -> int:
    from guard.audit.report import parse_time, plot_summary, print_summary, summarize

    summary = summarize(_audit_store(args), parse_time(args.since), parse_time(args.until) if args.until else None)
    print_summary(summary, sys.stdout)
    if args.png:
        plot_summary(summary, Path(args.png))
        print(f"\nwrote {args.png}")
    return 0


@_audit_command
def _audit_export(args: argparse.Namespace) -> int:
    from guard.audit.report import write_jsonl

    records = _audit_store(args).query(_audit_query_of(args, newest_first=False))
    if args.jsonl == "-":
        count = write_jsonl(records, sys.stdout.buffer)
    else:
        with open(args.jsonl, "wb") as out:
            count = write_jsonl(records, out)
    print(f"exported {count} records", file=sys.stderr)
    return 0


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


@_audit_command
def _export_preferences(args: argparse.Namespace) -> int:
    from guard.alignment.export import SOURCES, export_preferences
    from guard.audit.report import parse_time

    if args.heldout and not args.heldout_out:
        raise ValueError("--heldout needs --heldout-out FILE for the held-out pairs")
    report = export_preferences(
        _audit_store(args),
        Path(args.out),
        heldout=args.heldout,
        heldout_out=Path(args.heldout_out) if args.heldout_out else None,
        policy=args.policy,
        since=parse_time(args.since) if args.since else None,
        until=parse_time(args.until) if args.until else None,
        tenant=args.tenant,
        from_rewards=args.from_rewards,
        corrections_of_refusals=args.corrections_of_refusals,
        seed=args.seed,
    )
    held = f" ({report.heldout_written} held out to {args.heldout_out})" if args.heldout_out else ""
    print(f"wrote {_count(report.pairs_written, 'pair')} to {args.out}{held} from {_count(report.records, 'record')}")
    for source in SOURCES:
        print(f"  {source:11} {report.by_source[source]:6d}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped: {count} {reason}")
    if not report.pairs:
        print(
            "error: no preference pairs: no feedback with a preferred_index, a correction or ratings that differ for the "
            "same prompt in these records (--from-rewards MARGIN adds pairs from best_of_n reward scores)",
            file=sys.stderr,
        )
        return 1
    return 0


def _index_build(args: argparse.Namespace) -> int:
    from guard.retrieval.build import build_index
    from guard.retrieval.chunking import ChunkingParams

    logging.basicConfig(level="WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def progress(done: int, total: int) -> None:
        print(f"\rembedding chunks: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        params = ChunkingParams(max_words=args.max_words, overlap_words=args.overlap_words)
        report = build_index(args.documents, args.out, encoder=args.encoder, params=params, progress=progress)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = sum(report.seconds.values())
    phases = ", ".join(f"{name} {value:.1f} s" for name, value in report.seconds.items())
    print(
        f"wrote {report.path}: {_count(report.chunks, 'chunk')} from {_count(report.documents, 'document')} in "
        f"{seconds:.1f} s ({report.chunks_per_second:.0f} chunks/s; {phases})"
    )
    if not report.chunks:
        print(f"error: {args.documents}: no text in any .md, .markdown, .txt or .pdf file", file=sys.stderr)
        return 1
    return 0


def _index_query(args: argparse.Namespace) -> int:
    from guard.retrieval.index import BrokenIndex, load_index
    from guard.safety.embedder import Embedder

    logging.basicConfig(level="WARNING")
    try:
        index = load_index(args.index)
    except BrokenIndex as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    [vector] = Embedder(index.encoder).encode([args.text])
    hits = index.search(vector, args.k)
    if args.json:
        for hit in hits:
            print(json.dumps({"id": hit.id, "score": round(hit.score, 4), "document": hit.document, "heading": hit.heading, "text": hit.text}))
        return 0
    print(f"{index.path} (version {index.version}, {_count(len(index), 'chunk')})")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank}. {hit.score:.3f}  {hit.id}  ({hit.heading})")
        print(f"   {hit.text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard", description="Inference-time alignment proxy in front of vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server (starts a local vLLM unless --upstream is given)")
    serve.add_argument("--host", help="listen address [GUARD_HOST, 127.0.0.1]")
    serve.add_argument("--port", type=int, help="gRPC port [GUARD_PORT, 50051]")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port, 0 = off [GUARD_METRICS_PORT, 9464]")
    serve.add_argument("--metrics-host", help="/metrics listen address [GUARD_METRICS_HOST; default: --host]")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate: TLS on both doors [GUARD_TLS_CERT]")
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert [GUARD_TLS_KEY]")
    serve.add_argument("--tls-client-ca", type=Path, help="PEM CA: clients must present a certificate it signed (mTLS) [GUARD_TLS_CLIENT_CA]")
    serve.add_argument("--http-port", type=int, help="OpenAI-compatible HTTP port, -1 = off [GUARD_HTTP_PORT, 8080]")
    serve.add_argument("--api-keys", type=Path, help="API key file (tenants, key hashes), hot-reloaded [GUARD_API_KEYS; unset: open]")
    serve.add_argument(
        "--allow-policies", help="without an API key file: the only policies callers may use, comma-separated [GUARD_ALLOW_POLICIES]"
    )
    serve.add_argument("--policies", type=Path, help="policy directory, hot-reloaded [GUARD_POLICIES, ./policies]")
    serve.add_argument("--default-policy", help="policy for requests that name none [GUARD_DEFAULT_POLICY, default]")
    serve.add_argument(
        "--upstream", action="append", help="vLLM base URL, repeatable [GUARD_UPSTREAM, comma-separated]; none: managed local vLLM"
    )
    serve.add_argument("--model", help="served model name [GUARD_MODEL; default: the upstream's first]")
    serve.add_argument("--vllm-model-dir", help="model for the managed vLLM [GUARD_VLLM_MODEL_DIR; default: bundled Gemma 3 270M]")
    serve.add_argument("--vllm-max-model-len", type=int, help="context length for the managed vLLM [2048]")
    serve.add_argument("--grace", type=float, help="seconds in-flight calls get on shutdown [GUARD_GRACE_SECONDS, 10]")
    serve.add_argument(
        "--max-in-flight", type=int, help="requests generating at once, both doors; more get 429 at once, 0 = no bound [512]"
    )
    serve.add_argument("--log-level", help="[GUARD_LOG_LEVEL, INFO]")
    serve.add_argument("--torch-threads", type=int, help="threads for in-process models [GUARD_TORCH_THREADS, 1]")
    serve.add_argument(
        "--workers", type=int, help="processes sharing the gRPC and HTTP ports, under a supervisor that serves /metrics [GUARD_WORKERS, 1]"
    )
    serve.add_argument("--audit-db", type=Path, help="audit log: SQLite file, one record per request [GUARD_AUDIT_DB; unset: off]")
    serve.add_argument("--audit-max-age-days", type=float, help="delete audit records older than this, 0 = keep [30]")
    serve.add_argument("--audit-max-megabytes", type=int, help="delete the oldest audit records beyond this size, 0 = no limit [1024]")
    serve.set_defaults(func=_serve)

    ask = commands.add_parser("ask", help="send one prompt through guard")
    ask.add_argument("prompt", help="the prompt, or - to read stdin")
    ask.add_argument("--target", default=DEFAULT_TARGET, help="guard address [GUARD_TARGET, 127.0.0.1:50051]")
    ask.add_argument("--policy", default="", help="policy name (default: the server's default policy)")
    ask.add_argument("--api-key", default=os.environ.get("GUARD_API_KEY"), help="API key [GUARD_API_KEY]")
    ask.add_argument("--system", help="client system message (chat mode)")
    ask.add_argument("--raw", action="store_true", help="send as a raw completion prompt instead of a chat message")
    ask.add_argument("--stream", action="store_true", help="print text as it arrives")
    ask.add_argument("--trace", action="store_true", help="print the steps applied, with timings")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--top-p", type=float)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds [300]")
    _client_tls_flags(ask)
    ask.set_defaults(func=_ask)

    listed = commands.add_parser("policies", help="the policies a server serves, and files it rejected (exit 1 if any)")
    listed.add_argument("--target", default=DEFAULT_TARGET)
    listed.add_argument("--api-key", default=os.environ.get("GUARD_API_KEY"), help="API key [GUARD_API_KEY]")
    _client_tls_flags(listed)
    listed.set_defaults(func=_policies)

    health = commands.add_parser("health", help="print the server's health status (exit 0 when SERVING)")
    health.add_argument("--target", default=DEFAULT_TARGET)
    health.add_argument("--wait", type=float, default=0.0, help="keep polling up to this many seconds until SERVING")
    _client_tls_flags(health)
    health.set_defaults(func=_health)

    policy = commands.add_parser("policy", help="work with policy files offline").add_subparsers(dest="policy_command", required=True)
    check = policy.add_parser("check", help="validate every policy in a directory (exit 1 on any error)")
    check.add_argument("directory")
    check.set_defaults(func=_policy_check)
    schema = policy.add_parser("schema", help="print the JSON Schema of the policy format")
    schema.add_argument("--output", "-o", help="write to this file instead of stdout")
    schema.set_defaults(func=_policy_schema)

    filters = commands.add_parser("filter", help="build filter artefacts").add_subparsers(dest="filter_command", required=True)
    train = filters.add_parser("train", help="train a classifier artefact from labelled JSONL prompt files")
    train.add_argument("data", nargs="+", help='JSONL files of {"text": ..., "label": "harmful"|"benign"|"borderline"}')
    train.add_argument("--output", "-o", required=True, help="artefact to write (JSON)")
    train.add_argument("--head", choices=["logistic", "mlp"], default="mlp")
    train.add_argument("--encoder", help="sentence-transformers model directory [bundled all-MiniLM-L6-v2]")
    train.add_argument("--target-fpr", type=float, default=0.04, help="most benign and borderline validation prompts refused [0.04]")
    train.add_argument("--validation-fraction", type=float, default=0.2)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--finetune-layers", type=int, default=0, help="also train the encoder's top N layers [0: frozen]")
    train.add_argument("--epochs", type=int, default=4, help="epochs when fine-tuning [4]")
    train.add_argument("--encoder-layers", type=int, help="run only the encoder's first N layers (faster) [all]")
    train.set_defaults(func=_filter_train)

    keys = commands.add_parser("keys", help="API keys for the key file").add_subparsers(dest="keys_command", required=True)
    new = keys.add_parser("new", help="print a new random key (stdout) and its key-file entry (stderr)")
    new.add_argument("--tenant", required=True)
    new.add_argument("--name", required=True, help="names the key in logs")
    new.set_defaults(func=_keys_new)
    hashed = keys.add_parser("hash", help="print the sha256 entry of a key read from stdin")
    hashed.set_defaults(func=_keys_hash)
    check = keys.add_parser("check", help="validate an API key file (exit 1 on error: file:line: path: reason)")
    check.add_argument("file")
    check.set_defaults(func=_keys_check)

    audit = commands.add_parser("audit", help="read the audit log (guard serve --audit-db)").add_subparsers(
        dest="audit_command", required=True
    )
    since_help = "from this long ago (30m, 1h, 7d) or this ISO date/time (UTC)"
    query = audit.add_parser("query", help="records matching every filter given, newest first")
    query.add_argument("--since", help=since_help)
    query.add_argument("--until", help="up to (ages or dates, as --since)")
    query.add_argument("--policy")
    query.add_argument("--rule", help="the rule that refused")
    query.add_argument("--outcome", choices=["ok", "refused", "error"])
    query.add_argument("--status", help="gRPC status name of a failure: CANCELLED, DEADLINE_EXCEEDED, UNAVAILABLE, ...")
    query.add_argument("--request-id")
    query.add_argument("--tenant")
    query.add_argument("--limit", type=int, default=50, help="[50]")
    query.add_argument("--json", action="store_true", help="whole records, one JSON object per line")
    query.set_defaults(func=_audit_query)
    summary = audit.add_parser("summary", help="refusal rates by policy and rule per day, top rules, fail-open events")
    summary.add_argument("--since", default="7d", help=since_help + " [7d]")
    summary.add_argument("--until", help="up to (ages or dates, as --since)")
    summary.add_argument("--png", help="also plot the refusal rates to this PNG file")
    summary.set_defaults(func=_audit_summary)
    export = audit.add_parser("export", help="every record (oldest first) as JSON lines")
    export.add_argument("--jsonl", required=True, help="output file, - for stdout")
    export.add_argument("--since", help=since_help)
    export.add_argument("--until", help="up to (ages or dates, as --since)")
    export.set_defaults(func=_audit_export)
    for command in (query, summary, export):
        command.add_argument("--db", default=os.environ.get("GUARD_AUDIT_DB"), help="the audit database [GUARD_AUDIT_DB]")

    exports = commands.add_parser("export", help="data from the audit log").add_subparsers(dest="export_command", required=True)
    preferences = exports.add_parser(
        "preferences", help="preference pairs (TRL's prompt/chosen/rejected JSON lines) from feedback on audited answers"
    )
    preferences.add_argument("--db", default=os.environ.get("GUARD_AUDIT_DB"), help="the audit database [GUARD_AUDIT_DB]")
    preferences.add_argument("--out", required=True, help="JSON lines of training pairs (what guard reward train --pairs reads)")
    preferences.add_argument("--heldout", type=float, default=0.0, help="share of prompts held out, e.g. 0.2 [0: none]")
    preferences.add_argument("--heldout-out", help="JSON lines of the held-out pairs (with --heldout)")
    preferences.add_argument("--policy", help="only requests this policy answered")
    preferences.add_argument("--tenant", help="only this tenant's requests")
    preferences.add_argument("--since", help=since_help)
    preferences.add_argument("--until", help="up to (ages or dates, as --since)")
    preferences.add_argument(
        "--from-rewards", type=float, metavar="MARGIN",
        help="also pair best_of_n candidates of requests without feedback: highest over lowest reward score, "
        "when they differ by at least MARGIN",
    )
    preferences.add_argument(
        "--corrections-of-refusals", action="store_true",
        help="also pair corrections of refused answers (left out by default: one may be the very text the policy refused)",
    )
    preferences.add_argument("--seed", type=int, default=0, help="of the held-out split [0]")
    preferences.set_defaults(func=_export_preferences)

    reward = commands.add_parser("reward", help="reward models from users' preferences").add_subparsers(
        dest="reward_command", required=True
    )
    trainer = reward.add_parser("train", help="train a reward model on preference pairs (Bradley-Terry) and report held-out accuracy")
    trainer.add_argument("--pairs", required=True, help="JSON lines of {prompt, chosen, rejected} (guard export preferences, or TRL's format)")
    trainer.add_argument("--out", required=True, help="head: a .json file; sequence-classifier: a directory")
    trainer.add_argument("--kind", choices=["head", "sequence-classifier"], default="head",
                         help="head: linear head on sentence embeddings (CPU, seconds); sequence-classifier: fine-tune --base [head]")
    trainer.add_argument("--base", help="sequence-classifier: local causal LM directory to fine-tune")
    trainer.add_argument("--encoder", help="head: sentence-transformers directory [bundled all-MiniLM-L6-v2]")
    trainer.add_argument("--heldout", type=float, default=0.2, help="share of prompts held out for the accuracy [0.2]")
    trainer.add_argument("--epochs", type=int, default=1, help="sequence-classifier [1]")
    trainer.add_argument("--learning-rate", type=float, default=1e-5, help="sequence-classifier [1e-5]")
    trainer.add_argument("--seed", type=int, default=0)
    trainer.set_defaults(func=_reward_train)

    model = commands.add_parser("model", help="manage the bundled default model").add_subparsers(dest="model_command", required=True)
    prepare = model.add_parser("prepare", help="convert the bundled Gemma 3 270M GGUF for vLLM (cached)")
    prepare.add_argument("--cache-dir", help="[GUARD_CACHE_DIR/models/gemma-3-270m]")
    prepare.set_defaults(func=_model_prepare)

    index = commands.add_parser("index", help="retrieval indexes of documents (a policy's retrieve step)").add_subparsers(
        dest="index_command", required=True
    )
    built = index.add_parser("build", help="chunk, embed and index the .md, .txt and .pdf files under a directory")
    built.add_argument("documents", help="directory of documents (read recursively; dotfiles skipped)")
    built.add_argument("-o", "--out", required=True, help="index directory to write (an existing index there is replaced)")
    built.add_argument("--encoder", help="sentence-transformers model directory [the bundled all-MiniLM-L6-v2]")
    built.add_argument("--max-words", type=int, default=120, help="most words in a chunk [120]")
    built.add_argument("--overlap-words", type=int, default=30, help="words a chunk repeats from the previous one [30]")
    built.set_defaults(func=_index_build)
    asked = index.add_parser("query", help="the chunks of an index most similar to a text, with scores and sources")
    asked.add_argument("index", help="index directory")
    asked.add_argument("text")
    asked.add_argument("-k", type=int, default=5, help="how many chunks [5]")
    asked.add_argument("--json", action="store_true", help="one JSON object per chunk")
    asked.set_defaults(func=_index_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
