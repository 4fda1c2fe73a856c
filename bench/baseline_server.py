#!/usr/bin/env python3
"""Baseline ("physical ceiling") server for the dstack guest-agent benchmark.

A bare aiohttp app on a Unix socket. Every dstack path reads the request body,
parses it as JSON (when non-empty) and answers a small constant JSON object.
No crypto, no logging, no middleware: whatever an aiohttp implementation of the
agent does on top of this is the cost being measured by compare.py.

Usage:  python3 baseline_server.py SOCKET_PATH [--uvloop] [--body-size=N]

--body-size=N answers N bytes of JSON instead (a string of that length): the cost of
sending a response as large as one of the agent's, with nothing else to do.

Copied from the project's reference benchmark harness (shared bench/, "baseline_server.py")
with --body-size added; see bench/README.md.
"""
import asyncio
import json
import os
import signal
import sys

from aiohttp import web

PATHS = ("GetKey", "Sign", "Verify", "Info", "GetQuote", "GetTlsKey",
         "Attest", "EmitEvent", "Version", "GpuInfo")
CONST = b'{"ok":true}'


async def handler(request: web.Request) -> web.Response:
    body = await request.read()
    if body:
        json.loads(body)
    return web.Response(body=CONST, content_type="application/json")


def sized(size: int) -> bytes:
    return b'{"blob":"' + b"a" * max(0, size - 11) + b'"}'



async def main(sock: str) -> None:
    app = web.Application()
    for p in PATHS:
        app.router.add_post("/" + p, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        os.unlink(sock)
    except FileNotFoundError:
        pass
    site = web.UnixSite(runner, sock)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit(__doc__)
    for option in sys.argv[1:]:
        if option.startswith("--body-size="):
            CONST = sized(int(option.split("=", 1)[1]))
    if "--uvloop" in sys.argv:
        import uvloop
        uvloop.run(main(args[0]))
    else:
        asyncio.run(main(args[0]))
