"""`sluice`: one command for every Sluice process.

sluice api | worker | ingestion   run one process (configured by SLUICE_* variables);
                                  `worker --model NAME` joins that model's pool
sluice ingest PATH...        send files/folders (.txt .md .html .pdf) to ingestion
sluice up                    the whole stack on this machine (what `make run` does)
sluice down                  stop what `sluice up` started
sluice model prepare         convert the bundled default model once
sluice cost report [--window 1h]   fleet cost, monthly projections, recommendations
sluice keys create --tenant NAME [--rpm N] [--tpm N] | list | revoke KEY_ID   API keys
sluice batch submit FILE.jsonl [--wait] | collect [--ids F.ids] [--out F.jsonl]   batch jobs
sluice trace REQUEST_ID [--json]   every hop of one request: when and where it waited
sluice status [--json] [--watch [S]]   topics' lag, consumer groups, live workers, dead letters
sluice eval retrieval FILE   recall@k, MRR, nDCG@10 of retrieval on labelled queries
sluice bench [NAME]          benchmarks: serving (default), engines, precision, prefix, kv,
                             rag, cost, flood, priority, failover, first-step, affinity
                             (docs/BENCHMARKS.md; `sluice bench NAME --help`)
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from subprocess import Popen

    from redis.asyncio import Redis
    from rich.console import Group

    from shared.fleet import FleetStatus, Member
    from shared.settings import Settings

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
    from shared.supervisor import Supervisor

    settings = Settings()
    # Local mode: no API keys to create first, unless SLUICE_AUTH_ENABLED says otherwise.
    if "auth_enabled" not in settings.model_fields_set:
        settings = settings.model_copy(update={"auth_enabled": False})
    RUN_DIR.mkdir(exist_ok=True)
    services = _services_to_start(settings)
    _refuse_ports_in_use(settings, args.workers, services)
    prepare_default_model(settings)
    stack = devstack.LocalStack(settings, RUN_DIR)
    supervisor = Supervisor(RUN_DIR / "pids.json")

    def shutdown(*_: object) -> None:
        print("\nstopping everything started here")
        supervisor.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    for name, start in services.items():
        supervisor.add(name, start, vital=True)
    cores = os.cpu_count() or 1
    for i in range(args.workers):
        # Each its own metrics port and, with several, its own core (vLLM-CPU binds to core
        # 0 by default, so two engines would share one).
        env = {"SLUICE_WORKER_METRICS_PORT": str(settings.worker_metrics_port + i)}
        if args.workers > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(i % cores)
        log = RUN_DIR / f"worker-{i}.log"
        supervisor.add(f"worker-{i}", lambda log=log, env=env: stack.spawn("worker", log, env))
    supervisor.add("ingestion", lambda: stack.spawn("ingestion", RUN_DIR / "ingestion.log"))
    supervisor.add("API", lambda: stack.spawn("api", RUN_DIR / "api.log"), vital=True)
    started = ", ".join([*services, f"{args.workers} worker(s)", "ingestion", "API"])
    print(f"starting {started} (logs in {RUN_DIR}/); the engine takes ~1-2 min on CPU")
    deadline = time.monotonic() + 600
    while not stack.ready():
        if (gave_up := supervisor.check()) or time.monotonic() > deadline:
            print(f"{gave_up or 'the API'} did not come up; see the logs in {RUN_DIR}/")
            shutdown()
        time.sleep(0.5)
    _ingest_samples(settings)
    print(f"\nSluice is ready at {stack.url}\n\n{CURL_EXAMPLE.format(url=stack.url)}\n")
    if settings.auth_enabled:
        print("API keys are required (SLUICE_AUTH_ENABLED=true): `sluice keys create --tenant")
        print("NAME`, then add -H 'Authorization: Bearer <key>' to the examples.\n")
    else:
        print("Auth is off (local mode): set SLUICE_AUTH_ENABLED=true to require API keys.\n")
    print(f"Ask the sample documents (data/):\n\n{RAG_EXAMPLE.format(url=stack.url)}\n")
    print("Ctrl-C (or `make stop`) stops everything started here; a process that exits is")
    print("started again.", flush=True)
    while (gave_up := supervisor.check()) is None:
        time.sleep(0.5)
    print(f"{gave_up} keeps exiting; see the logs in {RUN_DIR}/")
    shutdown()


def _services_to_start(settings: Settings) -> dict[str, Callable[[], Popen[bytes]]]:
    """The broker, Redis and Milvus server the settings point at, where nothing listens yet
    (a Redis already running on loopback is used as it is)."""
    from shared import devstack

    services: dict[str, Callable[[], Popen[bytes]]] = {}
    kafka_host, kafka_port = devstack.host_port(settings.kafka, 9092)
    if not devstack.port_open(kafka_host, kafka_port):
        services["broker"] = lambda: devstack.start_broker(kafka_port, RUN_DIR / "broker.log")
    redis_host, redis_port = devstack.host_port(settings.redis, 6379)
    if not devstack.port_open(redis_host, redis_port):
        services["redis"] = lambda: devstack.start_redis(redis_port, RUN_DIR / "redis.log")
    if settings.vector_store == "milvus" and settings.milvus_uri.startswith("http"):
        milvus_host, milvus_port = devstack.host_port(settings.milvus_uri, 19530)
        if not devstack.port_open(milvus_host, milvus_port):
            data, log = settings.milvus_data_dir, RUN_DIR / "milvus.log"
            services["milvus"] = lambda: devstack.start_milvus(milvus_port, data, log)
    return services


def _refuse_ports_in_use(settings: Settings, workers: int, services: dict[str, object]) -> None:
    """Exit with one line if another `sluice up` runs or a port this stack listens on is
    taken, before anything starts (and before the pid file of a running stack is replaced)."""
    from shared import devstack
    from shared.supervisor import port_in_use, running_stack

    pids = RUN_DIR / "pids.json"
    if (other := running_stack(pids)) is not None:
        sys.exit(f"another `sluice up` (pid {other}) runs here: `make stop` or `sluice down` first")
    host = settings.metrics_host
    ports = [(settings.host, settings.port, "the API")]
    ports += [(host, settings.worker_metrics_port + i, f"worker {i}'s metrics")
              for i in range(workers)]  # fmt: skip
    ports.append((host, settings.ingestion_metrics_port, "ingestion's metrics"))
    for name, address, default in (("broker", settings.kafka, 9092),
                                   ("milvus", settings.milvus_uri, 19530)):  # fmt: skip
        if name in services:  # we start it: its port must be ours
            ports.append((*devstack.host_port(address, default), f"the {name}"))
    for host, port, what in ports:
        if port and (refusal := port_in_use(host, port, what, pids)):
            sys.exit(refusal)


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

    main(args.model)


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

    from shared import cost, ledger
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
            return await cost.report(ledger.Reader(redis, settings), settings, window_s)
        finally:
            await redis.aclose()

    report = asyncio.run(read())
    print(report.model_dump_json(indent=2) if args.json else cost.render(report))


def _redis_acl(args: argparse.Namespace) -> None:
    from shared import redis_acl
    from shared.settings import Settings

    passwords = {}
    for item in args.password_file:
        service, _, path = item.partition("=")
        if service not in redis_acl.SERVICES or not path:
            raise SystemExit(f"--password-file {item!r}: expected SERVICE=PATH, SERVICE one of "
                             f"{', '.join(redis_acl.SERVICES)}")  # fmt: skip
        passwords[service] = Path(path).read_text().strip()
    print(redis_acl.acl_file(Settings().redis_prefix, passwords), end="")


def _status(args: argparse.Namespace) -> None:
    import asyncio
    import time

    from rich.console import Console
    from rich.live import Live

    from shared import fleet
    from shared import redis as sredis
    from shared.settings import Settings

    settings = Settings()

    async def snapshot() -> fleet.FleetStatus:
        redis = sredis.connect(settings)
        try:
            return await fleet.snapshot(settings, redis)
        finally:
            await redis.aclose()

    def take() -> fleet.FleetStatus:
        try:
            return asyncio.run(snapshot())
        except Exception as e:  # one line for the operator, not a traceback
            sys.exit(f"cannot read the fleet (Kafka {settings.kafka}, Redis {settings.redis}): {e}")

    if args.json:
        print(take().model_dump_json(indent=2))
        return
    # Topic names are long: a pipe gets 160 columns rather than rich's 80, so none is cut.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    if not args.watch:
        console.print(_status_view(take()))
        return
    with Live(_status_view(take()), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(args.watch)
            live.update(_status_view(take()), refresh=True)


def _status_view(status: FleetStatus) -> Group:
    """`sluice status`'s tables: topics, workers, groups, dead letters."""
    from rich.console import Group
    from rich.table import Table

    topics = Table("topic", "kind", "group", "partition", "end", "committed", "lag", "oldest",
                   title="Topics (lag = end - committed: waiting or running; partitions never "
                   "written to are left out)")  # fmt: skip
    for t in status.topics:
        used = [p for p in t.partitions if p.end or p.lag]
        if not used:
            topics.add_row(t.topic, t.kind, t.group or "", f"all {len(t.partitions)}", "0")
        for p in used:
            age = "" if p.oldest_age_s is None else f"{p.oldest_age_s:.1f} s"
            committed = "-" if p.committed is None else str(p.committed)
            topics.add_row(t.topic, t.kind, t.group or "", str(p.partition), str(p.end),
                           committed, str(p.lag), age)  # fmt: skip
    workers = Table("worker", "model", "engine", "in flight", "lag", "partitions", "KV cache",
                    "tokens/s (1 min)", "heartbeat", title="Live workers")  # fmt: skip
    for w in status.workers:
        kv = "" if w.kv_cache_usage is None else f"{w.kv_cache_usage:.0%}"
        rate = "" if w.tokens_per_s is None else f"{w.tokens_per_s:.1f}"
        workers.add_row(w.worker_id, w.model, w.engine, str(w.in_flight), str(w.lag),
                        ",".join(map(str, w.partitions)), kv, rate,
                        f"{w.heartbeat_age_s:.1f} s ago")  # fmt: skip
    groups = Table("group", "state", "members and partitions", title="Consumer groups")
    for g in status.groups:
        members = "none" if g.members is None else "; ".join(map(_member, g.members))
        groups.add_row(g.group, g.state, members)
    dead = Table("dead-letter topic", "count", "last reasons", title="Dead letters")
    for d in status.dead_letters:
        dead.add_row(d.topic, str(d.count), " | ".join(d.last_reasons))
    return Group(topics, workers, groups, dead)


