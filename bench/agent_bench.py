"""Throughput and memory of a real agent on the simulator, as ratios against a baseline.

Starts ``dstack-agent serve --platform simulator`` in a subprocess, drives each method over
the Unix socket with keep-alive connections for a fixed time, and prints requests/second
per method, each as a ratio against ``Version`` (the cheapest round trip: HTTP, routing and
JSON with no crypto) measured in the same run, plus the agent's resident memory.

    .venv/bin/python bench/agent_bench.py [--seconds 2] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from pathlib import Path

import aiohttp

from dstack_core.testing import AgentProcess

CASES = {
    "Version": {},
    "GetKey": {"path": "bench/key", "purpose": "bench"},
    "Sign": {"algorithm": "secp256k1", "data": "deadbeef"},
    "Verify": None,  # filled from a Sign result
    "GetQuote": {"report_data": "00" * 64},
    "Attest": {"report_data": "00" * 64},
    "GetTlsKey": {"subject": "bench", "usage_ra_tls": True},
    "Info": {},
    # Last: every emitted event lengthens the log that Attest, GetTlsKey and Info carry.
    "EmitEvent": {"event": "bench", "payload": "00"},
}


async def drive(socket: Path, method: str, body: dict, seconds: float, concurrency: int) -> float:
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


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    agent = AgentProcess("simulator").start()
    try:
        assert agent.proc is not None
        _, sig = agent.call("Sign", CASES["Sign"])
        CASES["Verify"] = {"algorithm": "secp256k1", "data": "deadbeef",
                           "signature": sig["signature"], "public_key": sig["public_key"]}
        rss_start = rss_kib(agent.proc.pid)
        results = {}
        for method, body in CASES.items():
            results[method] = asyncio.run(drive(agent.socket, method, body, args.seconds, args.concurrency))
        baseline = results["Version"]
        print(f"agent bench: {args.seconds}s per method, concurrency {args.concurrency}")
        print(f"{'method':<10} {'req/s':>10} {'ratio to Version':>18}")
        for method, rate in results.items():
            print(f"{method:<10} {rate:>10.1f} {rate / baseline:>18.3f}")
        rss_end = rss_kib(agent.proc.pid)
        print(f"agent RSS: {rss_start} KiB at start, {rss_end} KiB after the run "
              f"(ratio {rss_end / rss_start:.2f})")
    finally:
        agent.stop()
        shutil.rmtree(agent.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
