"""Servers under load from a C client: the machinery behind bench/perf.py.

Adapted from the project's reference benchmark harness (shared bench/: ``compare.py`` and
``load.py``; see bench/README.md): servers are started on Unix sockets pinned to one CPU,
``uload`` (built from ``uload.c`` with the C compiler on first use) drives them from the
other, either one server at a time or several in interleaved 50 ms slots (A B B A ...),
so that a drifting machine hits every server alike and ratios taken within one run hold.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD = HERE / ".build"

# Verify carries a valid ed25519 triple (seed 32 x 0x01), so it answers valid: true.
_ED_PUB = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c"
_ED_SIG = ("70960c2d6b4c1751e35e982983aa7318f42c88d5bb5419a537c6e70a3e8d7152"
           "b4d2a9e1b915fd1583120a5c3fd24641890575c29416fdfd691d3959bd1f1501")
REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "GetKey": ("/GetKey", {"path": "my/key", "purpose": "signing", "algorithm": "secp256k1"}),
    "Sign": ("/Sign", {"algorithm": "ed25519", "data": "deadbeef"}),
    "Verify": ("/Verify", {"algorithm": "ed25519", "data": "deadbeef",
                           "signature": _ED_SIG, "public_key": _ED_PUB}),
    "Info": ("/Info", {}),
    "GetQuote": ("/GetQuote", {"report_data": "1234"}),
    "GetTlsKey": ("/GetTlsKey", {"subject": "bench", "alt_names": ["localhost"],
                                 "usage_ra_tls": True, "usage_server_auth": True,
                                 "usage_client_auth": False}),
    "Attest": ("/Attest", {"report_data": "1234"}),
    "EmitEvent": ("/EmitEvent", {"event": "bench", "payload": "deadbeef"}),
    "Version": ("/Version", {}),
}
MIXES: dict[str, list[tuple[str, int]]] = {
    # The performance issue's 64-client mix.
    "issue": [("GetKey", 30), ("Sign", 20), ("GetQuote", 20), ("EmitEvent", 20), ("Info", 10)],
    # The reference harness's SDK-shaped mix.
    "sdk": [("GetKey", 30), ("Sign", 20), ("Verify", 10), ("GetQuote", 10), ("Info", 10),
            ("GetTlsKey", 10), ("Attest", 5), ("EmitEvent", 5)],
}


def http_request(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def schedule(names: Sequence[str]) -> list[tuple[str, bytes]]:
    """Requests each connection cycles through: ``(name, raw HTTP request)``."""
    out = []
    for name in names:
        path, body = REQUESTS[name]
        out.append((name, http_request(path, json.dumps(body, separators=(",", ":")).encode())))
    return out


def mix_schedule(mix: str) -> list[tuple[str, bytes]]:
    import random

    names = [name for name, weight in MIXES[mix] for _ in range(weight)]
    random.Random(42).shuffle(names)  # every connection sees the mix quickly
    return schedule(names)


def uload() -> Path:
    source, exe = HERE / "uload.c", BUILD / "uload"
    if not exe.exists() or exe.stat().st_mtime < source.stat().st_mtime:
        BUILD.mkdir(exist_ok=True)
        compiler = shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            raise SystemExit("bench needs a C compiler (gcc) for its load generator")
        subprocess.run([compiler, "-O2", "-o", f"{exe}.tmp", str(source)], check=True)
        os.replace(f"{exe}.tmp", exe)
    return exe


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its threads, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Server:
    """A server command (with ``{sock}``) started on its own socket, pinned to ``cpus``."""

    def __init__(self, name: str, command: str, workdir: Path, cpus: set[int]) -> None:
        self.name, self.command, self.cpus = name, command, cpus
        self.sock = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> float:
        """Start; seconds from spawn to the first HTTP answer on the socket."""
        self.sock.unlink(missing_ok=True)
        cmd = self.command.replace("{sock}", shlex.quote(str(self.sock)))
        log = self.log_path.open("ab")
        started = time.perf_counter()
        cpus = self.cpus
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", "exec " + cmd], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )
        log.close()
        probe = http_request("/Version", b"")
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            if self.sock.exists() and _answers(self.sock, probe):
                return time.perf_counter() - started
            if time.perf_counter() - started > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} did not answer within {timeout}s")
            time.sleep(0.002)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def _answers(path: Path, request: bytes) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
            s.sendall(request)
            return s.recv(65536).startswith(b"HTTP/1.")
        except OSError:
            return False


def _percentile(sorted_us: Sequence[int], q: float) -> float:
    if not sorted_us:
        return float("nan")
    k = min(len(sorted_us) - 1, max(0, int(round(q / 100 * len(sorted_us) + 0.5)) - 1))
    return sorted_us[k] / 1000.0


def _write_requests(path: Path, requests: Sequence[tuple[str, bytes]]) -> None:
    with path.open("wb") as f:
        for _, raw in requests:
            f.write(struct.pack("<I", len(raw)) + raw)


def run_sliced(
    servers: Sequence[Server], requests: Sequence[tuple[str, bytes]], *, clients: int,
    duration: float, warmup: float, client_cpus: set[int], slot_ms: float = 50,
) -> list[dict[str, Any]]:
    """One uload run loading ``servers`` in turn: per server, requests/s of its busy time,
    latencies, errors and server CPU per request."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        reqs, out = Path(tmp) / "reqs", Path(tmp) / "out"
        _write_requests(reqs, requests)
        cpu0 = [cpu_seconds(s.pid) for s in servers]
        cmd = [str(uload()), ",".join(str(s.sock) for s in servers), str(clients),
               str(duration), str(warmup), "0", str(reqs), str(out), str(slot_ms)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              preexec_fn=lambda: os.sched_setaffinity(0, client_cpus))
        cpu1 = [cpu_seconds(s.pid) for s in servers]
        per, total = [], {}
        for line in done.stdout.splitlines():
            kv = dict(x.split("=", 1) for x in line.split() if "=" in x)
            (per.append(kv) if line.startswith("srv=") else total.update(kv))
        latencies: list[list[int]] = [[] for _ in servers]
        statuses: list[dict[str, int]] = [{} for _ in servers]
        for us, status, index in struct.iter_unpack("<IHH", out.read_bytes()):
            latencies[index].append(us)
            statuses[index][str(status)] = statuses[index].get(str(status), 0) + 1
    results = []
    for i, kv in enumerate(per):
        lat = sorted(latencies[i])
        busy, sent_all = float(kv["busy_s"]), int(kv["sent_all"])
        errors = {k: v for k, v in statuses[i].items() if not k.startswith("2")}
        for key in ("conn_err", "timeouts", "closed"):
            if int(total.get(key, 0)) and i == 0:
                errors[key] = int(total[key])
        results.append({
            "rps": int(kv["sent"]) / busy if busy else 0.0,
            "p50_ms": _percentile(lat, 50), "p99_ms": _percentile(lat, 99),
            "errors": errors, "rx_per_req": int(kv["rx"]) / max(1, len(lat)),
            "server_us_per_req": (cpu1[i] - cpu0[i]) / sent_all * 1e6 if sent_all else None,
        })
    return results


