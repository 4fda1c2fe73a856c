"""What the caller policy and the audit log cost, as ratios against no policy at all.

Starts three simulator agents side by side: without a policy (the baseline), with a
policy (one uid rule with key paths, so every call is identified and judged), and with the
policy and an audit log (every GetKey is a durable, hash-chained record; concurrent
records share one fdatasync). Drives ``Version`` (not audited) and ``GetKey`` (audited)
over keep-alive Unix-socket connections at concurrency 1 and 16, in rounds that alternate
the agents so that the machine's load drifts over all of them alike, and prints the median
requests/second and the agent's CPU time per request (user + system, from /proc: much less
sensitive than throughput to other load on the machine), each with its ratio to the
baseline's.

    .venv/bin/python bench/policy_bench.py [--seconds 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import aiohttp

from dstack_core.testing import AgentProcess

POLICY = f"""
default = "deny"
[[rule]]
match = {{ uid = {os.getuid()} }}
methods = ["Version", "GetKey"]
key_paths = ["bench/"]
"""
CASES = {"Version": {}, "GetKey": {"path": "bench/key", "purpose": "bench"}}
CONCURRENCY = (1, 16)
SETUPS = {
    "no policy": [],
    "policy": ["--policy", "POLICY"],
    "policy+audit": ["--policy", "POLICY", "--audit-log", "AUDIT"],
}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(socket: Path, method: str, body: dict, seconds: float, concurrency: int) -> float:
    """Requests/s of ``method`` over ``concurrency`` keep-alive connections for ``seconds``."""
    connector = aiohttp.UnixConnector(path=str(socket), limit=concurrency)
    payload = json.dumps(body).encode()
    count = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                async with session.post(f"http://dstack/{method}", data=payload,
                                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{method}: HTTP {resp.status}")
                count += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - start)


def measure(agent: AgentProcess, method: str, n: int, seconds: float) -> tuple[float, float]:
    """(requests/s, agent CPU microseconds per request) for one timed run."""
    assert agent.proc is not None
    cpu, start = cpu_seconds(agent.proc.pid), time.perf_counter()
    rate = asyncio.run(drive(agent.socket, method, CASES[method], seconds, n))
    elapsed = time.perf_counter() - start
    return rate, (cpu_seconds(agent.proc.pid) - cpu) / (rate * elapsed) * 1e6


def start(extra: list[str]) -> AgentProcess:
    agent = AgentProcess("simulator")
    (agent.workdir / "policy.toml").write_text(POLICY)
    replace = {"POLICY": str(agent.workdir / "policy.toml"),
               "AUDIT": str(agent.workdir / "audit.log")}
    agent.extra_args = [replace.get(arg, arg) for arg in extra]
    return agent.start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="per case and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    agents = {name: start(extra) for name, extra in SETUPS.items()}
    runs: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    try:
        # Rounds alternate the setups so that drift in machine load hits them alike.
        for _ in range(args.rounds):
            for method in CASES:
                for n in CONCURRENCY:
                    for name, agent in agents.items():
                        runs.setdefault((name, method, n), []).append(
                            measure(agent, method, n, args.seconds))
    finally:
        for agent in agents.values():
            agent.stop()
            shutil.rmtree(agent.workdir, ignore_errors=True)
    rate = {k: statistics.median(r for r, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    print(f"policy bench: median of {args.rounds} rounds x {args.seconds}s per case; ratios "
          "are to the no-policy agent in the same rounds")
    print(f"{'setup':<14} {'method':<8} {'conc':>4} {'req/s':>9} {'ratio':>6} "
          f"{'CPU us/req':>10} {'ratio':>6}")
    for key in runs:
        name, method, n = key
        base = ("no policy", method, n)
        print(f"{name:<14} {method:<8} {n:>4} {rate[key]:>9.1f} {rate[key] / rate[base]:>6.3f} "
              f"{cpu[key]:>10.1f} {cpu[key] / cpu[base]:>6.3f}")


if __name__ == "__main__":
    main()
