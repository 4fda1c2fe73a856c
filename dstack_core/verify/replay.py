"""The event log against the signed registers: replay (``event_log``), runtime event
digests (``runtime_events``) and what the replay binds.

Format-independent: it works on the :class:`~dstack_core.verify.Registers` a verifier
plugin decoded. RTMR3 may hold only dstack runtime events, replayed from digests
recomputed from their content; boot events (RTMR0-2) are bound only per register that
replays to its signed value.
"""

from __future__ import annotations

import hmac

import attrs

from ..eventlog import (
    EV_NO_ACTION,
    RTMR_COUNT,
    RUNTIME_EVENT_TYPE,
    RUNTIME_IMR,
    ZERO_REGISTER,
    TdxEvent,
    runtime_event_digest,
    runtime_event_preimage,
    sha384,
)
from .checks import Outcome, short
from .evidence import Evidence
from .options import VerifyOptions
from .result import BootEvent
from .types import Registers

__all__ = ["Binding", "Replay", "bind", "event_log_check", "replay", "runtime_events_check"]


@attrs.frozen(kw_only=True)
class Replay:
    """The registers an event log replays to under dstack's rules, and what breaks them.

    :ivar rtmrs: RTMR0-3 replayed from 48 zero bytes.
    :ivar boot: the log's RTMR0-2 events, as given.
    :ivar runtime: what RTMR3 replays: upstream's ``runtime_events``, else the log's RTMR3
        entries.
    :ivar boot_present: whether an RTMR1 or RTMR2 event extends (EV_NO_ACTION does not);
        without one, the log is lite-stripped unless the quote's RTMR1 and RTMR2 are zero
        (:func:`boot_replayable`).
    :ivar foreign: RTMR3 entries that are not dstack runtime events, described.
    :ivar computed: per ``event_log`` entry, the digest recomputed from its content for a
        runtime event (computed once per verification), else None.
    """

    rtmrs: tuple[bytes, bytes, bytes, bytes]
    boot: tuple[TdxEvent, ...]
    runtime: tuple[TdxEvent, ...]
    boot_present: bool
    foreign: tuple[str, ...]
    computed: tuple[bytes | None, ...] = ()


def _event_type(event: TdxEvent) -> str:
    named = " (EV_NO_ACTION)" if event.event_type == EV_NO_ACTION else ""
    return f"{event.event_type:#010x}{named}"


def replay(evidence: Evidence) -> Replay:
    """Replay the evidence's event log from zero under dstack's rules (one pass)."""
    log = evidence.event_log
    computed: list[bytes | None] = []
    boot: list[TdxEvent] = []
    runtime: list[TdxEvent] = []
    foreign: list[str] = []
    boot_present = False
    # Every digest here is 48 bytes (TdxEvent allows no other but a runtime event's empty
    # one, which is recomputed), so extending is the bare SHA-384 of register || digest.
    registers = [ZERO_REGISTER] * RTMR_COUNT
    rtmr3 = ZERO_REGISTER
    for index, event in enumerate(log):
        imr, event_type = event.imr, event.event_type
        if imr != RUNTIME_IMR:
            boot.append(event)
            computed.append(None)
            if event_type != EV_NO_ACTION:
                registers[imr] = sha384(registers[imr] + event.digest).digest()
                boot_present = boot_present or imr != 0
            continue
        runtime.append(event)
        if event_type == RUNTIME_EVENT_TYPE:
            # A runtime event binds its name, payload and version: replay the digest
            # recomputed from them, never the recorded one.
            digest = runtime_event_digest(event.event, event.event_payload, event.version)
            computed.append(digest)
            rtmr3 = sha384(rtmr3 + digest).digest()
            continue
        # Anything else in RTMR3 is ``foreign`` (not allowed); it is replayed as TCG
        # would, for the report.
        computed.append(None)
        foreign.append(f"event {index} ({event.event!r}) in RTMR3 has type {_event_type(event)}")
        if event_type != EV_NO_ACTION:
            rtmr3 = sha384(rtmr3 + event.digest).digest()
    if evidence.runtime_events is not None:
        # Upstream replays its separate runtime event list (to_tdx_event fills the digest
        # computed from each event's content).
        runtime = [e.to_tdx_event() for e in evidence.runtime_events]
        rtmr3 = ZERO_REGISTER
        for event in runtime:
            rtmr3 = sha384(rtmr3 + event.digest).digest()
    registers[RUNTIME_IMR] = rtmr3
    return Replay(
        rtmrs=(registers[0], registers[1], registers[2], registers[3]),
        boot=tuple(boot),
        runtime=tuple(runtime),
        boot_present=boot_present,
        foreign=tuple(foreign),
        computed=tuple(computed),
    )


