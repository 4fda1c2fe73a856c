"""Find secrets in logs: the scanner behind the "no secret is ever logged" check.

A test run registers the secrets it knows (:func:`register_secret`, or the key files of
:func:`register_key_files`); :func:`scan_file` then looks for them in a log in every form a
careless log call could print them:

* hex, any case, also inside a longer hex string;
* base64, standard or URL-safe, at any byte alignment (so inside the base64 of a larger
  structure, such as the PKCS#8 DER of a PEM key), also across PEM line breaks and the
  ``\\n`` escapes of a JSON string or a ``repr``;
* Python's ``bytes`` repr (``b'\\xd6\\xe8...'``).

Any 16 consecutive bytes of a secret are found (18 in base64), so printing part of a key is
caught as well; stretches that long do not occur by chance.

What a secret is: any registered byte string. :func:`register_key_files` knows upstream's
``appkeys.json`` (the k256 key, the disk and env keys, the CA key's scalar) and the
simulator's 32-byte seed files (the mock PKI seed, and the root CA and
PCK keys derived from it). :func:`register_answer` takes the private keys an agent answered
(GetKey, GetTlsKey, DeriveKey, DeriveK256Key): the test kit's ``uds_request`` calls it.

The pytest plugin :mod:`dstack_core.testing.logscan_plugin` runs the scan over a whole
session's logs and fails the run on any hit.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "LOG_DIR_ENV",
    "Hit",
    "Needles",
    "log_file",
    "record_output",
    "register_answer",
    "register_key_files",
    "register_secret",
    "registered_secrets",
    "scan_file",
    "scan_text",
    "secrets_of_key_file",
]

LOG_DIR_ENV: Final = "DSTACK_TEST_LOG_DIR"
"""Where the test kit writes the logs of the processes it starts, when a scan is on."""

WINDOW: Final = 16
"""Bytes of a secret that make a hit (hex and repr forms; base64: 18 bytes)."""
# A text is probed every _STEP characters with a needle of _PROBE characters, 96 bits
# (nothing matches by chance); needles stand at every character offset of a secret's hex
# or base64, so any stretch of _PROBE + _STEP characters of it holds a probed needle:
# 32 hex characters (16 bytes) or 24 base64 characters (18 bytes). Probing every 8th
# offset instead of every one makes the scan 8 times faster.
_PROBE: Final = 24
_B64_PROBE: Final = 16
_STEP: Final = 8
_RAW_PROBE: Final = 12  # bytes, probed every 4: any 16 bytes of a secret hold one
_RAW_STEP: Final = 4
MIN_SECRET: Final = 20
"""Shorter byte strings are not registered: they could occur by chance."""

_lock = threading.Lock()
_secrets: dict[bytes, str] = {}

_HEX_RUN: Final = re.compile(f"[0-9a-fA-F]{{{_PROBE + _STEP},}}")
_B64_RUN: Final = re.compile(f"[A-Za-z0-9+/_-]{{{_B64_PROBE + _STEP},}}")
_ESCAPED_NEWLINE: Final = re.compile(r"\\[rn]")
_REPR_SPAN: Final = re.compile(r"(?:\\x[0-9a-fA-F]{2}|\\[\\'\"tnr]|[ -\[\]-~])+")
_PEM_LINE: Final = re.compile(r"[A-Za-z0-9+/=]{16,}")
_URLSAFE: Final = str.maketrans("-_", "+/")
_SEED_SUFFIX: Final = ".seed"
_SEED_SIZE: Final = 32
_KEY_FIELDS: Final = ("k256_key", "disk_crypt_key", "env_crypt_key")


def register_secret(secret: bytes, label: str) -> None:
    """Remember ``secret`` (named ``label`` in reports) for the scan."""
    if len(secret) >= MIN_SECRET:
        with _lock:
            _secrets.setdefault(bytes(secret), label)


def registered_secrets() -> dict[bytes, str]:
    """Every secret registered so far, with its label."""
    with _lock:
        return dict(_secrets)


def _private_key_secrets(key: object, label: str) -> list[tuple[str, bytes]]:
    # Only the scalar: a PKCS#8 or SEC1 encoding also holds the public key and OIDs, which
    # appear in certificates. The base64 windows find the scalar inside either encoding.
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return []
    size = (key.curve.key_size + 7) // 8
    return [(label, key.private_numbers().private_value.to_bytes(size, "big"))]


def _pem_key_secrets(pem: str, label: str) -> list[tuple[str, bytes]]:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        return []
    return _private_key_secrets(key, label)


def secrets_of_key_file(path: Path) -> list[tuple[str, bytes]]:
    """The secrets in an ``appkeys.json`` or a 32-byte ``*.seed`` file; [] for anything else."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    name = path.name
    if name.endswith(_SEED_SUFFIX) and len(data) == _SEED_SIZE:
        found = [(f"{name}", data)]
        # The simulator's mock PKI derives its keys from the seed; derive them the same way.
        from .. import mockpki

        for role in ("root-ca", "pck-leaf", "pck-platform-ca"):
            found += _private_key_secrets(mockpki._derive_key(data, role), f"{name} {role} key")
        return found
    if "appkeys" not in name or not name.endswith(".json"):
        return []
    try:
        doc = json.loads(data)
    except ValueError:
        return []
    if not isinstance(doc, dict):
        return []
    found = []
    for field in _KEY_FIELDS:
        value = doc.get(field)
        if isinstance(value, str):
            try:
                found.append((f"{name} {field}", bytes.fromhex(value)))
            except ValueError:
                pass
    provider = doc.get("key_provider")
    if isinstance(provider, dict):
        for body in provider.values():
            if isinstance(body, dict) and isinstance(body.get("key"), str):
                found += _pem_key_secrets(body["key"], f"{name} CA key")
    return found