def _member(m: Member) -> str:
    # The dev broker returns no assignments: the workers' heartbeats list their partitions.
    held = ",".join(m.partitions) or "partitions not reported by the broker"
    return f"{m.client_id}{'@' + m.host if m.host else ''}: {held}"


def _trace(args: argparse.Namespace) -> None:
    import asyncio

    from redis.exceptions import RedisError

    from shared import redis as sredis
    from shared import tracing
    from shared.settings import Settings

    settings = Settings()

    async def read() -> list[dict]:
        redis = sredis.connect(settings)
        try:
            return await tracing.timeline(redis, settings, args.request_id)
        finally:
            await redis.aclose()

    try:
        hops = asyncio.run(read())
    except RedisError as e:
        sys.exit(f"cannot reach Redis at {settings.redis} (SLUICE_REDIS): {e}")
    print(json.dumps(hops, indent=2) if args.json else tracing.render(args.request_id, hops))
    if not hops:
        sys.exit(1)


def _keys(args: argparse.Namespace) -> None:
    import asyncio

    from pydantic import ValidationError
    from redis.exceptions import RedisError

    from shared import redis as sredis
    from shared.settings import Settings

    settings = Settings()

    async def run() -> None:
        redis = sredis.connect(settings)
        try:
            await _keys_action(args, redis, settings)
        finally:
            await redis.aclose()

    try:
        asyncio.run(run())
    except ValidationError as e:  # a tenant outside apikeys.TENANT_PATTERN, a negative limit
        error = e.errors()[0]
        sys.exit(f"invalid {error['loc'][0]}: {error['msg']}")
    except RedisError as e:
        sys.exit(f"cannot reach Redis at {settings.redis} (SLUICE_REDIS): {e}")