def boot_replayable(registers: Registers, replayed: Replay) -> bool:
    """Whether the log can account for RTMR0-2: it has extending RTMR1/RTMR2 events, or
    the quote's RTMR1 and RTMR2 are zero (nothing was measured there to strip)."""
    quoted = registers.rtmrs
    return replayed.boot_present or not any(quoted[1] + quoted[2])


def _own_envelope(evidence: Evidence) -> bool:
    """Our envelope, bare or in a certificate: it always carries the full event log."""
    return "dstack-core" in (evidence.kind, evidence.attestation_kind)


def event_log_check(
    evidence: Evidence, registers: Registers, replayed: Replay, options: VerifyOptions
) -> Outcome:
    """``event_log``: RTMR0-3 replayed from the log equal the signed ones; RTMR3 holds
    only runtime events."""
    if not evidence.event_log_given:
        return "skipped", "no event log given: the quoted RTMR0-3 cannot be tied to any events"
    quoted = registers.rtmrs
    replayable = boot_replayable(registers, replayed)
    counts = [sum(1 for e in replayed.boot if e.imr == i) for i in range(3)]
    counts.append(len(replayed.runtime))
    mismatched = []
    parts = []
    for index in range(RTMR_COUNT):
        if index < RUNTIME_IMR and not replayable:
            parts.append(f"RTMR{index} not replayable ({counts[index]} events)")
            continue
        if hmac.compare_digest(replayed.rtmrs[index], quoted[index]):
            parts.append(f"RTMR{index} ok ({counts[index]} events)")
        else:
            mismatched.append(index)
            parts.append(
                f"RTMR{index} MISMATCH ({counts[index]} events replay to "
                f"{short(replayed.rtmrs[index])}, quote has {short(quoted[index])})"
            )
    summary = "; ".join(parts)
    if evidence.unreplayable:
        return "fail", f"{'; '.join(evidence.unreplayable)}; {summary}"
    if replayed.foreign:
        return "fail", (
            f"{'; '.join(replayed.foreign)}: only dstack runtime events (type "
            f"{RUNTIME_EVENT_TYPE:#010x}), replayed from their name and payload, may be in "
            f"RTMR3; {summary}"
        )
    if mismatched:
        return "fail", f"replay differs from the quote: {summary}"
    if not replayable:
        why = (
            "the log carries no RTMR1/RTMR2 boot events (lite-stripped, as in upstream RA-TLS "
            "certificates), so RTMR0-2 cannot be replayed"
        )
        if _own_envelope(evidence):
            return "skipped", (
                f"{summary}; {why}; a dstack-core envelope always carries the full log, so "
                "this one is incomplete"
            )
        if options.allow_stripped_event_log:
            return "pass", f"{summary}; {why} (accepted: allow_stripped_event_log)"
        return "skipped", f"{summary}; {why}; give the full attestation (Attest) to check them"
    return "pass", summary


