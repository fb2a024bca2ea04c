"""What the load generator sends: ~300-byte tracking events, RS256 tokens, one file per traffic mix.

A request file holds one request per line, "token<TAB>session<TAB>body", read by requests.lua.
Tokens are signed with `cryptography` directly (PyJWT adds nothing but time here) and, for the
fresh-token pool, in parallel processes: one RSA-2048 signature costs about 0.2 ms.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import random
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

PROJECT = "bench"
KID = "bench-1"
ROUTE_TEMPLATE = "/track/v2/projects/{project}/customers/events"
PATH = ROUTE_TEMPLATE.format(project=PROJECT)
USER_KEY = "uid"
BODY_BYTES = 300
TOKEN_TTL_SECONDS = 6 * 3600  # outlives any run; the gateway must never see an expired one
MINT_CHUNK = 2000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def sign_token(key: rsa.RSAPrivateKey, user: str, now: int) -> str:
    """An RS256 JWT in the contract's shape: sub = {"key": "uid", "value": user}."""
    header = _compact({"alg": "RS256", "typ": "JWT", "kid": KID})
    claims = _compact(
        {"sub": {"key": USER_KEY, "value": user}, "iat": now, "exp": now + TOKEN_TTL_SECONDS}
    )
    signing_input = f"{b64url(header)}.{b64url(claims)}".encode()
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode()}.{b64url(signature)}"


def event_body(index: int, user: str | None) -> str:
    """A tracking event padded to BODY_BYTES; `user` None is an anonymous (cookie-only) event."""
    ids = {"cookie": f"c-{index:08d}"} if user is None else {"registered": user}
    properties: dict[str, object] = {
        "location": "https://shop.example.com/products/running-shoes",
        "title": "Running shoes",
        "device": "mobile",
        "os": "Android 14",
        "currency": "EUR",
        "value": 129.9,
        "pad": "",
    }
    event = {
        "customer_ids": ids,
        "event_type": "page_visit",
        "timestamp": 1_767_225_600.25 + index,
        "properties": properties,
    }
    properties["pad"] = "x" * max(0, BODY_BYTES - len(_compact(event)))
    return _compact(event).decode()


def request_line(token: str, session: str, body: str) -> str:
    return f"{token}\t{session}\t{body}\n"


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise TypeError(f"{path}: not an RSA private key")
    return key


def user_name(index: int) -> str:
    return f"user-{index:06d}"


# --- the fixed mixes ---------------------------------------------------------------------------


def write_lines(path: Path, lines: Iterable[str]) -> int:
    count = 0
    with path.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line)
            count += 1
    return count


def reused_token_lines(key: rsa.RSAPrivateKey, users: int, now: int) -> Iterator[str]:
    """`users` distinct users, one token each, each request naming its token's user."""
    for i in range(users):
        user = user_name(i)
        yield request_line(sign_token(key, user, now), f"s-{i:06d}", event_body(i, user))


def anonymous_lines(count: int) -> Iterator[str]:
    """No token, no registered id: the gateway forwards without verifying anything."""
    for i in range(count):
        yield request_line("", f"s-{i:06d}", event_body(i, None))


def refused_tokens(key: rsa.RSAPrivateKey, user: str, now: int) -> tuple[tuple[str, str], ...]:
    """Tokens a proxy enforcing SDK auth must refuse on a request for `user`: (why, token)."""
    good = sign_token(key, user, now)
    head, _, signature = good.rpartition(".")
    flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
    return (
        ("another user", sign_token(key, "mallory", now)),
        ("a bad signature", f"{head}.{flipped}"),
        ("an exp in the past", sign_token(key, user, now - TOKEN_TTL_SECONDS - 3600)),
    )


# --- the fresh-token pool ----------------------------------------------------------------------

_worker_key: rsa.RSAPrivateKey | None = None


def _init_worker(pem: bytes) -> None:
    global _worker_key  # noqa: PLW0603 — one key per worker process, loaded once
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    _worker_key = key


def _fresh_chunk(start: int, stop: int, now: int) -> str:
    assert _worker_key is not None
    lines = []
    for i in range(start, stop):
        user = f"fresh-{i:08d}"
        token = sign_token(_worker_key, user, now)
        lines.append(request_line(token, f"f-{i:08d}", event_body(i, user)))
    return "".join(lines)