async def _keys_action(args: argparse.Namespace, redis: Redis, settings: Settings) -> None:
    from shared import apikeys

    if args.action == "create":
        key, record = await apikeys.create(
            redis, settings, args.tenant, args.rpm, args.tpm, admin=args.admin
        )
        if args.json:
            print(json.dumps({"key": key, **record.model_dump()}))
            return
        role = "admin" if record.admin else "tenant"
        print(f"key_id  {record.key_id}\ntenant  {record.tenant}\nrole    {role}\nkey     {key}")
        print("\nThe key is shown only now (Sluice keeps its hash): store it somewhere safe.")
        if not settings.auth_enabled:
            print("Note: SLUICE_AUTH_ENABLED is false here, so the API does not ask for keys.")
    elif args.action == "list":
        records = await apikeys.list_keys(redis, settings)
        if args.json:
            print(json.dumps([r.model_dump() for r in records]))
            return
        print(f"{'KEY_ID':14}{'TENANT':22}{'CREATED':21}{'RPM':>9}{'TPM':>9}  ROLE    STATE")
        for r in records:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
            rpm, tpm = (
                "default" if v is None else str(v) for v in (r.requests_per_min, r.tokens_per_min)
            )
            state = "revoked" if r.revoked else "active"
            role = "admin" if r.admin else "tenant"
            print(f"{r.key_id:14}{r.tenant:22}{created:21}{rpm:>9}{tpm:>9}  {role:8}{state}")
    else:
        record = await apikeys.revoke(redis, settings, args.key_id)
        if record is None:
            sys.exit(f"no API key {args.key_id!r}")
        print(f"revoked {record.key_id} (tenant {record.tenant})")


