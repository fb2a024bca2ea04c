"""SHA-256 for the request path, without an algorithm lookup per call.

On Python 3.11 every `hashlib.sha256()` asks OpenSSL 3 to fetch the algorithm by name, a locked
lookup in its provider store that costs more than hashing a token; copying a context made once
skips it.
"""

from __future__ import annotations

import hashlib

_SHA256 = hashlib.sha256()


def sha256(data: bytes) -> bytes:
    hasher = _SHA256.copy()
    hasher.update(data)
    return hasher.digest()
