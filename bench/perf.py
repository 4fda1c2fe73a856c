"""The agent's performance against a bare aiohttp app and the crypto floor, in one command.

    .venv/bin/python bench/perf.py [--rounds 5] [--duration 2] [--json results.json]

Runs ``dstack-agent serve --platform simulator`` beside ``baseline_server.py`` (a bare
aiohttp app answering a constant: the HTTP ceiling) and ``floor_server.py`` (the ceiling
plus exactly each method's cryptography), all pinned to CPU 0, loaded from CPU 1 by the C
client ``uload`` in interleaved slots, and prints, each against its target of the
performance issue:

1. startup, spawn to first answer, agent / bare app;
2. per method at 16 clients: agent / floor and agent / bare app, median of per-round
   ratios [min-max] (EmitEvent, durable, against the bare app);
3. the 64-client mixed load (GetKey 30%, Sign, GetQuote, EmitEvent 20% each, Info 10%):
   p50 and p99 per method and errors;
4. a 10,000-event runtime log: GetKey, Sign, Verify and EmitEvent against a fresh agent
   in the same rounds, and GetQuote, Info and Attest against a bare app sending a body as
   large;
5. the agent's resident memory after 100,000 requests of an SDK-shaped mix (fresh agent).

Benchmarks are scripts, not tests: they print figures and never fail a build. Absolute
figures depend on the machine; the ratios are taken within one run. See
docs/performance.md for results and what they mean.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.util
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    REQUESTS,
    Server,
    median,
    mix_schedule,
    proc_kib,
    run_single,
    run_sliced,
    schedule,
)

HERE = Path(__file__).resolve().parent
METHODS = ("GetKey", "Sign", "Verify", "Info", "GetQuote", "GetTlsKey", "Attest", "EmitEvent")
FLOOR_TARGET = 0.85
EMIT_TARGET = 0.20
LONG_LOG = 10_000


AGENT_PACKAGES = ("dstack_core", "dstack_simulator")


def compile_agent() -> list[str]:
    """Write the bytecode of the agent's own packages, as installing them from a wheel does;
    the directories compiled.

    An editable install (scripts/install) leaves the project's modules without bytecode,
    and under ``PYTHONDONTWRITEBYTECODE`` none is ever written, so every start of the agent
    would compile its forty-odd modules from source while the bare app's aiohttp, installed
    from a wheel, reads bytecode: a cost of the checkout, not of the agent. Stale bytecode is
    rewritten; the sources are not touched. The packages are found the way the agent finds
    them (``PYTHONPATH`` first), without importing them.
    """
    compiled = []
    for name in AGENT_PACKAGES:
        spec = importlib.util.find_spec(name)
        for location in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(location, quiet=1)
            compiled.append(location)
    return compiled


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "load_average": os.getloadavg(),
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def fmt_ratio(values: list[float]) -> str:
    return f"{median(values):5.2f} [{min(values):.2f}-{max(values):.2f}]"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="dstack-perf-"))
        self.server_cpus = {0}
        self.client_cpus = {1} if (os.cpu_count() or 1) > 1 else {0}
        python = shlex.quote(sys.executable)
        agent = shlex.quote(str(Path(sys.executable).parent / "dstack-agent"))
        self.commands = {
            "base": f"{python} {HERE / 'baseline_server.py'} {{sock}}",
            "floor": f"{python} {HERE / 'floor_server.py'} {{sock}}",
            "agent": f"{agent} serve --platform simulator --socket {{sock}} "
                     f"--state-dir {self.workdir / 'state'}",
        }
        self.results: dict[str, Any] = {"machine": machine(), "args": vars(args)}

    def server(self, name: str, command: str | None = None) -> Server:
        return Server(name, command or self.commands[name], self.workdir, self.server_cpus)

    def sliced(
        self, servers: list[Server], method: str, *, rounds: int | None = None,
        duration: float | None = None,
    ) -> list[list[dict[str, Any]]]:
        return [
            run_sliced(servers, schedule([method]), clients=16,
                       duration=duration or self.args.duration, warmup=0.3,
                       client_cpus=self.client_cpus)
            for _ in range(rounds or self.args.rounds)
        ]

    def fresh(self, agent: Server, *, events: int = 0) -> None:
        """Restart ``agent`` on a fresh simulated machine (an empty runtime log, since the
        log holds at most 20,000 lines), then record ``events`` runtime events."""
        agent.stop()
        agent.command = self.commands["agent"] + " --reset-state"
        agent.start()
        agent.command = self.commands["agent"]
        have = runtime_events(agent)
        if events > have:
            run_single(agent, schedule(["EmitEvent"]), clients=16, duration=600, warmup=0,
                       client_cpus=self.client_cpus, count=events - have)

    # --- phases ---

    def startup(self) -> None:
        base, agent = self.server("base"), self.server("agent")
        agent.start()  # boots the simulated machine; later starts load its state
        agent.stop()
        times: dict[str, list[float]] = {"base": [], "agent": []}
        for i in range(self.args.startup_reps):
            for server in (base, agent) if i % 2 == 0 else (agent, base):  # ABBA
                times[server.name].append(server.start())
                server.stop()
        ratio = median(times["agent"]) / median(times["base"])
        self.results["startup"] = {**times, "ratio": ratio}
        print(f"\n## Startup (spawn -> first answer), median of {self.args.startup_reps}")
        print(f"bare app {median(times['base']) * 1000:6.0f} ms   agent "
              f"{median(times['agent']) * 1000:6.0f} ms   agent/bare {ratio:.2f}  "
              f"(target <= 2.00: {verdict(ratio <= 2)})")

    def ratios(self, servers: dict[str, Server]) -> None:
        print(f"\n## Per method at 16 clients: {self.args.rounds} rounds of interleaved "
              f"slots, {self.args.duration:g} s of each server's busy time per round")
        print(f"{'method':<10} {'bare':>7} {'floor':>7} {'agent':>7}  {'agent/floor':>18}  "
              f"{'agent/bare':>18}  {'target':<16} {'errors'}")
        table = {}
        trio = [servers["base"], servers["floor"], servers["agent"]]
        for method in self.args.methods.split(","):
            if method == "EmitEvent":
                rounds = self._emit_rounds(servers)
            else:
                rounds = self.sliced(trio, method)
            per_floor = [r[2]["rps"] / r[1]["rps"] for r in rounds]
            per_base = [r[2]["rps"] / r[0]["rps"] for r in rounds]
            errors = [r[2]["errors"] for r in rounds if r[2]["errors"]]
            if method == "EmitEvent":
                target, ok = f"bare >= {EMIT_TARGET:.2f}", median(per_base) >= EMIT_TARGET
            else:
                target, ok = f"floor >= {FLOOR_TARGET:.2f}", median(per_floor) >= FLOOR_TARGET
            rps = [median([r[i]["rps"] for r in rounds]) for i in range(3)]
            print(f"{method:<10} {rps[0]:7.0f} {rps[1]:7.0f} {rps[2]:7.0f}  "
                  f"{fmt_ratio(per_floor):>18}  {fmt_ratio(per_base):>18}  "
                  f"{target:<12} {verdict(ok):<4} {errors or 0}")
            table[method] = {
                "rps": dict(zip(("base", "floor", "agent"), rps)),
                "agent_floor": per_floor, "agent_base": per_base, "errors": errors,
                "server_us": [median([r[i]["server_us_per_req"] or 0 for r in rounds])
                              for i in range(3)],
                "p50_ms": [median([r[i]["p50_ms"] for r in rounds]) for i in range(3)],
                "p99_ms": [median([r[i]["p99_ms"] for r in rounds]) for i in range(3)],
            }
        self.results["ratios"] = table

    def _emit_rounds(
        self, servers: dict[str, Server], *, events: int = 0
    ) -> list[list[dict[str, Any]]]:
        return [self._emit_round(servers, events=events) for _ in range(self.args.rounds)]

    def _emit_round(self, servers: dict[str, Server], *, events: int) -> list[dict[str, Any]]:
        """One round of EmitEvent on a fresh machine with ``events`` already in its log
        (a round records several thousand events; the log holds 20,000 lines):
        ``[bare, floor, agent]``.

        The floor is not in the same slots: it appends to a file without syncing, and
        ext4's ordered journal flushes those dirty pages at the agent's next fsync,
        charging the agent for the floor's writes. It is measured beside the bare app on
        its own."""
        self.fresh(servers["agent"], events=events)
        (base, agent), = self.sliced([servers["base"], servers["agent"]], "EmitEvent",
                                     rounds=1, duration=min(self.args.duration, 0.5))
        (_, floor), = self.sliced([servers["base"], servers["floor"]], "EmitEvent",
                                  rounds=1, duration=min(self.args.duration, 0.5))
        return [base, floor, agent]

    def mixed(self, agent: Server) -> None:
        self.fresh(agent)
        result = run_single(agent, mix_schedule("issue"), clients=64,
                            duration=self.args.mix_duration, warmup=1.0,
                            client_cpus=self.client_cpus)
        self.results["mix"] = result
        print(f"\n## 64-client mixed load, {self.args.mix_duration:g} s: "
              f"{result['rps']:.0f} requests/s, transport errors "
              f"{result['transport_errors'] or 0}")
        print(f"{'method':<10} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>8}  "
              f"{'target':<14} errors")
        for name, m in sorted(result["methods"].items()):
            spread = m["p99_ms"] / m["p50_ms"]
            ok = spread <= 3 and not m["errors"]
            print(f"{name:<10} {m['requests']:8d} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} "
                  f"{spread:8.2f}  {'<= 3.00, none':<14} {m['errors'] or 0}  {verdict(ok)}")

    def long_log(self, servers: dict[str, Server]) -> None:
        """Each method with a 10,000-event log against itself with a short one, in the
        same round: two agents (one fresh) in the same slots beside the bare app, and
        EmitEvent's rounds alternating between a fresh machine and one with a long log."""
        agent, base = servers["agent"], servers["base"]
        short = self.server("agent-short", self.agent_command("state-short") + " --reset-state")
        short.start()
        self.fresh(agent, events=LONG_LOG)
        have = runtime_events(agent)
        print(f"\n## Long log: {have} runtime events, against a fresh agent in the same rounds")
        out: dict[str, Any] = {"events": have}
        print(f"{'method':<10} {'agent/bare, long':>18} {'agent/bare, short':>18} "
              f"{'long/short':>18}  target")
        try:
            for method in ("GetKey", "Sign", "Verify", "EmitEvent"):
                if method == "EmitEvent":
                    pairs = [(self._emit_round(servers, events=0),
                              self._emit_round(servers, events=LONG_LOG))
                             for _ in range(self.args.rounds)]
                    before = [s[2]["rps"] / s[0]["rps"] for s, _ in pairs]
                    now = [n[2]["rps"] / n[0]["rps"] for _, n in pairs]
                else:
                    rounds = self.sliced([base, short, agent], method)
                    before = [r[1]["rps"] / r[0]["rps"] for r in rounds]
                    now = [r[2]["rps"] / r[0]["rps"] for r in rounds]
                kept = [n / b for n, b in zip(now, before)]
                out[method] = {"agent_base": now, "short_log": before, "kept": kept}
                print(f"{method:<10} {fmt_ratio(now):>18} {fmt_ratio(before):>18} "
                      f"{fmt_ratio(kept):>18}  >= 0.90: {verdict(median(kept) >= 0.9)}")
        finally:
            short.stop()
        print(f"{'method':<10} {'body KiB':>9} {'agent/bare sending as much':>28}  target")
        self.fresh(agent, events=LONG_LOG)
        for method in ("GetQuote", "Info", "Attest"):
            size = response_size(agent, method)
            blob = self.server(f"blob-{method}", self.commands["base"] + f" --body-size={size}")
            blob.start()
            try:
                rounds = self.sliced([blob, agent], method)
            finally:
                blob.stop()
            ratio = [r[1]["rps"] / r[0]["rps"] for r in rounds]
            out[method] = {"bytes": size, "agent_blob": ratio}
            print(f"{method:<10} {size / 1024:9.0f} {fmt_ratio(ratio):>28}  "
                  f">= {FLOOR_TARGET:.2f}: {verdict(median(ratio) >= FLOOR_TARGET)}")
        self.results["long_log"] = out

    def agent_command(self, state: str) -> str:
        """The agent's command with its own state directory ``state`` (in the work dir)."""
        return self.commands["agent"].replace(str(self.workdir / "state"),
                                              str(self.workdir / state))

    def memory(self) -> None:
        command = self.agent_command("state-rss")
        agent, base = self.server("agent-rss", command), self.server("base-rss",
                                                                        self.commands["base"])
        agent.start()
        base.start()
        try:
            start_kib = proc_kib(agent.pid, "VmRSS")
            for server in (agent, base):
                run_single(server, mix_schedule("sdk"), clients=16, duration=3600, warmup=0,
                           client_cpus=self.client_cpus, count=self.args.rss_requests)
            rss = {s.name: (proc_kib(s.pid, "VmRSS"), proc_kib(s.pid, "VmHWM"))
                   for s in (agent, base)}
        finally:
            agent.stop()
            base.stop()
        agent_mb = rss["agent-rss"][0] / 1024
        self.results["memory"] = {"start_kib": start_kib, "after": rss,
                                  "requests": self.args.rss_requests}
        print(f"\n## Memory after {self.args.rss_requests} requests (SDK mix, fresh agent)")
        print(f"agent RSS {start_kib / 1024:.1f} MB at start, {agent_mb:.1f} MB after "
              f"(peak {rss['agent-rss'][1] / 1024:.1f} MB); bare app {rss['base-rss'][0] / 1024:.1f}"
              f" MB   target <= 80 MB: {verdict(agent_mb <= 80)}")

    def run(self) -> None:
        info = self.results["machine"]
        print(f"# {info['cpus']} CPUs ({info['cpu']}), kernel {info['kernel']}, Python "
              f"{info['python']}, load average {info['load_average'][0]:.2f} at start")
        phases = self.args.phases.split(",")
        if not self.args.no_compile:
            print(f"# agent bytecode written for {', '.join(compile_agent())}")
        try:
            if "startup" in phases:
                self.startup()
            servers = {name: self.server(name) for name in ("base", "floor", "agent")}
            wanted = {"ratios", "mix", "longlog"} & set(phases)
            if wanted:
                for server in servers.values():
                    server.start()
                try:
                    if "ratios" in phases:
                        self.ratios(servers)
                    if "mix" in phases:
                        self.mixed(servers["agent"])
                    if "longlog" in phases:
                        self.long_log(servers)
                finally:
                    for server in servers.values():
                        server.stop()
            if "rss" in phases:
                self.memory()
        finally:
            self.results["machine"]["load_average_end"] = os.getloadavg()
            print(f"\n# load average {os.getloadavg()[0]:.2f} at the end")
            if self.args.json:
                Path(self.args.json).write_text(json.dumps(self.results, indent=1))
                print(f"# results: {self.args.json}")
            shutil.rmtree(self.workdir, ignore_errors=True)


def _call(agent: Server, method: str) -> bytes:
    import socket

    path, body = REQUESTS[method]
    raw = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent.sock))
        s.sendall((f"POST {urllib.parse.quote(path)} HTTP/1.1\r\nHost: x\r\nConnection: close"
                   f"\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw)
        chunks = []
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks).partition(b"\r\n\r\n")[2]


def runtime_events(agent: Server) -> int:
    log = json.loads(json.loads(_call(agent, "GetQuote"))["event_log"])
    return sum(1 for e in log if e["imr"] == 3)


def response_size(agent: Server, method: str) -> int:
    return len(_call(agent, method))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=1.5,
                        help="seconds of each server's busy time per round and method")
    parser.add_argument("--mix-duration", type=float, default=8.0)
    parser.add_argument("--startup-reps", type=int, default=9)
    parser.add_argument("--rss-requests", type=int, default=100_000)
    parser.add_argument("--phases", default="startup,ratios,mix,longlog,rss")
    parser.add_argument("--methods", default=",".join(METHODS), help="for the ratios phase")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--no-compile", action="store_true",
                        help="do not write the agent's bytecode first (see compile_agent)")
    Bench(parser.parse_args()).run()


if __name__ == "__main__":
    main()
