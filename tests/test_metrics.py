"""The request counters of :mod:`dstack_core.server.metrics`: kept with plain integers,
exposed exactly as prometheus_client's labelled Counter and Histogram would expose them."""

from __future__ import annotations

import asyncio
import re
from unittest import mock

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from dstack_core.server.metrics import AgentMetrics

# (method label, status, seconds): bucket edges, the first bucket, the last, +Inf
REQUESTS = [
    ("GetKey", 200, 0.005), ("GetKey", 200, 0.0051), ("GetKey", 503, 0.3),
    ("Info", 200, 0.0), ("Info", 200, 10.0), ("unknown", 404, 12.5),
]


def _created(text: str) -> str:
    return re.sub(r"^(\w+_created(?:\{[^}]*\})?) \S+$", r"\1 T", text, flags=re.M)


def _families(text: str, *names: str) -> str:
    """The lines of ``names``' samples and their HELP/TYPE, in a stable order."""
    return "\n".join(sorted(line for line in _created(text).splitlines()
                            if any(name in line for name in names)))


def test_request_counts_expose_as_prometheus_client_would():
    service = mock.MagicMock(runtime_event_count=0, kms_client=None)
    service.platform.name = "simulator"
    metrics = AgentMetrics(service)
    middleware = metrics.middleware("dstack", lambda request: request.label)

    reference = CollectorRegistry()
    requests = Counter("dstack_requests", "API requests answered, by listener and method",
                       ["listener", "method"], registry=reference)
    latency = Histogram("dstack_request_duration_seconds", "Time to answer an API request",
                        ["listener", "method"], registry=reference)

    async def drive() -> None:
        for method, status, seconds in REQUESTS:
            async def handler(request: object, status: int = status) -> web.Response:
                return web.Response(status=status)

            with mock.patch("time.monotonic", side_effect=[100.0, 100.0 + seconds]):
                await middleware(mock.Mock(label=method), handler)
            requests.labels("dstack", method).inc()
            latency.labels("dstack", method).observe((100.0 + seconds) - 100.0)

    asyncio.run(drive())
    names = ("dstack_requests_", "dstack_request_duration_seconds")
    ours = _families(metrics.render().decode(), *names)
    assert ours == _families(generate_latest(reference).decode(), *names)
    assert 'dstack_request_duration_seconds_bucket{le="0.005",listener="dstack",' \
           'method="GetKey"} 1.0' in ours
    assert metrics.requests.count("dstack", "GetKey") == 3
    assert metrics.requests.count("tappd", "GetKey") == 0
