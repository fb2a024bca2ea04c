"""What a token that passed verification leaves in the verified-token cache.

A plain Python class in both builds (the compiled build leaves this module out): compiled, an
entry would carry a vtable pointer, 16 bytes more per cached token, which takes a million
cached tokens past 300 MB. Not frozen: a frozen class's `__init__` sets each field through
`object.__setattr__`, three times slower than this one, and one is made per new token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class VerifiedToken:
    user: str | Mapping[str, str]  # as the project's subject format reads it
    exp: float  # shared between entries with the same expiry (`TokenCache.expiry`)
    kid: str

    def __init__(self, user: str | Mapping[str, str], exp: float, kid: str) -> None:
        self.user = user
        self.exp = exp
        self.kid = kid
