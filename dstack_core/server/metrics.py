"""Prometheus metrics of a running agent (``/metrics`` on the external port).

One :class:`AgentMetrics` per agent, with its own registry (never the process-global one):

* ``dstack_requests_total{listener,method}``, ``dstack_request_errors_total{listener,method,
  status}`` and ``dstack_request_duration_seconds{listener,method}`` from a middleware on
  every listener (``dstack``, ``tappd``, ``external``); ``method`` is the RPC method name,
  or ``unknown`` for anything else, so scanners cannot inflate the label set;
* ``dstack_quote_duration_seconds{hook}`` (``get_quote``, ``attest``) and
  ``dstack_platform_call_duration_seconds{hook}`` / ``dstack_platform_call_failures_total``
  from the platform façade;
* ``dstack_runtime_events`` (the runtime event log's length) and ``dstack_agent_info``;
* ``dstack_kms_requests_total{outcome}`` and ``dstack_kms_request_duration_seconds`` with
  KMS-provisioned keys; ``dstack_watchdog_pings_total`` and
  ``dstack_watchdog_probe_failures_total`` under systemd's watchdog;
* with app-compose ``public_sysinfo``, upstream's system figures under upstream's names
  (``system_memory_total``, ``system_load_average_1m``, ``disk_total_size{name,
  mount_point}``, ...; see :class:`SystemCollector`).
"""

from __future__ import annotations

import bisect
import os
import platform as host_platform
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__
from ..service import AgentService

__all__ = ["AgentMetrics", "SystemCollector", "CONTENT_TYPE", "MethodLabel", "Recorder"]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
UNKNOWN_METHOD: Final = "unknown"
QUOTE_HOOKS: Final = frozenset({"get_quote", "attest"})
PROC: Final = Path("/proc")
OS_RELEASE: Final = Path("/etc/os-release")
LOAD_SCALE: Final = 100  # upstream reports load averages as integers, times 100
LATENCY_BOUNDS: Final = Histogram.DEFAULT_BUCKETS
"""Upper bounds of the request latency histogram's buckets (prometheus_client's default)."""
_LE: Final = tuple("+Inf" if b == float("inf") else repr(float(b)) for b in LATENCY_BOUNDS)

MethodLabel = Callable[[web.Request], str]
"""Maps a request to its metrics label: an RPC method name or :data:`UNKNOWN_METHOD`."""
Recorder = Callable[[str, int, float], None]
"""``record(method, status, seconds)``: one answered request (:meth:`AgentMetrics.recorder`)."""


