"""POST /verify throughput of the verifier service with 1 and with 2 worker processes.

Starts a simulator agent for one Attest envelope and its trust bundle, then two verifier
services side by side, each gunicorn with aiohttp's worker as docs/verify.md deploys it
(configured only through ``DSTACK_VERIFIER_*``): one with one worker, one with two. The load
generator (this process: asyncio, raw keep-alive HTTP/1.1 connections opened a few
milliseconds apart so that they spread over the workers, a pre-built request) drives one
service at a time for a slot, alternating, for several rounds, so both see the same
machine; every answer is checked (200, verdict pass). It prints the rate of each slot, the
medians, their ratio, how many cores the workers actually got (their CPU time over the
slot: on a machine shared with other work, the second core may not be free) and the
busiest worker's share of it (how evenly the connections spread), the work per worker
CPU-second (what must not change with the number of workers: no lock or shared state
between processes), the load average around the run and the share of a core the load
generator itself used.

Run: ``.venv/bin/python bench/verifier_scaling_bench.py [--seconds 4] [--rounds 4]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from dstack_core.testing import AgentProcess, short_tempdir


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def simulator_evidence(out: Path) -> bytes:
    """An Attest envelope from a fresh simulator agent; its trust bundle written to ``out``."""
    agent = AgentProcess("simulator").start()
    try:
        status, body = agent.call("Attest", {"report_data": "7363616c65"})
        if status != 200:
            raise SystemExit(f"Attest failed: {body}")
        subprocess.run(
            [sys.executable, "-m", "dstack_core.cli", "simulator", "trust-bundle",
             "--state-dir", str(agent.state_dir), "--out", str(out)],
            check=True, capture_output=True, timeout=60,
        )
        return bytes.fromhex(body["attestation"])
    finally:
        agent.stop()
        shutil.rmtree(agent.workdir, ignore_errors=True)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def workers_cpu(master: int) -> list[float]:
    """CPU seconds used so far by each worker process of gunicorn ``master``."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [_cpu_seconds(int(pid)) for pid in children]


@contextlib.contextmanager
def service(bundle: Path, workers: int) -> Iterator[tuple[int, int]]:
    """gunicorn with ``workers`` aiohttp workers on a free port, until the block ends:
    ``(port, master pid)``."""
    port = free_port()
    env = {
        **os.environ,
        "DSTACK_VERIFIER_COLLATERAL": str(bundle / "collateral.json"),
        "DSTACK_VERIFIER_ROOT_CA": str(bundle / "root_ca.pem"),
        "DSTACK_VERIFIER_OS_IMAGE_POLICY": str(bundle / "os_image_policy.json"),
        "DSTACK_VERIFIER_ALLOW_SIMULATOR": "1",
    }
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("gunicorn")),
         "dstack_core.server.verifier:app_from_env",
         "--worker-class", "aiohttp.GunicornWebWorker", "--workers", str(workers),
         "--bind", f"127.0.0.1:{port}", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the {workers}-worker service did not start") from None
                time.sleep(0.1)
        yield port, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


CONNECT_STAGGER = 0.005
"""Seconds between opening two of the load generator's connections. gunicorn's workers share
one listening socket and an asyncio worker accepts every pending connection when it wakes,
so connections opened in one burst all land on one worker (measured: 1.00 and 0.03 cores);
opened a few milliseconds apart they spread over the workers, as a service's many clients
do."""


async def _client(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    request: bytes, stop: float, counts: list[int],
) -> None:
    reader, writer = connection
    try:
        while time.monotonic() < stop:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200") or b'"verdict":"pass"' not in body:
                raise SystemExit(f"unexpected answer: {head[:40]!r} {body[:200]!r}")
            counts[0] += 1
    finally:
        writer.close()


def drive(port: int, request: bytes, seconds: float, clients: int) -> float:
    """Verifications per second over ``seconds`` with ``clients`` connections."""
    counts = [0]

    elapsed = [0.0]

    async def run() -> None:
        connections = []
        for _ in range(clients):
            connections.append(await asyncio.open_connection("127.0.0.1", port))
            await asyncio.sleep(CONNECT_STAGGER)
        started = time.monotonic()
        stop = started + seconds
        await asyncio.gather(*(_client(c, request, stop, counts) for c in connections))
        elapsed[0] = time.monotonic() - started

    asyncio.run(run())
    return counts[0] / elapsed[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of one slot")
    parser.add_argument("--rounds", type=int, default=4, help="slots per service")
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections")
    args = parser.parse_args()

    out = short_tempdir("scale")
    try:
        envelope = simulator_evidence(out)
        payload = json.dumps({"attestation": envelope.hex()}).encode()
        request = (
            b"POST /verify HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        load_before = os.getloadavg()
        rates: dict[int, list[float]] = {1: [], 2: []}
        per_cpu: dict[int, list[float]] = {1: [], 2: []}
        cores: dict[int, list[float]] = {1: [], 2: []}
        busiest: dict[int, list[float]] = {1: [], 2: []}
        with service(out, 1) as one, service(out, 2) as two:
            services = {1: one, 2: two}
            for workers in (1, 2):
                drive(services[workers][0], request, 1.0, args.clients)  # warm-up
            own_before = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.monotonic()
            for _ in range(args.rounds):
                for workers in (1, 2):
                    port, master = services[workers]
                    cpu = workers_cpu(master)
                    rate = drive(port, request, args.seconds, args.clients)
                    each = [after - before for after, before in zip(workers_cpu(master), cpu)]
                    used = sum(each)
                    busiest[workers].append(max(each) / used if used else 1.0)
                    rates[workers].append(rate)
                    per_cpu[workers].append(rate * args.seconds / used if used else 0.0)
                    cores[workers].append(used / args.seconds)
            own = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.monotonic() - wall
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(out, ignore_errors=True)

    client_cpu = (own.ru_utime + own.ru_stime - own_before.ru_utime - own_before.ru_stime) / wall
    print(f"simulator Attest envelope, {len(payload)}-byte POST /verify bodies, "
          f"{args.clients} keep-alive connections, {args.rounds} x {args.seconds:g} s slots")
    for workers in (1, 2):
        listed = " ".join(f"{r:6.0f}" for r in rates[workers])
        print(f"{workers} worker{'s' if workers > 1 else ' '}: {listed}   median "
              f"{statistics.median(rates[workers]):6.0f} /s, "
              f"{statistics.median(per_cpu[workers]):6.0f} per worker CPU-second, the "
              f"workers got {statistics.median(cores[workers]):.2f} cores"
              + (f", the busiest {statistics.median(busiest[workers]):.0%} of it"
                 if workers > 1 else ""))
    ratio = statistics.median(rates[2]) / statistics.median(rates[1])
    efficiency = statistics.median(per_cpu[2]) / statistics.median(per_cpu[1])
    print(f"2 workers / 1 worker: {ratio:.2f}x throughput, {efficiency:.2f}x work per CPU-second "
          f"(cores: {os.cpu_count()})")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; "
          f"the load generator used {client_cpu:.2f} of a core")


if __name__ == "__main__":
    main()
