"""Caller policy: which local process, or TCP client, may call which agent method.

A caller is a process on the Unix socket, known by its peer credentials (pid, uid, gid)
and the cgroup of that pid (:mod:`dstack_core.peercred`), or the caller ``tcp``: anyone
on the TCP listener. The policy is a TOML file (``dstack-agent serve --policy FILE``)::

    default = "allow"                   # or "deny": for callers no rule matches
    [[rule]]
    match = { uid = 1000 }              # any of: uid, gid, cgroup (glob), tcp = true
    methods = ["GetKey", "Info"]        # DstackGuest and Tappd method names; "*" = all
    key_paths = ["app/web/"]            # prefixes of derivation paths; absent = any
    tls_names = ["web.example.com"]     # globs for certificate names; absent = any

The first rule whose ``match`` fits the caller decides, for the method however it is
reached (``/M``, ``/prpc/M``, ``/prpc/Tappd.M``, any socket): the server resolves the
method before asking. Every key of a ``match`` must fit (``uid`` and ``gid`` also take a
list). A caller no rule matches gets ``default``; without ``default`` the policy denies.

What each rule key constrains:

* ``key_paths``: the derivation path of every path-derived key the call uses: GetKey's and
  DeriveK256Key's ``path``, DeriveKey's ``path``, and ``vms`` for Sign (Sign signs with
  GetKey("vms")'s key). Paths are compared as plain string prefixes; the agent never
  normalises a path, and a different string always derives a different key.
* ``tls_names``: the subject and every alt name of a certificate (GetTlsKey, DeriveKey).
  GetTlsKey has no derivation path, so a rule with ``key_paths`` grants it only with
  ``tls_names``: a confined caller must not obtain certificates for any name it likes.

Two rules no policy file can lift: a TCP caller on a platform that is not simulated gets
no :data:`TCP_GUARDED` method unless a ``tcp = true`` rule grants it (``default = "allow"``
is not enough); and when a rule matches on ``cgroup`` and the caller's cgroup cannot be
read, that rule cannot be judged, so the call is denied.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import tomllib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from .errors import ConfigurationError
from .keys import SIGN_KEY_PATH

__all__ = [
    "AUDITED",
    "KEY_BEARING",
    "MEASUREMENT_CHANGING",
    "TCP_GUARDED",
    "Call",
    "Caller",
    "Decision",
    "Match",
    "Policy",
    "Rule",
    "load_policy",
    "parse_policy",
]

log = logging.getLogger(__name__)

KEY_BEARING: Final = frozenset({"GetKey", "GetTlsKey", "Sign", "DeriveKey", "DeriveK256Key"})
"""Methods that hand out a key or a certificate of the app, or use its key: they derive from
the app key, so whoever may call them acts as the app."""
MEASUREMENT_CHANGING: Final = frozenset({"EmitEvent"})
"""Methods that extend a measurement register (RTMR3)."""
AUDITED: Final = KEY_BEARING | MEASUREMENT_CHANGING
"""Methods the audit log records every call of (denials of any method are recorded too)."""
TCP_GUARDED: Final = AUDITED
"""Methods TCP clients of a non-simulated platform get only through a ``tcp = true`` rule."""

CERTIFYING: Final = frozenset({"GetTlsKey", "DeriveKey"})
_PATH_ARGUMENT: Final = {"GetKey": "path", "DeriveK256Key": "path", "DeriveKey": "path"}
_DEFAULTS: Final = {"allow": True, "deny": False}
_TOP_KEYS: Final = frozenset({"default", "rule"})
_RULE_KEYS: Final = frozenset({"match", "methods", "key_paths", "tls_names"})
_MATCH_KEYS: Final = ("uid", "gid", "cgroup", "tcp")
_ID_MAX: Final = 2**32 - 1
ALL_METHODS: Final = "*"


@attrs.frozen(kw_only=True)
class Caller:
    """Who is calling. A Unix-socket peer has ``pid``/``uid``/``gid`` from SO_PEERCRED and
    ``cgroup`` from ``/proc/<pid>/cgroup`` (None when it could not be read, or was not
    needed); a TCP client has ``tcp`` set and ``peer``, its address, for the audit log."""

    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    cgroup: str | None = None
    tcp: bool = False
    peer: str | None = None

    def to_json(self) -> str | dict[str, Any]:
        """The audit log's ``caller``: ``"tcp"`` or ``{pid, uid, gid, cgroup}``."""
        if self.tcp:
            return "tcp"
        return {"pid": self.pid, "uid": self.uid, "gid": self.gid, "cgroup": self.cgroup}