class AgentMetrics:
    """The agent's metrics and the registry that exposes them."""

    def __init__(
        self,
        service: AgentService,
        *,
        public_sysinfo: bool = False,
        data_disks: Sequence[Path] = (Path("/"),),
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = _RequestStats()
        r.register(self.requests)
        self.errors = Counter(
            "dstack_request_errors", "API requests answered with an error status",
            ["listener", "method", "status"], registry=r,
        )
        self.quote_latency = Histogram(
            "dstack_quote_duration_seconds", "Time the platform took to produce a quote",
            ["hook"], registry=r,
        )
        self.platform_latency = Histogram(
            "dstack_platform_call_duration_seconds", "Time of each platform hook call",
            ["hook"], registry=r,
        )
        self.platform_failures = Counter(
            "dstack_platform_call_failures", "Platform hook calls that failed", ["hook"],
            registry=r,
        )
        self.kms_requests = Counter(
            "dstack_kms_requests", "KMS SignCert calls by outcome (ok or an error code)",
            ["outcome"], registry=r,
        )
        self.kms_latency = Histogram(
            "dstack_kms_request_duration_seconds", "Time of KMS SignCert calls", registry=r
        )
        self.watchdog_pings = Counter(
            "dstack_watchdog_pings", "WATCHDOG=1 notifications sent to systemd", registry=r
        )
        self.watchdog_failures = Counter(
            "dstack_watchdog_probe_failures", "Watchdog self-probes that failed", registry=r
        )
        runtime = Gauge("dstack_runtime_events", "Events in the runtime (RTMR3) event log",
                        registry=r)
        runtime.set_function(lambda: service.runtime_event_count)
        Gauge("dstack_agent_info", "The agent's version and platform",
              ["version", "platform"], registry=r).labels(__version__, service.platform.name).set(1)
        self._hook_latency: dict[str, tuple[Any, Any]] = {}
        service.platform.add_call_observer(self._platform_call)
        if service.kms_client is not None:
            service.kms_client.observe = self._kms_call
        if public_sysinfo:
            r.register(SystemCollector(data_disks))

    def _platform_call(self, hook: str, seconds: float, succeeded: bool) -> None:
        # Called on every quote's path, from any thread: the labelled children are looked
        # up once (a race only looks one up twice; labels() returns the same child).
        children = self._hook_latency.get(hook)
        if children is None:
            children = self._hook_latency[hook] = (
                self.platform_latency.labels(hook),
                self.quote_latency.labels(hook) if hook in QUOTE_HOOKS else None,
            )
        children[0].observe(seconds)
        if children[1] is not None:
            children[1].observe(seconds)
        if not succeeded:
            self.platform_failures.labels(hook).inc()

    def _kms_call(self, outcome: str, seconds: float) -> None:
        self.kms_requests.labels(outcome).inc()
        self.kms_latency.observe(seconds)

    def recorder(self, listener: str) -> Recorder:
        """A function that counts and times one answered request of ``listener``:
        ``record(method, status, seconds)``. Cheap: it is on every request's path."""
        counts = self.requests.listener(listener)

        def record(method: str, status: int, seconds: float) -> None:
            timed = counts.get(method)
            if timed is None:
                timed = counts[method] = _Timed()
            timed.count += 1
            timed.sum += seconds
            timed.buckets[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
            if status >= 400:
                self.errors.labels(listener, method, str(status)).inc()

        return record

    def middleware(self, listener: str, label: MethodLabel) -> Middleware:
        """Count and time every request of an app serving ``listener`` (install it
        outermost); the agent's API endpoints use :meth:`recorder` themselves."""
        record = self.recorder(listener)

        @web.middleware
        async def measure(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            started = time.monotonic()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            finally:
                record(label(request), status, time.monotonic() - started)

        return measure

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered."""
        return generate_latest(self.registry)


class _Timed:
    """Requests of one listener and method: how many, their total time and histogram."""

    __slots__ = ("buckets", "count", "created", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * len(LATENCY_BOUNDS)  # not cumulative
        self.created = time.time()


class _RequestStats(Collector):
    """``dstack_requests_total`` and ``dstack_request_duration_seconds``, as a labelled
    Counter and Histogram expose them, but counted with plain integers: only the event loop
    writes them and only the event loop renders them, so a request takes no lock and makes
    no bucket walk (prometheus_client's cost was a few per cent of a cheap request's)."""

    def __init__(self) -> None:
        self._listeners: dict[str, dict[str, _Timed]] = {}

    def listener(self, name: str) -> dict[str, _Timed]:
        """The counts of ``name``'s requests by method, for the middleware to update."""
        return self._listeners.setdefault(name, {})

    def count(self, listener: str, method: str) -> int:
        """How many requests ``listener`` answered for ``method``."""
        timed = self._listeners.get(listener, {}).get(method)
        return 0 if timed is None else timed.count

    def collect(self) -> Iterator[Metric]:
        requests = Metric("dstack_requests", "API requests answered, by listener and method",
                          "counter")
        latency = Metric("dstack_request_duration_seconds", "Time to answer an API request",
                         "histogram")
        for listener, methods in self._listeners.items():
            for method, timed in list(methods.items()):
                labels = {"listener": listener, "method": method}
                requests.add_sample("dstack_requests_total", labels, timed.count)
                requests.add_sample("dstack_requests_created", labels, timed.created)
                total = 0
                for le, n in zip(_LE, timed.buckets, strict=True):
                    total += n
                    latency.add_sample("dstack_request_duration_seconds_bucket",
                                       {**labels, "le": le}, total)
                latency.add_sample("dstack_request_duration_seconds_count", labels, total)
                latency.add_sample("dstack_request_duration_seconds_sum", labels, timed.sum)
                latency.add_sample("dstack_request_duration_seconds_created", labels,
                                   timed.created)
        yield requests
        yield latency


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    for line in _read(PROC / "meminfo").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return values


def _os_release() -> dict[str, str]:
    values = {}
    for line in _read(OS_RELEASE).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value.strip().strip('"')
    return values


def _cpu_model() -> str:
    model = mhz = ""
    for line in _read(PROC / "cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "cpu MHz" and not mhz:
            mhz = value.strip().split(".")[0]
    return f"{model} @{mhz} MHz" if model else ""


def _mounts() -> dict[str, str]:
    """Mount point -> device, from /proc/mounts (the last mount on a point wins)."""
    devices = {}
    for line in _read(PROC / "mounts").splitlines():
        fields = line.split()
        if len(fields) >= 2:
            devices[fields[1].replace("\\040", " ")] = fields[0]
    return devices


class SystemCollector(Collector):
    """Upstream's system figures (``templates/metrics.tpl``) under its metric names, read
    from /proc and ``statvfs`` at scrape time; disks are the configured data disks that
    are mount points."""

    def __init__(self, data_disks: Iterable[Path]) -> None:
        self._data_disks = tuple(data_disks)

    def collect(self) -> Iterator[Metric]:
        release = _os_release()
        yield from (
            _info("system_os_name", "Operating system name", "os_name", release.get("NAME", "")),
            _info("system_os_version", "Operating system version", "os_version",
                  release.get("VERSION_ID", "")),
            _info("system_kernel_version", "Kernel version", "kernel_version",
                  host_platform.release()),
            _info("system_cpu_model", "CPU model information", "cpu_model", _cpu_model()),
        )
        memory = _meminfo()
        total, available = memory.get("MemTotal", 0), memory.get("MemAvailable", 0)
        swap_total, swap_free = memory.get("SwapTotal", 0), memory.get("SwapFree", 0)
        uptime = _read(PROC / "uptime").split()
        load = os.getloadavg()
        for name, help_text, value in (
            ("system_num_cpus", "Number of logical CPUs", os.cpu_count() or 0),
            ("system_memory_total", "Total memory in bytes", total),
            ("system_memory_available", "Available memory in bytes", available),
            ("system_memory_used", "Used memory in bytes", total - available),
            ("system_memory_free", "Free memory in bytes", memory.get("MemFree", 0)),
            ("system_swap_total", "Total swap memory in bytes", swap_total),
            ("system_swap_used", "Used swap memory in bytes", swap_total - swap_free),
            ("system_swap_free", "Free swap memory in bytes", swap_free),
            ("system_uptime", "System uptime in seconds",
             int(float(uptime[0])) if uptime else 0),
            ("system_load_average_1m", "System load average (1 minute)",
             int(load[0] * LOAD_SCALE)),
            ("system_load_average_5m", "System load average (5 minutes)",
             int(load[1] * LOAD_SCALE)),
            ("system_load_average_15m", "System load average (15 minutes)",
             int(load[2] * LOAD_SCALE)),
        ):
            yield GaugeMetricFamily(name, help_text, value=value)
        yield from self._disks()

    def _disks(self) -> Iterator[Metric]:
        labels = ["name", "mount_point"]
        families = {
            key: GaugeMetricFamily(f"disk_{key}", text, labels=labels)
            for key, text in (
                ("total_size", "Disk total size in bytes"),
                ("free_size", "Disk free size in bytes"),
                ("used_size", "Disk used size in bytes"),
                ("usage_percentage", "Disk usage percentage"),
            )
        }
        devices = _mounts()
        for disk in sorted(self._data_disks):
            point = os.fspath(disk)
            if point not in devices:
                continue
            try:
                stats = os.statvfs(point)
            except OSError:
                continue
            total = stats.f_blocks * stats.f_frsize
            free = stats.f_bavail * stats.f_frsize
            values = {
                "total_size": total,
                "free_size": free,
                "used_size": total - free,
                "usage_percentage": (total - free) / total * 100 if total else 0,
            }
            for key, family in families.items():
                family.add_metric([devices[point], point], values[key])
        yield from families.values()


def _info(name: str, help_text: str, label: str, value: str) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=[label])
    family.add_metric([value], 1)
    return family
