"""The only place a JWT is parsed and checked, and the cache of tokens that passed.

Checks run in a fixed order: structure and header, key selection, signature,
then claims and subject, so `TOKEN_EXPIRED` is only ever said of a token whose signature
verified. Header fields that name a key (`jku`, `x5u`, `jwk`, `x5c`) are never read.
"""

from __future__ import annotations

import binascii
import gc
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Final

import pybase64

from gateway.auth.algorithms import ALGORITHMS
from gateway.auth.jsonstrict import JSONRejected, loads_strict
from gateway.auth.keys import KeySet, VerificationKey
from gateway.auth.verified import VerifiedToken, token_exp, verified_token
from gateway.base import traced
from gateway.base.clock import Clock
from gateway.base.hashing import sha256
from gateway.base.memo import BoundedMemo
from gateway.refusals.reasons import Reason, Rejected

_MAX_NUMERIC_DATE: Final = 2**53


_B64URL_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# A segment whose last group has 2 (3) characters ends in 4 (2) bits that no byte uses: only
# zeros there is canonical, so one token has one spelling. Checked on the last character
# instead of encoding the whole segment again.
_CANONICAL_LAST: Final = {
    2: frozenset(_B64URL_ALPHABET[::16]),
    3: frozenset(_B64URL_ALPHABET[::4]),
}


# A `Final` name: the compiled build calls it from a C static, not through the pybase64 module.
_decode_standard_base64: Final = pybase64.b64decode
# `-` and `_` become the standard alphabet's `+` and `/`; a `+`, `/` or `=` of the segment's own
# becomes `!`, which the strict decoder refuses like any other byte outside base64url.
_URLSAFE_TO_STANDARD: Final = bytes.maketrans(b"-_+/=", b"+/!!!")
_CACHE_KEY_SECRET: Final = secrets.token_bytes(32)
# The collector stops tracking an entry at its youngest generation's first pass over it
# (gateway/auth/verified.py), a pass it starts when its count of new objects less freed ones
# reaches a threshold. While a dropped generation is freed, two entries for each one inserted,
# that count falls instead: for a quarter of the bound's insertions no pass runs, the new
# entries pile up, and the pass that finally runs walks them all (35 ms at the default bound).
# So the cache runs that pass itself every so many insertions (about 1 ms each).
_COLLECT_YOUNGEST_EVERY: Final = 8192


def _b64decode(segment: str) -> bytes:
    remainder = len(segment) % 4
    if remainder == 1 or (remainder and segment[-1] not in _CANONICAL_LAST[remainder]):
        raise Rejected(Reason.TOKEN_MALFORMED)
    try:
        data = segment.encode("ascii").translate(_URLSAFE_TO_STANDARD)
        # pybase64 decodes with SIMD: a signature's 342 characters in a quarter of binascii's
        # time. Its third argument, validate, refuses every byte outside the standard alphabet
        # and padding anywhere but the end, as binascii's strict mode does; given by position,
        # since parsing keywords costs it more than decoding a payload.
        return _decode_standard_base64(data + b"=" * (-remainder % 4), None, True)
    except (UnicodeEncodeError, binascii.Error):
        raise Rejected(Reason.TOKEN_MALFORMED) from None


def _compact_segments(token: str) -> tuple[str, str, str]:
    """Header, payload and signature of a compact JWS: three non-empty segments. That each is
    base64url, and nothing else, `_b64decode` checks. (The dots found by `find`, which scans
    with memchr, rather than `split`, which looks at each character in turn.)"""
    first = token.find(".")
    second = token.find(".", first + 1)
    if (
        first < 1
        or second <= first + 1
        or second == len(token) - 1
        or token.find(".", second + 1) != -1
    ):
        raise Rejected(Reason.TOKEN_MALFORMED)
    return token[:first], token[first + 1 : second], token[second + 1 :]