@attrs.frozen(kw_only=True)
class Call:
    """What a policy judges: the resolved method, the derivation path of the key it uses
    (None when it uses none) and the names it asks a certificate for."""

    method: str
    key_path: str | None = None
    tls_names: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, method: str, args: Mapping[str, Any]) -> Call:
        """The call ``method`` makes with its decoded request arguments ``args``."""
        argument = _PATH_ARGUMENT.get(method)
        key_path = args.get(argument, "") if argument else None
        if method == "Sign":
            key_path = SIGN_KEY_PATH
        names: tuple[str, ...] = ()
        if method in CERTIFYING:
            subject = args.get("subject", "")
            names = ((subject,) if subject else ()) + tuple(args.get("alt_names", ()))
        return cls(method=method, key_path=key_path, tls_names=names)


@attrs.frozen
class Decision:
    """A policy's answer. ``reason`` names the call, never the policy: it is the 403 body.
    ``rule`` is the deciding rule's number (1-based), None for the default or a built-in."""

    allowed: bool
    reason: str = ""
    rule: int | None = None


ALLOWED_BY_DEFAULT: Final = Decision(True)


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


@attrs.frozen(kw_only=True)
class Match:
    """A rule's ``match``: every criterion given must fit. ``cgroup`` is a glob in
    :mod:`fnmatch` syntax (``*`` also matches ``/``)."""

    uid: frozenset[int] | None = None
    gid: frozenset[int] | None = None
    cgroup: str | None = None
    tcp: bool | None = None
    _cgroup_re: re.Pattern[str] | None = attrs.field(
        init=False, eq=False, repr=False,
        default=attrs.Factory(lambda self: self.cgroup and _glob(self.cgroup), takes_self=True),
    )

    def fits(self, caller: Caller) -> bool | None:
        """True or False; None when it depends on a cgroup that could not be read."""
        if self.tcp is not None and caller.tcp != self.tcp:
            return False
        if caller.tcp:
            # A TCP client has no uid, gid or cgroup: only a tcp = true rule names it.
            return self.tcp is True
        if self.uid is not None and caller.uid not in self.uid:
            return False
        if self.gid is not None and caller.gid not in self.gid:
            return False
        if self._cgroup_re is not None:
            if caller.cgroup is None:
                return None
            return self._cgroup_re.fullmatch(caller.cgroup) is not None
        return True


@attrs.frozen(kw_only=True)
class Rule:
    """One ``[[rule]]``; ``None`` for ``methods``, ``key_paths`` or ``tls_names`` = any."""

    number: int
    match: Match
    methods: frozenset[str] | None
    key_paths: tuple[str, ...] | None = None
    tls_names: tuple[str, ...] | None = None
    _tls_res: tuple[re.Pattern[str], ...] = attrs.field(
        init=False, eq=False, repr=False,
        default=attrs.Factory(lambda self: tuple(map(_glob, self.tls_names or ())),
                              takes_self=True),
    )

    def judge(self, call: Call) -> Decision:
        """Whether this rule, having matched the caller, grants ``call``."""
        if self.methods is not None and call.method not in self.methods:
            return Decision(False, f"this caller may not call {call.method}", self.number)
        if self.key_paths is not None and call.key_path is not None and not any(
            call.key_path.startswith(prefix) for prefix in self.key_paths
        ):
            return Decision(
                False, f"this caller may not use key path {call.key_path!r} ({call.method})",
                self.number,
            )
        if call.method in CERTIFYING:
            if self.tls_names is None and self.key_paths is not None and call.key_path is None:
                return Decision(
                    False, f"this caller may not obtain certificates ({call.method})", self.number
                )
            for name in call.tls_names if self.tls_names is not None else ():
                if not any(pattern.fullmatch(name) for pattern in self._tls_res):
                    return Decision(
                        False,
                        f"this caller may not obtain a certificate for {name!r} ({call.method})",
                        self.number,
                    )
        return Decision(True, rule=self.number)


