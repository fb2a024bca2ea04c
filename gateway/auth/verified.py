"""What a token that passed verification leaves in the verified-token cache.

A plain Python class in both builds (the compiled build leaves this module out): compiled, an
entry would carry a vtable pointer, 16 bytes more per cached token, which takes a million
cached tokens past 300 MB.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    user: str | Mapping[str, str]  # as the project's subject format reads it
    exp: float  # shared between entries with the same expiry (`TokenCache.expiry`)
    kid: str