def _json_object(decoded: bytes) -> dict[str, Any]:
    try:
        value = loads_strict(decoded)
    except JSONRejected as exc:
        raise Rejected(
            Reason.TOKEN_DUPLICATE_KEY if exc.duplicate_key else Reason.TOKEN_MALFORMED
        ) from None
    if not isinstance(value, dict):
        raise Rejected(Reason.TOKEN_MALFORMED)
    return value


def _numeric_date(value: Any) -> bool:
    kind = type(value)  # not isinstance: a bool is not a date
    return (kind is int or kind is float) and 0 <= value < _MAX_NUMERIC_DATE


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: its cache key, and (cut short) its fingerprint in the access log.
    surrogatepass: a string that is not UTF-8 still hashes; the format check refuses it."""
    return sha256(token.encode("utf-8", "surrogatepass"))


class TokenCache:
    """Verified tokens, bounded, in two generations: what was used lately stays, what was not
    is dropped a generation at a time.

    New entries go into the young generation. When it holds half the bound, it becomes the old
    one and the previous old one is dropped; a hit in the old generation moves the entry back
    into the young one. So an entry used at least once per half-bound of new entries (a heavy
    user's token) is never dropped, whatever number of one-off users come and go, and the cache
    holds between half the bound and the bound. Against an exact LRU list (an OrderedDict) this
    costs no reordering on a hit in the young generation and ~100 bytes less an entry (the
    list's links), which is what lets a million tokens fit in memory; the hit rate it gives at
    each size is measured in docs/benchmarks.md.

    A dropped generation is not freed at once, which would hold the event loop for as long as
    freeing half the cache takes: each new entry frees two of its entries, so it is gone before
    the young generation fills again, and never more than the bound is held.

    Keys are 128-bit ints, the token's SHA-256 mixed with a secret of the verifier's (`cache_key`).
    Expiry times are shared (`expiry`): a backend's tokens of one second and lifetime have the
    same `exp`, so a million tokens hold a few thousand floats rather than a million.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        # Each generation holds at most half, so both together at most the bound (a bound of 1
        # holds 2: two generations need one entry each).
        self._half = max(1, max_entries // 2)
        self._young: dict[int, VerifiedToken] = {}
        self._old: dict[int, VerifiedToken] = {}
        self._dropped: dict[int, VerifiedToken] = {}
        # Any, not float: the compiled build would otherwise hand out copies of the value.
        self._expiries: BoundedMemo[float, Any] = BoundedMemo(8192)
        self._on_hit: Callable[[], None] = lambda: None
        self._on_miss: Callable[[], None] = lambda: None
        self._until_collection = _COLLECT_YOUNGEST_EVERY

    def observe(self, on_hit: Callable[[], None], on_miss: Callable[[], None]) -> None:
        """Report each lookup (the metrics hook)."""
        self._on_hit, self._on_miss = on_hit, on_miss

    def get(self, key: int) -> VerifiedToken | None:
        found = self._young.get(key)
        if found is None:
            found = self._old.pop(key, None)
            if found is None:
                self._on_miss()
                return None
            self._keep(key, found)
        self._on_hit()
        return found

    def put(self, key: int, token: VerifiedToken) -> None:
        """Cache a token that `get` has just missed (so it is in neither generation)."""
        if self.max_entries == 0:
            return
        self._keep(key, token)
        self._until_collection -= 1
        if not self._until_collection:
            self._until_collection = _COLLECT_YOUNGEST_EVERY
            gc.collect(0)

    def _keep(self, key: int, token: VerifiedToken) -> None:
        young = self._young
        if len(young) >= self._half and key not in young:
            # The previous dropped generation is empty by now: the half-bound of entries that
            # filled the young one freed two of its entries each.
            self._dropped, self._old, young = self._old, young, {}
            self._young = young
        young[key] = token
        dropped = self._dropped
        if dropped:
            dropped.popitem()
            if dropped:
                dropped.popitem()
            if not dropped:
                self._dropped = {}  # its table too, now rather than at the next rotation

    def expiry(self, exp: float) -> Any:
        """`exp`, as the one float object the cache's entries with that expiry share."""
        shared = self._expiries.get(exp)
        return self._expiries.keep(exp, exp) if shared is None else shared

    def discard(self, key: int) -> None:
        self._young.pop(key, None)
        self._old.pop(key, None)

    def __len__(self) -> int:
        return len(self._young) + len(self._old)


def cache_salt(generation: bytes) -> int:
    """A verifier's 128-bit cache salt: a keyed BLAKE2b of its generation under a key drawn at
    start-up, so equal generations (a reload that changed nothing) share it and nobody outside
    the process knows it."""
    keyed = blake2b(generation, digest_size=16, key=_CACHE_KEY_SECRET)
    return int.from_bytes(keyed.digest(), "little")


def cache_key(digest: bytes, salt: int) -> int:
    """The cache key of a token with SHA-256 `digest` for the verifier with `cache_salt` `salt`:
    the digest's first 128 bits XOR the salt.

    For one verifier, two tokens share a key only if their SHA-256 agree on 128 bits. Only
    verified tokens are cached, so a forged token would have to match a cached one of the
    user it wants to be: a second preimage, 2**128 work. A collision (2**64 work, and one side
    would have to be a token signed for the attacker) passes the other side off as that same
    token: the attacker gains nothing they did not have. For two verifiers, tokens collide
    when their digests differ by the two salts' XOR, which nobody outside the process knows.
    A keyed hash of every digest would cost 0.5 µs a request more for the same guarantees.
    """
    return int.from_bytes(digest[:16], "little") ^ salt


SubjectReader = Callable[[Mapping[str, Any]], str | Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class Policy:
    """A project's verification rules, fixed at config load."""

    algorithms: frozenset[str]
    subject: SubjectReader
    audience: str | None
    issuer: str | None
    leeway: int
    max_lifetime: int
    require_typ: bool = True


class TokenVerifier:
    """`generation` identifies the project, its keys and its policy: equal generations verify
    alike, so a reload that changes nothing about a project keeps its cached tokens."""

    def __init__(
        self, keys: KeySet, policy: Policy, generation: bytes, cache: TokenCache, clock: Clock
    ) -> None:
        self.keys = keys
        self.policy = policy
        self.generation = generation
        self._cache_salt = cache_salt(generation)
        self._cache = cache
        self._clock = clock
        # An issuer's tokens share one header segment: it is decoded, checked and matched to
        # its keys once per verifier (a new key set builds a new verifier). Refusals are not
        # kept, so an unknown kid still asks for a JWKS refresh each time.
        self._selected: BoundedMemo[str, tuple[Any, tuple[VerificationKey, ...]]]
        self._selected = BoundedMemo(256)

    def verify(self, token: str, digest: bytes | None = None) -> VerifiedToken:
        """`digest`: the token's `token_digest`, when the caller already has it."""
        key = cache_key(digest or token_digest(token), self._cache_salt)
        cached = self._cache.get(key)
        if cached is not None:
            if self._clock.now() < token_exp(cached) + self.policy.leeway:
                return cached
            self._cache.discard(key)
        opener = traced.current.get()
        if opener is None:
            verified = self._verify_uncached(token)
        else:
            span = opener("gateway.verify_token")
            try:
                verified = self._verify_uncached(token)
            finally:
                span.end()
        self._cache.put(key, verified)
        return verified

    def _verify_uncached(self, token: str) -> VerifiedToken:
        header_b64, payload_b64, signature_b64 = _compact_segments(token)
        selected = self._selected.get(header_b64)
        if selected is None:
            header = _json_object(_b64decode(header_b64))
            selected = self._selected.keep(header_b64, self._select_keys(header))
        algorithm, candidates = selected
        # Both decoded before the signature is checked: a malformed token is said to be so.
        payload = _b64decode(payload_b64)
        signature = _b64decode(signature_b64)
        signing_input = token[: len(header_b64) + 1 + len(payload_b64)].encode("ascii")
        for key in candidates:
            if algorithm.verify(key.key, signing_input, signature):
                break
        else:
            raise Rejected(Reason.SIGNATURE_INVALID)
        claims = _json_object(payload)
        exp = self._check_times(claims)
        self._check_audience_issuer(claims)
        return verified_token(self.policy.subject(claims), self._cache.expiry(exp), key.kid)

    def _select_keys(self, header: dict[str, Any]) -> tuple[Any, tuple[VerificationKey, ...]]:
        if "alg" not in header:
            raise Rejected(Reason.ALG_MISSING)
        alg = header["alg"]
        if not isinstance(alg, str) or alg not in self.policy.algorithms:
            raise Rejected(Reason.ALG_NOT_ALLOWED)
        typ = header.get("typ")
        if typ is None:
            if self.policy.require_typ:
                raise Rejected(Reason.TYP_MISSING)
        elif not isinstance(typ, str) or typ.upper() != "JWT":
            raise Rejected(Reason.TYP_INVALID)
        if "crit" in header:
            # We implement no JWS extension, so any `crit` names one we do not understand.
            raise Rejected(Reason.CRIT_UNSUPPORTED)
        if not self.keys.keys:
            raise Rejected(Reason.KEYS_UNAVAILABLE)
        if "kid" not in header:
            candidates = self.keys.by_algorithm[alg]
            if not candidates:
                raise Rejected(Reason.NO_COMPATIBLE_KEY)
            return ALGORITHMS[alg], candidates
        kid = header["kid"]
        if not isinstance(kid, str) or not kid:
            raise Rejected(Reason.KID_INVALID)
        key = self.keys.by_kid.get(kid)
        if key is None:
            raise Rejected(Reason.KID_UNKNOWN)
        if alg not in key.algorithms:
            raise Rejected(Reason.ALG_NOT_ALLOWED)
        return ALGORITHMS[alg], (key,)

    def _check_times(self, claims: dict[str, Any]) -> float:
        if "exp" not in claims:
            raise Rejected(Reason.EXP_MISSING)
        exp_value, nbf_value, iat_value = claims["exp"], claims.get("nbf"), claims.get("iat")
        if not _numeric_date(exp_value):
            raise Rejected(Reason.EXP_INVALID)
        if "nbf" in claims and not _numeric_date(nbf_value):
            raise Rejected(Reason.NBF_INVALID)
        if "iat" in claims and not _numeric_date(iat_value):
            raise Rejected(Reason.IAT_INVALID)
        # As floats from here (exact: every numeric date is below 2**53), which the compiled
        # build compares natively rather than as objects of either type.
        now, leeway, exp = self._clock.now(), float(self.policy.leeway), float(exp_value)
        if now >= exp + leeway:
            raise Rejected(Reason.EXPIRED)
        if nbf_value is not None and float(nbf_value) > now + leeway:
            raise Rejected(Reason.NOT_YET_VALID)
        if iat_value is not None and float(iat_value) > now + leeway:
            raise Rejected(Reason.ISSUED_IN_FUTURE)
        max_lifetime = self.policy.max_lifetime
        if max_lifetime and exp - now > max_lifetime + leeway:
            raise Rejected(Reason.LIFETIME_TOO_LONG)
        return exp

    def _check_audience_issuer(self, claims: dict[str, Any]) -> None:
        audience = self.policy.audience
        if audience is not None:
            aud = claims.get("aud")
            if not (aud == audience or (isinstance(aud, list) and audience in aud)):
                raise Rejected(Reason.AUDIENCE_INVALID)
        if self.policy.issuer is not None and claims.get("iss") != self.policy.issuer:
            raise Rejected(Reason.ISSUER_INVALID)
