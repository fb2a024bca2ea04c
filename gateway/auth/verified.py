"""What a token that passed verification leaves in the verified-token cache: a plain tuple,
(user, exp, kid), read through the functions below.

A tuple rather than a class, for the garbage collector. It stops tracking a tuple that holds
only strings and numbers the first time it sees one, and never walks it again; an instance of
a class stays tracked. With entries as objects, each collection of the collector's middle
generation walked every token cached since the last one: with a new token on every request,
a pause of 50 to 190 ms every 500,000 requests. The memory is the same: 64 bytes either way.
(A user read as a mapping, an `id_map` subject, keeps its entry tracked.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

VerifiedToken: TypeAlias = tuple[Any, ...]
"""(user, exp, kid): the user as the project's subject format reads it, the token's `exp` (a
float shared by the cache's entries with that expiry: `TokenCache.expiry`), its key's id."""


def verified_token(user: str | Mapping[str, str], exp: Any, kid: str) -> VerifiedToken:
    return (user, exp, kid)


def token_user(token: VerifiedToken) -> str | Mapping[str, str]:
    user: str | Mapping[str, str] = token[0]
    return user


def token_exp(token: VerifiedToken) -> float:
    exp: float = token[1]
    return exp


def token_kid(token: VerifiedToken) -> str:
    kid: str = token[2]
    return kid
