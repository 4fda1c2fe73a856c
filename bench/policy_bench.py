"""What the caller policy and the audit log cost, as ratios against no policy at all.

Starts three simulator agents side by side: without a policy (the baseline), with a
policy (one uid rule with key paths, so every call is identified and judged), and with the
policy and an audit log (every GetKey is a durable, hash-chained record; concurrent
records share one fdatasync). Drives ``Version`` (not audited) and ``GetKey`` (audited)
over keep-alive Unix-socket connections at concurrency 1 and 16, in rounds that alternate
the agents so that the machine's load drifts over all of them alike, and prints the median
requests/second and its ratio to the baseline's.

    .venv/bin/python bench/policy_bench.py [--seconds 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from agent_bench import drive

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
    rates: dict[tuple[str, str, int], list[float]] = {}
    try:
        # Rounds alternate the setups so that drift in machine load hits them alike.
        for _ in range(args.rounds):
            for method, body in CASES.items():
                for n in CONCURRENCY:
                    for name, agent in agents.items():
                        rate = asyncio.run(drive(agent.socket, method, body, args.seconds, n))
                        rates.setdefault((name, method, n), []).append(rate)
    finally:
        for agent in agents.values():
            agent.stop()
            shutil.rmtree(agent.workdir, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"policy bench: median of {args.rounds} rounds x {args.seconds}s per case; "
          "ratio = req/s over the no-policy agent's, same round schedule")
    print(f"{'setup':<14} {'method':<8} {'conc':>4} {'req/s':>10} {'ratio':>7}")
    for (name, method, n), rate in median.items():
        print(f"{name:<14} {method:<8} {n:>4} {rate:>10.1f} "
              f"{rate / median['no policy', method, n]:>7.3f}")


if __name__ == "__main__":
    main()