def run_single(
    server: Server, requests: Sequence[tuple[str, bytes]], *, clients: int, duration: float,
    warmup: float, client_cpus: set[int], count: int = 0,
) -> dict[str, Any]:
    """One server alone: overall figures plus p50/p99 and errors per request name."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        reqs, out = Path(tmp) / "reqs", Path(tmp) / "out"
        _write_requests(reqs, requests)
        cpu0 = cpu_seconds(server.pid)
        cmd = [str(uload()), str(server.sock), str(clients), str(duration),
               str(0 if count else warmup), str(count), str(reqs), str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              preexec_fn=lambda: os.sched_setaffinity(0, client_cpus))
        cpu = cpu_seconds(server.pid) - cpu0
        kv = dict(x.split("=", 1) for x in done.stdout.split() if "=" in x)
        by_name: dict[str, list[int]] = {}
        errors: dict[str, dict[str, int]] = {}
        for us, status, index in struct.iter_unpack("<IHH", out.read_bytes()):
            name = requests[index][0]
            by_name.setdefault(name, []).append(us)
            if not 200 <= status < 300:
                errors.setdefault(name, {})[str(status)] = errors.get(name, {}).get(
                    str(status), 0) + 1
    wall = float(kv["main_wall_s"])
    recorded = sum(len(v) for v in by_name.values())
    methods = {}
    for name, values in by_name.items():
        values.sort()
        methods[name] = {"requests": len(values), "p50_ms": _percentile(values, 50),
                         "p99_ms": _percentile(values, 99), "errors": errors.get(name, {})}
    transport = {k: int(kv[k]) for k in ("conn_err", "timeouts", "closed") if int(kv[k])}
    return {"rps": recorded / wall if wall else 0.0, "methods": methods,
            "transport_errors": transport,
            "server_us_per_req": cpu / recorded * 1e6 if recorded else None}


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")