BENCHMARKS = (
    "serving", "engines", "precision", "prefix", "kv", "rag", "cost", "flood", "priority",
    "failover", "first-step", "affinity",
)  # fmt: skip


def _bench(args: argparse.Namespace) -> None:
    import importlib

    rest = args.rest
    name = rest.pop(0) if rest and rest[0] in BENCHMARKS else "serving"
    importlib.import_module(f"bench.{name.replace('-', '_')}").main(rest)


def _batch(args: argparse.Namespace) -> None:
    import asyncio

    from shared import batch
    from shared.settings import Settings

    settings = Settings()
    if args.action == "submit":
        api_key = settings.api_key.get_secret_value() if settings.api_key else None
        if api_key and args.tenant is None:
            sys.exit("--tenant: the key's tenant (its results are on its own topic, docs/BATCH.md)")
        try:
            requests = batch.read_requests(args.file, settings, args.tenant)
        except ValueError as e:
            sys.exit(str(e))
        asyncio.run(batch.submit(settings, requests, api_key))
        ids = [r.request_id for r in requests]
        ids_file = args.file.with_suffix(".ids")
        ids_file.write_text("".join(f"{i}\n" for i in ids))
        print(f"submitted {len(ids)} to {settings.batch_requests_topic}; ids in {ids_file}")
        if not args.wait:
            return
        out = args.out or args.file.with_suffix(".results.jsonl")
    else:
        ids = args.ids.read_text().split() if args.ids else None
        out = args.out
    results = asyncio.run(batch.collect(settings, ids, args.timeout, args.tenant))
    batch.write_results(results, ids, out)
    if out is not None:
        print(f"{len(results)} results in {out}")
    if ids is not None and len(results) < len(ids):
        missing = len(ids) - len(results)
        sys.exit(f"{missing} of {len(ids)} results missing after {args.timeout:g} s")


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
    worker = sub.add_parser("worker", help="run a worker (Kafka -> vLLM -> Redis)")
    worker.add_argument(
        "--model", help="serve this model of the catalog (SLUICE_MODELS); default: SLUICE_MODEL"
    )
    worker.set_defaults(fn=_worker)
    sub.add_parser("ingestion", help="run the ingestion consumer").set_defaults(fn=_ingestion)
    ingest = sub.add_parser("ingest", help="send files or folders to ingestion")
    ingest.add_argument("paths", nargs="+", type=Path)
    ingest.add_argument(
        "--wait", type=float, default=300.0, help="seconds to wait for indexing (0: do not wait)"
    )
    ingest.set_defaults(fn=_ingest)
    up = sub.add_parser("up", help="run the whole stack locally, restarting what exits")
    up.add_argument("--workers", type=int, default=1, help="local workers (default 1)")
    up.set_defaults(fn=_up)
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
    status = sub.add_parser("status", help="lag, groups, workers and dead letters, now")
    status.add_argument("--json", action="store_true", help="the snapshot as JSON")
    status.add_argument(
        "--watch", type=float, nargs="?", const=2.0, default=None, metavar="S",
        help="refresh in place every S seconds (default 2)",
    )  # fmt: skip
    status.set_defaults(fn=_status)
    trace = sub.add_parser("trace", help="a request's hops: where its time went")
    trace.add_argument("request_id")
    trace.add_argument("--json", action="store_true", help="the hops as JSON")
    trace.set_defaults(fn=_trace)
    acl = sub.add_parser(
        "redis-acl", help="a Redis ACL file: a user per service (docs/RELIABILITY.md)"
    )
    acl.add_argument(
        "--password-file", action="append", default=[], metavar="SERVICE=PATH",
        help="the service's password, read from a file; services: api, worker, ingestion, cli",
    )  # fmt: skip
    acl.set_defaults(fn=_redis_acl)
    _keys_parser(sub)
    _batch_parser(sub)
    sub.add_parser("bench", help="serving benchmark", add_help=False).set_defaults(fn=_bench)
    sub.add_parser("eval", help="retrieval evaluation", add_help=False).set_defaults(fn=_eval)
    args, rest = parser.parse_known_args(argv)
    if rest and args.fn not in (_bench, _eval):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.fn(args)


