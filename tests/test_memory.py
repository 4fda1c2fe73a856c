"""The agent's heap: large answers are given back to the system once sent.

Resident memory itself is measured by ``bench/perf.py`` (a benchmark, not a test); this
checks the mechanism in a fresh interpreter, against glibc's own accounting.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
from dstack_core.server.run import bound_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
try:
    libc.mallinfo2.restype = MallInfo2
except AttributeError:
    print("no-mallinfo2")
    sys.exit()
if sys.argv[1] == "bound":
    assert bound_heap()
first = bytearray(8 << 20)  # mapped; freeing it raises glibc's threshold to its size
del first
before = libc.mallinfo2().hblkhd
answer = bytearray(2 << 20)  # an answer of a few megabytes
print("mapped" if libc.mallinfo2().hblkhd - before >= len(answer) else "heap")
"""


def probe(mode: str) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                          text=True, check=True)
    result = done.stdout.strip()
    if result == "no-mallinfo2":
        pytest.skip("the C library is not glibc >= 2.33")
    return result


def test_large_buffers_stay_mapped_after_a_larger_one_was_freed() -> None:
    """With the heap bound, a 2 MiB buffer is mapped on its own (and unmapped when freed)
    even after an 8 MiB one was freed; without it, glibc serves it from the heap."""
    assert probe("default") == "heap"  # the growth bound_heap turns off
    assert probe("bound") == "mapped"