@attrs.frozen(kw_only=True)
class Policy:
    """A validated caller policy. ``Policy()`` allows everyone everything (no file given).

    :ivar source: the file it was read from; :ivar digest: SHA-256 (hex) of that file's
        bytes, which the audit log records at start-up instead of the contents.
    """

    default_allow: bool = True
    rules: tuple[Rule, ...] = ()
    source: Path | None = None
    digest: str | None = None

    @property
    def uses_cgroup(self) -> bool:
        """Whether any rule matches on cgroup (callers' cgroups must then be read)."""
        return any(rule.match.cgroup is not None for rule in self.rules)

    def grants_tcp(self) -> frozenset[str]:
        """The :data:`TCP_GUARDED` methods some ``tcp = true`` rule may grant."""
        granted: set[str] = set()
        for rule in self.rules:
            if rule.match.tcp:
                granted |= TCP_GUARDED if rule.methods is None else TCP_GUARDED & rule.methods
        return frozenset(granted)

    def decide(self, caller: Caller, call: Call, *, tcp_guarded: bool) -> Decision:
        """The first rule that matches ``caller`` decides ``call``; else the default.

        :param tcp_guarded: the platform is not simulated, so a TCP caller gets the
            :data:`TCP_GUARDED` methods only from a rule (which then says ``tcp = true``).
        """
        for rule in self.rules:
            fits = rule.match.fits(caller)
            if fits is None:
                return Decision(False, f"the caller's identity could not be established "
                                       f"({call.method})", rule.number)
            if fits:
                return rule.judge(call)
        if caller.tcp and tcp_guarded and call.method in TCP_GUARDED:
            return Decision(False, f"{call.method} is not served over TCP on this platform")
        if self.default_allow:
            return ALLOWED_BY_DEFAULT
        return Decision(False, f"this caller may not call {call.method}")


