"""The caller policy and the audit log, applied to every API call by its resolved method.

:func:`~dstack_core.server.app.create_app` hands each call, once its route has resolved
the method name (``/M``, ``/prpc/M``, ``/prpc/Tappd.M``, on any socket the app serves) and
decoded its arguments, to :meth:`Guard.run`. Without a policy, an audit log or a guarded
TCP listener there is no guard at all, and calls go straight to their handler.

Order for one call: identify the caller (once per connection), let the policy decide,
record a denial (and answer 403), or for an audited method record the call *before* it
runs: if that record cannot be written the call is refused with 503 ``audit_unavailable``
and nothing happens. A call that then fails gets a second record with its error code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from .. import __version__
from ..audit import AuditLog
from ..errors import AuditUnavailable, DstackError, Forbidden
from ..peercred import caller_of_socket
from ..policy import AUDITED, TCP_GUARDED, Call, Caller, Decision, Policy

__all__ = ["Guard", "audit_args", "tcp_notice"]

log = logging.getLogger(__name__)

MAX_AUDIT_TEXT: Final = 1024
"""Longer strings (a path, a name) are recorded as a prefix, their length and SHA-256."""
MAX_AUDIT_NAMES: Final = 64

Invoke = Callable[[], Awaitable[Any]]
"""The call a guard decides on; its answer passes through untouched."""


def _text(value: str) -> str:
    data = value.encode()
    if len(data) <= MAX_AUDIT_TEXT:
        return value
    prefix = data[:MAX_AUDIT_TEXT // 4].decode(errors="ignore")
    return f"{prefix}... [{len(data)} bytes, sha256:{hashlib.sha256(data).hexdigest()}]"


def _names(values: tuple[str, ...]) -> list[str]:
    names = [_text(v) for v in values[:MAX_AUDIT_NAMES]]
    if len(values) > MAX_AUDIT_NAMES:
        names.append(f"... [{len(values) - MAX_AUDIT_NAMES} more]")
    return names


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


def audit_args(method: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """What the audit log records of a call's arguments: never a secret or a payload.

    GetKey and DeriveK256Key: path, purpose, algorithm. GetTlsKey: subject, alt names and
    the RA-TLS flag. DeriveKey: path, subject, alt names, random_seed. Sign: algorithm and
    the SHA-256 and length of the data. EmitEvent: the event name and the SHA-256 and
    length of the payload. Other methods: nothing.
    """
    if method in ("GetKey", "DeriveK256Key"):
        return {"path": _text(args["path"]), "purpose": _text(args["purpose"]),
                "algorithm": _text(args["algorithm"])}
    if method == "GetTlsKey":
        return {"subject": _text(args["subject"]), "alt_names": _names(args["alt_names"]),
                "usage_ra_tls": args["usage_ra_tls"]}
    if method == "DeriveKey":
        return {"path": _text(args["path"]), "subject": _text(args["subject"]),
                "alt_names": _names(args["alt_names"]), "random_seed": args["random_seed"]}
    if method == "Sign":
        return {"algorithm": _text(args["algorithm"]), "data": _digest(args["data"])}
    if method == "EmitEvent":
        return {"event": _text(args["event"]), "payload": _digest(args["payload"])}
    return {}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def tcp_notice(policy: Policy, *, simulated: bool, platform: str, address: str) -> str:
    """The start-up line saying what the TCP listener at ``address`` serves."""
    if simulated:
        return (f"TCP listener {address}: platform {platform} is simulated, so its "
                "unauthenticated clients (the caller 'tcp') get what the policy allows, "
                "everything without one")
    granted = policy.grants_tcp()
    withheld = sorted(TCP_GUARDED - granted)
    notice = f"TCP listener {address}: platform {platform} is not simulated"
    if withheld:
        notice += (f"; key-bearing and measurement-changing methods are not served over TCP "
                   f"({', '.join(withheld)}) unless a policy rule with match = {{ tcp = true }} "
                   "grants them")
    if granted:
        notice += (f"; the policy grants {', '.join(sorted(granted))} to unauthenticated TCP "
                   "clients")
    return notice


class Guard:
    """Applies ``policy`` to each call and records audited calls in the log at
    ``audit_path`` (if any).

    :param tcp_guarded: the agent listens on TCP and its platform is not simulated.
    :param platform: the platform's name, for the audit log's start records.
    """

    def __init__(
        self, *, policy: Policy, tcp_guarded: bool, audit_path: Path | None, platform: str
    ) -> None:
        self.policy = policy
        self.tcp_guarded = tcp_guarded
        self.audit_path = audit_path
        self.platform = platform
        self._audit: AuditLog | None = None
        self._with_cgroup = policy.uses_cgroup or audit_path is not None
        self._callers: weakref.WeakKeyDictionary[object, Caller] = weakref.WeakKeyDictionary()

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: open the audit log before serving, close it after.

        :raises ConfigurationError: the audit log cannot be opened or continued.
        """
        if self.audit_path is not None:
            self._audit = await asyncio.to_thread(self._open_audit, self.audit_path)
        try:
            yield
        finally:
            if self._audit is not None:
                await self._audit.close()

    def _open_audit(self, path: Path) -> AuditLog:
        audit, torn = AuditLog.open(path)
        start: dict[str, Any] = {
            "time": _now(), "event": "start", "agent": __version__, "platform": self.platform,
            "policy": self.policy.digest, "tcp_guarded": self.tcp_guarded,
        }
        if torn:
            start["torn_bytes_removed"] = torn
        # Unwritable now (logged): serve, refusing audited calls until it heals.
        with contextlib.suppress(AuditUnavailable):
            audit.append_sync(start)
        return audit

    def caller(self, request: web.Request) -> Caller:
        """The caller on ``request``'s connection, identified once per connection.

        :raises ConnectionResetError: the connection is gone.
        """
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None:
            raise ConnectionResetError("client disconnected")
        caller = self._callers.get(transport)
        if caller is None:
            try:
                caller = caller_of_socket(sock, with_cgroup=self._with_cgroup)
            except OSError:
                raise ConnectionResetError("client disconnected") from None
            self._callers[transport] = caller
        return caller

    async def run(
        self, request: web.Request, method: str, args: Mapping[str, Any], invoke: Invoke
    ) -> Any:
        """Decide, record and make the call ``invoke`` (``method`` with ``args``).

        :raises Forbidden: the policy denies it (recorded).
        :raises AuditUnavailable: it is audited and its record cannot be written.
        """
        caller = self.caller(request)
        decision = self.policy.decide(
            caller, Call.from_args(method, args), tcp_guarded=self.tcp_guarded
        )
        if not decision.allowed:
            log.debug("denied %s to %s: %s", method, caller, decision.reason)
            await self._record(caller, method, args, "denied", decision, code=Forbidden.code,
                               required=False)
            raise Forbidden(decision.reason)
        if self._audit is None or method not in AUDITED:
            return await invoke()
        await self._record(caller, method, args, "allowed", decision)
        try:
            return await invoke()
        except Exception as exc:
            code = exc.code if isinstance(exc, DstackError) else "internal_error"
            await self._record(caller, method, args, "failed", decision, code=code,
                               required=False)
            raise

    async def _record(
        self,
        caller: Caller,
        method: str,
        args: Mapping[str, Any],
        outcome: str,
        decision: Decision,
        *,
        code: str | None = None,
        required: bool = True,
    ) -> None:
        """Append one call record; ``required`` ones raise when they cannot be written."""
        if self._audit is None:
            return
        entry: dict[str, Any] = {
            "time": _now(), "event": "call", "caller": caller.to_json(), "method": method,
            "outcome": outcome, "rule": decision.rule, "args": audit_args(method, args),
        }
        if caller.peer is not None:
            entry["peer"] = caller.peer
        if code is not None:
            entry["code"] = code
        if not decision.allowed:
            entry["reason"] = decision.reason
        try:
            await self._audit.append(entry)
        except AuditUnavailable:
            if required:
                raise
