"""What the load generator sends: ~300-byte tracking events, RS256 tokens, one file per traffic mix.

A request file holds one request per line, "token<TAB>session<TAB>body", read by requests.lua.
Tokens are signed with `cryptography` directly (PyJWT adds nothing but time here) and, for the
fresh-token pool, in parallel processes: one RSA-2048 signature costs about 0.2 ms.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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
