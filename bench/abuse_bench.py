"""The agent under connection abuse: what a well-behaved client gets, and what the log costs.

Starts ``dstack-agent serve --platform simulator`` in a subprocess for each scenario, attacks
it over its Unix socket with the clients of :mod:`dstack_core.testing.abuse` for a fixed
time while a prober sends one ``GET /Version`` after another, and prints per scenario: the
attack's size, the prober's answered and failed requests, its median and worst latency, and
how many bytes the agent's log grew by. ``--baseline-tree DIR`` runs the same scenarios
against another source tree of dstack-core (e.g. ``git archive <commit> | tar -x -C DIR``),
for a before/after comparison in the same run.

    .venv/bin/python bench/abuse_bench.py [--seconds 10] [--baseline-tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs

from dstack_core.server.connections import raise_open_file_limit
from dstack_core.testing import AgentProcess
from dstack_core.testing.abuse import (
    MALFORMED_REQUESTS,
    ConnectionFlood,
    Prober,
    send_raw,
)


@attrs.frozen
class Scenario:
    name: str
    attack: str
    run: Callable[[AgentProcess, float], int]
    """Attack ``agent`` for the given seconds; returns how many attacks were made."""
    fd_limit: int | None = None
    args: tuple[str, ...] = ()
    """``serve`` flags for this tree (a baseline tree may not know them)."""


def _flood(count: int, **kwargs: object) -> Callable[[AgentProcess, float], int]:
    def run(agent: AgentProcess, seconds: float) -> int:
        with ConnectionFlood(agent.socket, count, **kwargs) as flood:  # type: ignore[arg-type]
            time.sleep(seconds)
        return flood.opened

    return run


def _malformed(agent: AgentProcess, seconds: float) -> int:
    sent = [0]
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            for case in MALFORMED_REQUESTS:
                try:
                    send_raw(agent.socket, case.request, timeout=5)
                except OSError:
                    pass
                sent[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sent[0]


SLOW_HEAD = b"GET /Version HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: a\r\n" * 200
SLOW_BODY = b"POST /GetKey HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b" " * 2000
PIPELINED = b"GET /Info HTTP/1.1\r\nHost: x\r\n\r\n" * 500

SCENARIOS = [
    Scenario("fd exhaustion", "400 idle connections, RLIMIT_NOFILE 256", _flood(400), 256),
    Scenario("stalled connections", "1500 idle connections", _flood(1500)),
    Scenario("slow-loris", "1000 heads trickled 1 byte/0.5 s",
             _flood(1000, send=SLOW_HEAD, interval=0.5)),
    Scenario("slow body", "300 bodies trickled 10 bytes/0.5 s (--body-timeout 3)",
             _flood(300, send=SLOW_BODY, chunk=10, interval=0.5), args=("--body-timeout", "3")),
    Scenario("unread answers", "50 connections pipelining 500 /Info (--send-timeout 3)",
             _flood(50, send=PIPELINED, chunk=len(PIPELINED), interval=0.1, read=False),
             args=("--send-timeout", "3")),
    Scenario("malformed HTTP", f"{len(MALFORMED_REQUESTS)} kinds of bad request, 4 threads",
             _malformed),
]


def _limit(n: int | None) -> Callable[[], None] | None:
    if n is None:
        return None

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

    return preexec


@contextmanager
def _agent(scenario: Scenario, tree: Path | None) -> Iterator[AgentProcess]:
    env = {}
    cwd = Path.cwd()
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(tree), str(tree / "plugins" / "simulator"), os.environ.get("PYTHONPATH", "")]
        )
        os.chdir(tree)  # ``python -m`` puts the working directory first on sys.path
    try:
        agent = AgentProcess("simulator", env=env, preexec_fn=_limit(scenario.fd_limit),
                             extra_args=scenario.args if tree is None else ()).start()
    finally:
        os.chdir(cwd)
    try:
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(agent.workdir, ignore_errors=True)


def measure(scenario: Scenario, seconds: float, tree: Path | None) -> dict[str, object]:
    with _agent(scenario, tree) as agent:
        before = agent.log_path.stat().st_size
        with Prober(agent.socket, timeout=5) as prober:
            attacks = scenario.run(agent, seconds)
        grown = agent.log_path.stat().st_size - before
        after = Prober(agent.socket, timeout=5).once()
    result = prober.result
    latencies = result.latencies or [float("nan")]
    return {
        "scenario": scenario.name,
        "attack": scenario.attack,
        "connections or requests": attacks,
        "answered": result.answered,
        "failed": result.failed,
        "median s": round(statistics.median(latencies), 3),
        "max s": round(max(latencies), 3),
        "log bytes": grown,
        "serves after": after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each attack")
    parser.add_argument("--baseline-tree", type=Path, help="another dstack-core source tree")
    parser.add_argument("--only", help="run only the scenario with this name")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    raise_open_file_limit(8192)
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline_tree:
        trees.insert(0, ("baseline", args.baseline_tree.resolve()))
    for scenario in SCENARIOS:
        if args.only and scenario.name != args.only:
            continue
        for label, tree in trees:
            row = {"build": label, **measure(scenario, args.seconds, tree)}
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"{label:<10} {row['scenario']:<20} {row['connections or requests']:>7} "
                    f"attacks  answered {row['answered']:>5}  failed {row['failed']:>6}  "
                    f"median {row['median s']:>6}s  max {row['max s']:>6}s  "
                    f"log {row['log bytes']:>10} B  serves after: {row['serves after']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
