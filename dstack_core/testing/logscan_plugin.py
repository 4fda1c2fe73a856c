"""pytest plugin: fail the run when any log of the session holds a registered secret.

Enable it with ``-p dstack_core.testing.logscan_plugin`` (or ``pytest_plugins`` in a
``conftest.py``). For the whole session it

* points :data:`~dstack_core.testing.logscan.LOG_DIR_ENV` at a fresh directory, where
  :class:`~dstack_core.testing.AgentProcess` writes each agent's output (stdout and stderr)
  and :func:`~dstack_core.testing.logscan.record_output` keeps other processes' output;
* writes every log record of the pytest process itself, from DEBUG up and with tracebacks,
  to a file in that directory (the root logger is set to DEBUG for the session, so records
  nobody displays are scanned too).

When the session ends it registers the key files left in the session's temporary
directories (the kit's ``DSTACK_TEST_TMPDIR`` and pytest's ``basetemp``), scans every file in
the log directory for every registered secret (:mod:`dstack_core.testing.logscan`), and on
any hit sets the exit status to 1 and lists file, line, which secret and in what form (never
the secret). The directory is removed after a clean scan and kept after a failed one.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

import pytest

from .agent import TEMP_BASE_ENV
from .logscan import LOG_DIR_ENV, Hit, Needles, register_key_files, registered_secrets, scan_file

_STATE: Final = pytest.StashKey["_ScanState"]()
RECORD_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ScanState:
    def __init__(self, log_dir: Path, handler: logging.Handler, root_level: int,
                 previous_dir: str | None) -> None:
        self.log_dir = log_dir
        self.handler = handler
        self.root_level = root_level
        self.previous_dir = previous_dir
        self.hits: list[Hit] = []
        self.files = 0
        self.secrets = 0


def pytest_configure(config: pytest.Config) -> None:
    previous = os.environ.get(LOG_DIR_ENV)
    log_dir = Path(tempfile.mkdtemp(prefix="dsk-logs-"))
    os.environ[LOG_DIR_ENV] = str(log_dir)
    handler = logging.FileHandler(log_dir / f"pytest-{os.getpid()}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(RECORD_FORMAT))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    state = _ScanState(log_dir, handler, root.level, previous)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    config.stash[_STATE] = state


def _sweep_roots(config: pytest.Config) -> list[Path]:
    roots = []
    if os.environ.get(TEMP_BASE_ENV):
        roots.append(Path(os.environ[TEMP_BASE_ENV]))
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None and getattr(factory, "_basetemp", None) is not None:
        roots.append(Path(factory.getbasetemp()))
    return roots


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None:
        return
    root = logging.getLogger()
    root.removeHandler(state.handler)
    root.setLevel(state.root_level)
    state.handler.close()
    register_key_files(*_sweep_roots(session.config))
    secrets = registered_secrets()
    needles = Needles.of(secrets)
    state.secrets = len(secrets)
    for path in sorted(state.log_dir.iterdir()):
        state.files += 1
        state.hits += scan_file(path, needles)
    if state.hits:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    state = terminalreporter.config.stash.get(_STATE, None)
    if state is None:
        return
    if state.hits:
        terminalreporter.section("secrets in logs", sep="=", red=True, bold=True)
        for hit in dict.fromkeys(state.hits):
            terminalreporter.line(str(hit), red=True)
        terminalreporter.line(
            f"{len(state.hits)} hit(s); the logs are kept in {state.log_dir}", red=True
        )
    else:
        terminalreporter.write_line(
            f"log scan: {state.secrets} secrets, {state.files} log files, no secret logged"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None:
        return
    if state.previous_dir is None:
        os.environ.pop(LOG_DIR_ENV, None)
    else:
        os.environ[LOG_DIR_ENV] = state.previous_dir
    if not state.hits:
        shutil.rmtree(state.log_dir, ignore_errors=True)
