"""The kit's non-canonical CBOR writer (:mod:`dstack_core.testing.noncanonical`), where the
tests have always imported it from."""

from __future__ import annotations

from dstack_core.testing.noncanonical import encode, variants, with_duplicate

__all__ = ["encode", "variants", "with_duplicate"]
