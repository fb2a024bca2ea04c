"""Digests for the request path, without an algorithm lookup per call.

On Python 3.11 every `hashlib.sha256()` asks OpenSSL 3 to fetch the algorithm by name, a locked
lookup in its provider store that costs more than hashing a token; copying a context made once
skips it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

_SHA256: Final = hashlib.sha256()


def sha256(data: bytes) -> bytes:
    hasher = _SHA256.copy()
    hasher.update(data)
    return hasher.digest()


def prepared_digest(name: str) -> Callable[[bytes], bytes]:
    """The digest function of hashlib algorithm `name`, from a context made now."""
    prepared = hashlib.new(name)

    def digest(data: bytes) -> bytes:
        hasher = prepared.copy()
        hasher.update(data)
        return hasher.digest()

    return digest
