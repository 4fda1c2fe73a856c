"""The verifier service under a 24 MiB body: memory and /health latency, against its idle self.

Starts ``dstack-agent verifier`` as a subprocess, then measures in the same run:

* idle: resident memory (VmRSS) and the median ``GET /health`` latency;
* one ``POST /verify`` with a 24 MiB hex body (``{"quote": "abab..."}``, the limit),
  while another thread polls ``/health``: the growth of the process's peak memory
  (VmHWM) as a multiple of the body size, the POST's duration, and the slowest and median
  ``/health`` answers during it as multiples of the idle median;
* a request that *declares* a 1 GB body: how long the refusal takes (it must come before
  any body byte is sent).

Linux only (reads /proc). Run: ``.venv/bin/python bench/verifier_limits_bench.py``.
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BODY_MIB = 24


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory(pid: int, field: str) -> int:
    """``VmRSS``/``VmHWM`` of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def health(port: int) -> float:
    """Seconds for one GET /health on a fresh connection."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    conn.getresponse().read()
    conn.close()
    return time.perf_counter() - started


def main() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack_core.cli", "verifier", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                health(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("verifier did not start") from None
                time.sleep(0.1)
        idle = statistics.median(health(port) for _ in range(50))
        rss_idle = memory(proc.pid, "VmRSS")
        hwm_before = memory(proc.pid, "VmHWM")

        # As large as the default limit allows: 24 MiB including the JSON around the hex.
        body = json.dumps({"quote": "ab" * (((BODY_MIB << 20) - 64) // 2)}).encode()
        during: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                during.append(health(port))
                time.sleep(0.005)

        poller = threading.Thread(target=poll)
        poller.start()
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/verify", body=body, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        status, text = answer.status, answer.read()
        took = time.perf_counter() - started
        conn.close()
        done.set()
        poller.join()
        hwm_after = memory(proc.pid, "VmHWM")

        refused = time.perf_counter()
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(
            b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n"
        )
        try:
            first = sock.recv(64)
        except TimeoutError:
            first = b"(no answer within 10 s: the server waits for the body)"
        refusal = time.perf_counter() - refused
        sock.close()
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"body: {len(body) / 2**20:.1f} MiB hex JSON -> HTTP {status} {json.loads(text)['code']}")
    print(f"idle: RSS {rss_idle / 2**20:.0f} MiB, /health median {idle * 1000:.2f} ms")
    growth = max(0, hwm_after - hwm_before)
    print(
        f"peak memory growth: {growth / 2**20:.0f} MiB = {growth / len(body):.1f}x the body "
        f"(peak RSS {hwm_after / 2**20:.0f} MiB)"
    )
    print(f"POST took {took:.2f} s; {len(during)} /health answers meanwhile:")
    if during:
        print(
            f"  median {statistics.median(during) * 1000:.2f} ms "
            f"({statistics.median(during) / idle:.1f}x idle), "
            f"slowest {max(during) * 1000:.1f} ms ({max(during) / idle:.1f}x idle)"
        )
    print(f"1 GB declared body refused in {refusal * 1000:.1f} ms: {first[:12]!r}")


if __name__ == "__main__":
    main()