def register_key_files(*roots: Path) -> None:
    """Register the secrets of every key file (see :func:`secrets_of_key_file`) at or under
    each of ``roots`` (files or directories; missing ones are skipped)."""
    for root in roots:
        paths: Iterable[Path]
        if root.is_dir():
            paths = (p for p in root.rglob("*") if p.name.endswith((".json", _SEED_SUFFIX)))
        else:
            paths = (root,)
        for path in paths:
            for label, secret in secrets_of_key_file(path):
                register_secret(secret, label)


def register_answer(payload: bytes) -> None:
    """Register the private keys in an agent's JSON answer (cheap for other answers)."""
    if b'"key"' not in payload and b'"k256_key"' not in payload:
        return
    try:
        doc = json.loads(payload)
    except ValueError:
        return
    if not isinstance(doc, dict):
        return
    for field in ("key", "k256_key"):
        value = doc.get(field)
        if not isinstance(value, str):
            continue
        if value.startswith("-----BEGIN"):
            for label, secret in _pem_key_secrets(value, f"answered {field}"):
                register_secret(secret, label)
        else:
            try:
                register_secret(bytes.fromhex(value), f"answered {field}")
            except ValueError:
                pass


def log_file(name: str) -> Path:
    """A fresh file for the log of a process a test starts.

    In :data:`LOG_DIR_ENV` when a scan is on (so the log outlives the test's temporary
    directory), else in a new temporary directory.
    """
    directory = os.environ.get(LOG_DIR_ENV) or tempfile.mkdtemp(prefix="dsk-log-")
    fd, path = tempfile.mkstemp(prefix=f"{name}-", suffix=".log", dir=directory)
    os.close(fd)
    return Path(path)


def record_output(name: str, output: str | bytes | None) -> None:
    """Keep captured output (a subprocess's stderr) for the scan; no-op when none is on."""
    if not output or not os.environ.get(LOG_DIR_ENV):
        return
    data = output.encode("utf-8", "replace") if isinstance(output, str) else output
    log_file(name).write_bytes(data)


