"""`sluice`: one command for every Sluice process.

sluice api | worker          run one process (configured by SLUICE_* variables)
sluice up                    the whole stack on this machine (what `make run` does)
sluice down                  stop what `sluice up` started
sluice model prepare         convert the bundled default model once
sluice bench                 serving benchmark (see docs/BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

RUN_DIR = Path(".run")
CURL_EXAMPLE = """\
curl -N {url}/generate -H 'content-type: application/json' \\
  -d '{{"prompt": "The capital of France is", "max_tokens": 32, "temperature": 0, "stream": true}}'"""  # noqa: E501


def _up(args: argparse.Namespace) -> None:
    from shared import devstack
    from shared.models import prepare_default_model
    from shared.settings import Settings

    settings = Settings()
    prepare_default_model(settings)
    RUN_DIR.mkdir(exist_ok=True)
    procs: dict[str, object] = {}

    kafka_host, kafka_port = devstack.host_port(settings.kafka, 9092)
    if not devstack.port_open(kafka_host, kafka_port):
        procs["broker"] = devstack.start_broker(kafka_port, RUN_DIR / "broker.log")
    redis_host, redis_port = devstack.host_port(settings.redis, 6379)
    if not devstack.port_open(redis_host, redis_port):
        procs["redis"] = devstack.start_redis(redis_port, RUN_DIR / "redis.log")
    procs["worker"] = devstack.spawn_sluice(["worker"], RUN_DIR / "worker.log", {})
    procs["api"] = devstack.spawn_sluice(["api"], RUN_DIR / "api.log", {})
    pids = {"up": os.getpid(), **{n: p.pid for n, p in procs.items()}}
    (RUN_DIR / "pids.json").write_text(json.dumps(pids))

    def shutdown(*_: object) -> None:
        print("\nstopping", ", ".join(reversed(procs)))
        for proc in reversed(list(procs.values())):
            devstack.stop(proc)  # type: ignore[arg-type]
        (RUN_DIR / "pids.json").unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    url = f"http://{settings.host}:{settings.port}"
    print(f"starting: {', '.join(procs)} (logs in {RUN_DIR}/); the engine takes ~1-2 min on CPU")
    while not _ready(url):
        for name, proc in procs.items():
            if proc.poll() is not None:  # type: ignore[attr-defined]
                print(f"{name} exited; see {RUN_DIR}/{name}.log")
                shutdown()
        time.sleep(1)
    print(f"\nSluice is ready at {url}\n\n{CURL_EXAMPLE.format(url=url)}\n")
    print("Ctrl-C (or `make stop`) stops everything started here.")
    while True:
        time.sleep(1)
        for name, proc in procs.items():
            if proc.poll() is not None:  # type: ignore[attr-defined]
                print(f"{name} exited; see {RUN_DIR}/{name}.log")
                shutdown()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def _down(args: argparse.Namespace) -> None:
    pids_file = RUN_DIR / "pids.json"
    if not pids_file.exists():
        print("nothing to stop")
        return
    pids: dict[str, int] = json.loads(pids_file.read_text())
    try:
        # The supervisor stops its children in order and removes the pid file.
        os.kill(pids.pop("up"), signal.SIGTERM)
        print("stopping the stack started by `sluice up`")
        return
    except ProcessLookupError:
        pass
    for name, pid in reversed(pids.items()):  # the supervisor is gone: stop what it left
        try:
            os.kill(pid, signal.SIGTERM)
            print(f"stopped {name} ({pid})")
        except ProcessLookupError:
            pass
    pids_file.unlink()


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


def _bench(args: argparse.Namespace) -> None:
    from bench.serving import main

    main(args.rest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="run the HTTP API").set_defaults(fn=_api)
    sub.add_parser("worker", help="run a worker (Kafka -> vLLM -> Redis)").set_defaults(fn=_worker)
    sub.add_parser("up", help="run the whole stack locally").set_defaults(fn=_up)
    sub.add_parser("down", help="stop what `sluice up` started").set_defaults(fn=_down)
    model = sub.add_parser("model", help="model preparation")
    model.add_argument("action", choices=["prepare"])
    model.set_defaults(fn=_model)
    bench = sub.add_parser("bench", help="serving benchmark", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(fn=_bench)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
