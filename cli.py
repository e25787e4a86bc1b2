"""`sluice`: one command for every Sluice process.

sluice api | worker | ingestion   run one process (configured by SLUICE_* variables)
sluice ingest PATH...        send files/folders (.txt .md .html .pdf) to ingestion
sluice up                    the whole stack on this machine (what `make run` does)
sluice down                  stop what `sluice up` started
sluice model prepare         convert the bundled default model once
sluice cost report [--window 1h]   fleet cost, monthly projections, recommendations
sluice eval retrieval FILE   recall@k, MRR, nDCG@10 of retrieval on labelled queries
sluice bench [NAME]          benchmarks: serving (default), engines, precision, prefix, kv,
                             rag, cost (see docs/BENCHMARKS.md; `sluice bench NAME --help`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

RUN_DIR = Path(".run")
SAMPLES = Path(__file__).resolve().parent / "data"
CURL_EXAMPLE = """\
curl -N {url}/generate -H 'content-type: application/json' \\
  -d '{{"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0, "stream": true}}'"""  # noqa: E501
RAG_EXAMPLE = """\
curl -N {url}/rag-generate -H 'content-type: application/json' \\
  -d '{{"query": "How does a worker decide when to commit a Kafka offset?", "stream": true}}'"""


def _up(args: argparse.Namespace) -> None:
    from shared import devstack
    from shared.models import prepare_default_model
    from shared.settings import Settings

    settings = Settings()
    prepare_default_model(settings)
    RUN_DIR.mkdir(exist_ok=True)
    services = {}
    kafka_host, kafka_port = devstack.host_port(settings.kafka, 9092)
    if not devstack.port_open(kafka_host, kafka_port):
        services["broker"] = devstack.start_broker(kafka_port, RUN_DIR / "broker.log")
    redis_host, redis_port = devstack.host_port(settings.redis, 6379)
    if not devstack.port_open(redis_host, redis_port):
        services["redis"] = devstack.start_redis(redis_port, RUN_DIR / "redis.log")
    if settings.vector_store == "milvus" and settings.milvus_uri.startswith("http"):
        milvus_host, milvus_port = devstack.host_port(settings.milvus_uri, 19530)
        if not devstack.port_open(milvus_host, milvus_port):
            services["milvus"] = devstack.start_milvus(
                milvus_port, settings.milvus_data_dir, RUN_DIR / "milvus.log"
            )
    stack = devstack.LocalStack(settings, RUN_DIR)
    stack.start_worker()
    stack.start_ingestion()
    stack.start_api()
    everything = [*services.values(), *stack.processes()]
    (RUN_DIR / "pids.json").write_text(json.dumps([os.getpid(), *(p.pid for p in everything)]))

    def shutdown(*_: object) -> None:
        print("\nstopping everything started here")
        stack.stop()
        for proc in reversed(services.values()):
            devstack.stop(proc)
        (RUN_DIR / "pids.json").unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    started = ", ".join([*services, "worker", "ingestion", "API"])
    print(f"starting {started} (logs in {RUN_DIR}/); the engine takes ~1-2 min on CPU")
    try:
        stack.wait_ready()
    except (RuntimeError, TimeoutError) as e:
        print(e)
        shutdown()
    _ingest_samples(settings)
    print(f"\nSluice is ready at {stack.url}\n\n{CURL_EXAMPLE.format(url=stack.url)}\n")
    print(f"Ask the sample documents (data/):\n\n{RAG_EXAMPLE.format(url=stack.url)}\n")
    print("Ctrl-C (or `make stop`) stops everything started here.")
    while all(p.poll() is None for p in everything):
        time.sleep(1)
    print(f"a process exited; see the logs in {RUN_DIR}/")
    shutdown()


def _ingest_samples(settings: object) -> None:
    """The sample documents, so a new user can ask a question right away (unchanged ones
    cost nothing on a second `make run`)."""
    import asyncio

    from ingestion.submit import submit

    print("ingesting the sample documents in data/")
    asyncio.run(submit(settings, [SAMPLES], wait_s=120))  # type: ignore[arg-type]


def _down(args: argparse.Namespace) -> None:
    pids_file = RUN_DIR / "pids.json"
    if not pids_file.exists():
        print("nothing to stop")
        return
    supervisor, *children = json.loads(pids_file.read_text())
    try:
        # The supervisor stops its children in order and removes the pid file.
        os.kill(supervisor, signal.SIGTERM)
        print("stopping the stack started by `sluice up`")
        return
    except ProcessLookupError:
        pass
    for pid in children:  # the supervisor is gone: stop what it left behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    pids_file.unlink()
    print(f"stopped {len(children)} processes")


def _model(args: argparse.Namespace) -> None:
    import logging

    from shared.models import model_path, prepare_default_model
    from shared.settings import Settings

    logging.basicConfig(level=logging.INFO)
    settings = Settings()
    prepare_default_model(settings)
    print(model_path(settings))


def _api(args: argparse.Namespace) -> None:
    from api.app import main

    main()


def _worker(args: argparse.Namespace) -> None:
    from workers.main import main

    main()


def _ingestion(args: argparse.Namespace) -> None:
    from ingestion.main import main

    main()


def _ingest(args: argparse.Namespace) -> None:
    import asyncio

    from ingestion.submit import submit
    from shared.settings import Settings

    statuses = asyncio.run(submit(Settings(), args.paths, wait_s=args.wait))
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no files")
    if counts.get("failed"):
        sys.exit(1)


def _cost(args: argparse.Namespace) -> None:
    import asyncio

    from shared import cost
    from shared import redis as sredis
    from shared.settings import Settings

    settings = Settings()
    try:
        window_s = cost.parse_window(args.window)
    except ValueError as e:
        sys.exit(f"--window {e}")

    async def read() -> cost.CostReport:
        redis = sredis.connect(settings)
        try:
            return await cost.report(redis, settings, window_s)
        finally:
            await redis.aclose()

    report = asyncio.run(read())
    print(report.model_dump_json(indent=2) if args.json else cost.render(report))


BENCHMARKS = ("serving", "engines", "precision", "prefix", "kv", "rag", "cost")


def _bench(args: argparse.Namespace) -> None:
    import importlib

    rest = args.rest
    name = rest.pop(0) if rest and rest[0] in BENCHMARKS else "serving"
    importlib.import_module(f"bench.{name}").main(rest)


def _eval(args: argparse.Namespace) -> None:
    from bench.retrieval import main

    if not args.rest or args.rest[0] != "retrieval":
        sys.exit("usage: sluice eval retrieval FILE.jsonl [--modes ...] [--out F.json]")
    main(args.rest[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="run the HTTP API").set_defaults(fn=_api)
    sub.add_parser("worker", help="run a worker (Kafka -> vLLM -> Redis)").set_defaults(fn=_worker)
    sub.add_parser("ingestion", help="run the ingestion consumer").set_defaults(fn=_ingestion)
    ingest = sub.add_parser("ingest", help="send files or folders to ingestion")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument(
        "--wait", type=float, default=300.0, help="seconds to wait for indexing (0: do not wait)"
    )
    ingest.set_defaults(fn=_ingest)
    sub.add_parser("up", help="run the whole stack locally").set_defaults(fn=_up)
    sub.add_parser("down", help="stop what `sluice up` started").set_defaults(fn=_down)
    model = sub.add_parser("model", help="model preparation")
    model.add_argument("action", choices=["prepare"])
    model.set_defaults(fn=_model)
    # The benchmark parses its own options (`sluice bench --help`).
    cost_cmd = sub.add_parser("cost", help="cost report from the fleet's usage ledger")
    cost_cmd.add_argument("what", choices=["report"])
    cost_cmd.add_argument("--window", default="1h", help="15m, 1h, 24h, 7d (default 1h)")
    cost_cmd.add_argument("--json", action="store_true", help="the GET /cost JSON")
    cost_cmd.set_defaults(fn=_cost)
    sub.add_parser("bench", help="serving benchmark", add_help=False).set_defaults(fn=_bench)
    sub.add_parser("eval", help="retrieval evaluation", add_help=False).set_defaults(fn=_eval)
    args, rest = parser.parse_known_args(argv)
    if rest and args.fn not in (_bench, _eval):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.fn(args)


if __name__ == "__main__":
    main()