@dataclass
class FreshPool:
    """Distinct tokens (each for its own user) appended to one file as runs need them.

    Runs take consecutive slices (`take`), so no token is ever sent twice to a gateway that
    keeps running between rounds, and nothing is answered from its verified-token cache.
    """

    path: Path
    private_key_pem: bytes
    now: int
    size: int = 0
    used: int = 0

    def __post_init__(self) -> None:
        self.path.write_text("")

    def ensure(self, count: int) -> float:
        """Grow the pool until `count` unused tokens remain; returns the seconds it took."""
        missing = self.used + count - self.size
        if missing <= 0:
            return 0.0
        started = time.monotonic()
        workers = max(1, len(os.sched_getaffinity(0)))
        bounds = [
            (start, min(start + MINT_CHUNK, self.size + missing))
            for start in range(self.size, self.size + missing, MINT_CHUNK)
        ]
        with (
            ProcessPoolExecutor(
                workers, initializer=_init_worker, initargs=(self.private_key_pem,)
            ) as pool,
            self.path.open("a", encoding="utf-8") as out,
        ):
            for text in pool.map(
                _fresh_chunk,
                [b[0] for b in bounds],
                [b[1] for b in bounds],
                [self.now] * len(bounds),
            ):
                out.write(text)
        self.size += missing
        return time.monotonic() - started

    def take(self, used: int) -> None:
        """Mark the first `used` unused tokens as spent."""
        self.used = min(self.size, self.used + used)


# --- a million users ---------------------------------------------------------------------------

MILLION = 1_000_000
ZIPF_EXPONENT = 1.0
ZIPF_SEED = 20261205


def zipf_user(rank: int) -> str:
    return f"zipf-{rank:07d}"


def _sign_users(users: list[str], now: int) -> list[str]:
    assert _worker_key is not None
    return [sign_token(_worker_key, user, now) for user in users]


@dataclass
class ZipfSequence:
    """Requests of `users` distinct users whose request rates follow Zipf's law: the user of
    rank r sends in proportion to 1 / r**exponent (with 1.0 and a million users, the first
    user sends 7% of the requests, the first 1,000 users 52%, the first 100,000 84%).

    Each user has one token, minted when the user is first drawn and sent with each of the
    user's requests, as an SDK reuses its token. The sequence is drawn from a fixed seed and
    appended to one file as runs need it; each target reads it from its own `ZipfCursor`.
    """

    path: Path
    private_key_pem: bytes
    now: int
    users: int = MILLION
    exponent: float = ZIPF_EXPONENT
    size: int = 0
    tokens: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path.write_text("")
        self._random = random.Random(ZIPF_SEED)  # noqa: S311 — a reproducible draw, not a secret
        self._cumulative = list(
            itertools.accumulate(1 / rank**self.exponent for rank in range(1, self.users + 1))
        )

    def ensure(self, count: int) -> float:
        """Extend the sequence to `count` requests; returns the seconds it took."""
        missing = count - self.size
        if missing <= 0:
            return 0.0
        started = time.monotonic()
        ranks = self._random.choices(
            range(1, self.users + 1), cum_weights=self._cumulative, k=missing
        )
        self._mint(sorted(set(ranks) - self.tokens.keys()))
        with self.path.open("a", encoding="utf-8") as out:
            for index, rank in enumerate(ranks, start=self.size):
                user = zipf_user(rank)
                out.write(request_line(self.tokens[rank], f"z-{rank:07d}", event_body(index, user)))
        self.size = count
        return time.monotonic() - started

    def _mint(self, ranks: list[int]) -> None:
        workers = max(1, len(os.sched_getaffinity(0)))
        chunks = [ranks[i : i + MINT_CHUNK] for i in range(0, len(ranks), MINT_CHUNK)]
        with ProcessPoolExecutor(
            workers, initializer=_init_worker, initargs=(self.private_key_pem,)
        ) as pool:
            users = [[zipf_user(rank) for rank in chunk] for chunk in chunks]
            signed = pool.map(_sign_users, users, [self.now] * len(users))
            for chunk, tokens in zip(chunks, signed, strict=True):
                self.tokens.update(zip(chunk, tokens, strict=True))


@dataclass
class ZipfCursor:
    """One target's position in a shared `ZipfSequence`: runs take consecutive slices, so the
    target's cache sees one continuing stream across rounds, as a gateway in production does."""

    sequence: ZipfSequence
    used: int = 0

    @property
    def path(self) -> Path:
        return self.sequence.path

    @property
    def size(self) -> int:
        return self.sequence.size

    def ensure(self, count: int) -> float:
        return self.sequence.ensure(self.used + count)

    def take(self, used: int) -> None:
        self.used = min(self.sequence.size, self.used + used)