def _keys_parser(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new key for a tenant (printed once)")
    create.add_argument("--tenant", required=True, help="who pays: cost and limits per tenant")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute (0: none)")
    create.add_argument("--tpm", type=int, default=None, help="tokens per minute (0: none)")
    create.add_argument(
        "--admin",
        action="store_true",
        help="may read every tenant's cost and change the shared document corpus",
    )
    create.add_argument("--json", action="store_true")
    listing = actions.add_parser("list", help="every key, revoked ones too (never the key)")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    keys.set_defaults(fn=_keys)


def _batch_parser(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("batch", help="batch jobs on Kafka: submit a JSONL file, collect results")
    actions = cmd.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="one request per line (docs/BATCH.md)")
    submit.add_argument("file", type=Path, help="JSONL; the request ids go to FILE.ids")
    submit.add_argument("--wait", action="store_true", help="then collect the results")
    submit.add_argument("--out", type=Path, default=None, help="default FILE.results.jsonl")
    collect = actions.add_parser("collect", help="results from the batch results topic")
    collect.add_argument("--ids", type=Path, default=None, help="only these (a FILE.ids)")
    collect.add_argument("--out", type=Path, default=None, help="JSONL (default: stdout)")
    for p in (submit, collect):
        p.add_argument("--timeout", type=float, default=3600.0, help="seconds (default 3600)")
        p.add_argument(
            "--tenant", default=None,
            help="who pays; with SLUICE_API_KEY set, the key's tenant (messages are signed "
            "with it) and its results are read from its own topic",
        )  # fmt: skip
    cmd.set_defaults(fn=_batch)


if __name__ == "__main__":
    main()