@attrs.frozen
class Hit:
    """A secret found in a log: where, which one (by label) and in what form."""

    source: str
    line: int
    label: str
    form: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.label} ({self.form})"


@attrs.frozen
class Needles:
    """Lookup tables of every window of every secret, by form."""

    hex: dict[str, str]
    base64: dict[str, str]
    raw: dict[bytes, str]

    @classmethod
    def of(cls, secrets: dict[bytes, str]) -> Needles:
        hex_: dict[str, str] = {}
        b64: dict[str, str] = {}
        raw: dict[bytes, str] = {}
        for secret, label in secrets.items():
            for i in range(len(secret) - _RAW_PROBE + 1):
                raw[secret[i:i + _RAW_PROBE]] = label
            hex_.update(dict.fromkeys(_all_windows(secret.hex(), _PROBE), label))
            for skip in range(3):
                # Inside a larger base64 text the secret starts at one of three alignments.
                aligned = secret[skip:]
                aligned = aligned[: len(aligned) // 3 * 3]
                text = base64.b64encode(aligned).decode()
                b64.update(dict.fromkeys(_all_windows(text, _B64_PROBE), label))
        return cls(hex_, b64, raw)

    def __bool__(self) -> bool:
        return bool(self.raw)


def _all_windows(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(len(text) - size + 1)]


def _probes(run: str, size: int) -> Iterator[str]:
    for i in range(0, len(run) - size + 1, _STEP):
        yield run[i:i + size]


def _scan_line(line: str, needles: Needles) -> Iterator[tuple[str, str]]:
    for match in _HEX_RUN.finditer(line):
        for probe in _probes(match.group().lower(), _PROBE):
            if probe in needles.hex:
                yield needles.hex[probe], "hex"
                break
    joined = _ESCAPED_NEWLINE.sub("", line)
    yield from _scan_base64(joined, needles)
    if "\\x" in line:
        for match in _REPR_SPAN.finditer(line):
            span = match.group()
            if span.count("\\x") < 4:
                continue
            try:
                data = codecs.escape_decode(span.encode("latin-1"))[0]
            except (ValueError, UnicodeEncodeError):
                continue
            for i in range(0, len(data) - _RAW_PROBE + 1, _RAW_STEP):
                label = needles.raw.get(data[i:i + _RAW_PROBE])
                if label is not None:
                    yield label, "bytes repr"
                    break


def _scan_base64(text: str, needles: Needles) -> Iterator[tuple[str, str]]:
    for match in _B64_RUN.finditer(text):
        run = match.group().translate(_URLSAFE)
        for probe in _probes(run, _B64_PROBE):
            if probe in needles.base64:
                yield needles.base64[probe], "base64"
                break


def scan_text(text: str, needles: Needles, source: str = "<text>") -> list[Hit]:
    """Every line of ``text`` holding a window of a secret (PEM blocks split over lines are
    joined and reported at their first line)."""
    hits: list[Hit] = []
    if not needles:
        return hits
    lines = text.splitlines()
    block: list[str] = []
    block_start = 0
    for number, line in enumerate(lines, 1):
        for label, form in _scan_line(line, needles):
            hits.append(Hit(source, number, label, form))
        if _PEM_LINE.fullmatch(line.strip()):
            if not block:
                block_start = number
            block.append(line.strip())
            continue
        if len(block) > 1:
            for label, form in _scan_base64("".join(block), needles):
                hits.append(Hit(source, block_start, label, f"{form} over lines"))
        block = []
    if len(block) > 1:
        for label, form in _scan_base64("".join(block), needles):
            hits.append(Hit(source, block_start, label, f"{form} over lines"))
    return hits


def scan_file(path: Path, needles: Needles) -> list[Hit]:
    """:func:`scan_text` over a log file (read as UTF-8, undecodable bytes replaced)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return scan_text(text, needles, os.fspath(path))