class _Where:
    """Builds start-up errors that name the file, the rule and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, where: str, what: str) -> ConfigurationError:
        return ConfigurationError(f"policy file {self.source}: {where}: {what}")


def _ids(value: Any, where: str, at: _Where) -> frozenset[int]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _ID_MAX for v in values
    ):
        raise at.error(where, f"must be an id (0..{_ID_MAX}) or a non-empty list of ids, "
                              f"got {value!r}")
    return frozenset(values)


def _strings(value: Any, where: str, at: _Where, *, empty_ok: bool) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise at.error(where, f"must be a list of strings, got {value!r}")
    if not empty_ok and any(not v for v in value):
        raise at.error(where, "must not contain an empty string")
    return tuple(value)


def _parse_match(value: Any, where: str, at: _Where) -> Match:
    if not isinstance(value, dict):
        raise at.error(where, "must be a table, e.g. match = { uid = 1000 }")
    unknown = sorted(set(value) - set(_MATCH_KEYS))
    if unknown:
        raise at.error(f"{where}.{unknown[0]}",
                       f"unknown key (known: {', '.join(_MATCH_KEYS)})")
    if not value:
        raise at.error(where, f"needs at least one of {', '.join(_MATCH_KEYS)} "
                              "(use 'default' for callers no rule matches)")
    fields: dict[str, Any] = {}
    for key in ("uid", "gid"):
        if key in value:
            fields[key] = _ids(value[key], f"{where}.{key}", at)
    if "cgroup" in value:
        glob = value["cgroup"]
        if not isinstance(glob, str) or not glob.startswith(("/", "*")):
            raise at.error(f"{where}.cgroup",
                           f"must be a glob on the cgroup path (which starts with '/'), "
                           f"got {glob!r}")
        fields["cgroup"] = glob
    if "tcp" in value:
        if not isinstance(value["tcp"], bool):
            raise at.error(f"{where}.tcp", f"must be true or false, got {value['tcp']!r}")
        if value["tcp"] and len(value) > 1:
            raise at.error(f"{where}.tcp",
                           "tcp = true cannot be combined with uid, gid or cgroup "
                           "(TCP clients have none)")
        fields["tcp"] = value["tcp"]
    return Match(**fields)


def _parse_methods(value: Any, where: str, at: _Where, known: Collection[str]) -> frozenset[str] | None:
    names = _strings(value, where, at, empty_ok=False)
    for name in names:
        if name != ALL_METHODS and name not in known:
            hint = (f"; write {name.rpartition('.')[2]!r}" if "." in name
                    else f" (known: {', '.join(sorted(known))}, or \"*\")")
            raise at.error(where, f"unknown method {name!r}{hint}")
    return None if ALL_METHODS in names else frozenset(names)


def _parse_rule(number: int, doc: Any, at: _Where, known: Collection[str]) -> Rule:
    where = f"rule {number}"
    if not isinstance(doc, dict):
        raise at.error(where, "must be a table ([[rule]])")
    unknown = sorted(set(doc) - _RULE_KEYS)
    if unknown:
        raise at.error(f"{where}: {unknown[0]}",
                       f"unknown key (known: {', '.join(sorted(_RULE_KEYS))})")
    for required in ("match", "methods"):
        if required not in doc:
            raise at.error(f"{where}: {required}", "missing (every rule needs match and methods)")
    key_paths = tls_names = None
    if "key_paths" in doc:
        key_paths = _strings(doc["key_paths"], f"{where}: key_paths", at, empty_ok=True)
        for prefix in key_paths:
            if prefix and not prefix.endswith("/"):
                log.warning("policy file %s: %s: key path prefix %r has no trailing '/', so "
                            "it also grants paths such as %r", at.source, where, prefix,
                            prefix + "2/key")
    if "tls_names" in doc:
        tls_names = _strings(doc["tls_names"], f"{where}: tls_names", at, empty_ok=False)
    return Rule(
        number=number,
        match=_parse_match(doc["match"], f"{where}: match", at),
        methods=_parse_methods(doc["methods"], f"{where}: methods", at, known),
        key_paths=key_paths,
        tls_names=tls_names,
    )


def parse_policy(text: str, *, source: str, methods: Collection[str]) -> Policy:
    """Validate a policy document.

    :param source: the file name, for error messages.
    :param methods: every method name the API serves.
    :raises ConfigurationError: naming ``source``, the rule (1-based) and the key.
    """
    at = _Where(source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"policy file {source}: not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise at.error(unknown[0], "unknown key (known: default, rule)")
    default = doc.get("default", "deny")
    if default not in _DEFAULTS:
        raise at.error("default", f'must be "allow" or "deny", got {default!r}')
    rules = doc.get("rule", [])
    if not isinstance(rules, list):
        raise at.error("rule", "must be an array of tables: write each rule as [[rule]]")
    return Policy(
        default_allow=_DEFAULTS[default],
        rules=tuple(_parse_rule(i, r, at, methods) for i, r in enumerate(rules, start=1)),
    )


def load_policy(path: Path, *, methods: Collection[str]) -> Policy:
    """Read and validate the policy file at ``path``.

    :raises ConfigurationError: unreadable, not UTF-8 TOML, or invalid (see
        :func:`parse_policy`).
    """
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read policy file {path}: {exc}") from None
    policy = parse_policy(text, source=str(path), methods=methods)
    return attrs.evolve(policy, source=path, digest=hashlib.sha256(data).hexdigest())