def runtime_events_check(evidence: Evidence, replayed: Replay) -> Outcome:
    """``runtime_events``: recorded digests and preimages match the events' content, and
    upstream's ``event_log`` RTMR3 entries equal its ``runtime_events``."""
    if not evidence.event_log_given:
        return "skipped", "no event log given"
    problems: list[str] = []
    versions = {1: 0, 2: 0}
    for event in replayed.runtime:
        if event.is_runtime:
            versions[event.version] += 1
    computed = replayed.computed or tuple(
        e.computed_digest if e.is_runtime else None for e in evidence.event_log
    )
    for index, (event, digest) in enumerate(zip(evidence.event_log, computed, strict=True)):
        if digest is not None and event.digest and not hmac.compare_digest(event.digest, digest):
            problems.append(
                f"runtime event {index} ({event.event!r}): recorded digest does not match "
                f"its name, payload and version {event.version}"
            )
    checked_preimages = 0
    carried = zip(evidence.event_log, evidence.preimages, strict=False)
    for index, (event, preimage) in enumerate(carried):
        if preimage is None:
            continue
        if not event.is_runtime:
            problems.append(f"event {index} carries a preimage but is not a runtime event")
            continue
        checked_preimages += 1
        canonical = runtime_event_preimage(event.event, event.event_payload, event.version)
        if preimage != canonical:
            problems.append(f"event {index} ({event.event!r}): preimage is not the canonical one")
        elif event.digest and not hmac.compare_digest(
            sha384(preimage).digest(), event.digest
        ):
            problems.append(f"event {index} ({event.event!r}): preimage does not hash to digest")
    if evidence.runtime_events is not None:
        logged = [e for e in evidence.event_log if e.imr == RUNTIME_IMR]
        if logged:
            entries = [(e.event_type, e.event, e.event_payload, e.version) for e in logged]
            listed = [
                (RUNTIME_EVENT_TYPE, e.event, e.payload, e.version)
                for e in evidence.runtime_events
            ]
            if entries != listed:
                problems.append("the event log's RTMR3 entries disagree with runtime_events")
    if problems:
        return "fail", "; ".join(problems)
    detail = (
        f"{len(replayed.runtime)} runtime events ({versions[1]} v1, {versions[2]} v2 digests): "
        f"recorded digests match their content"
    )
    if checked_preimages:
        detail += f"; {checked_preimages} v2 preimages canonical and hashing to their digests"
    return "pass", detail


@attrs.frozen(kw_only=True)
class Binding:
    """What of the event log the replay binds to the signed registers.

    :ivar runtime: RTMR3's runtime events when RTMR3 is bound: every RTMR3 entry is a
        runtime event whose recorded digest (where it has one) matches its content, and
        the digests recomputed from their content replay to the quote's RTMR3. None
        otherwise.
    :ivar boot_events: the extending events of each of RTMR0-2 that replayed to the quote.
    """

    runtime: tuple[TdxEvent, ...] | None
    boot_events: tuple[BootEvent, ...]


def bind(
    evidence: Evidence, registers: Registers, replayed: Replay, runtime_check: str
) -> Binding:
    """What the replay binds (nothing, unless the log replays to the signed registers)."""
    if not evidence.event_log_given or evidence.unreplayable:
        return Binding(runtime=None, boot_events=())
    quoted = registers.rtmrs
    rtmr3_bound = (
        not replayed.foreign
        and runtime_check == "pass"
        and hmac.compare_digest(replayed.rtmrs[RUNTIME_IMR], quoted[RUNTIME_IMR])
    )
    # Bound events' recorded digests equal their recomputed ones (runtime_events passed) or
    # are empty (recomputed by every replay): they are used as they are.
    runtime = replayed.runtime if rtmr3_bound else None
    boot = []
    if boot_replayable(registers, replayed):
        matched = [hmac.compare_digest(replayed.rtmrs[i], quoted[i]) for i in range(RUNTIME_IMR)]
        for event in replayed.boot:
            if event.event_type == EV_NO_ACTION or not matched[event.imr]:
                continue
            measured = hmac.compare_digest(
                sha384(event.event_payload).digest(), event.digest
            )
            boot.append(
                BootEvent(
                    imr=event.imr,
                    digest=event.digest,
                    payload=event.event_payload if measured else None,
                )
            )
    return Binding(runtime=runtime, boot_events=tuple(boot))
