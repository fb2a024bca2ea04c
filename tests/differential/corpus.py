"""The hostile requests of tests/test_differential.py, generated systematically.

Each case is alice's valid token (or no token) with a request that names bob in a second
reading: a key another parser matches (duplicates, letter case, Unicode case folding, NUL and
control characters, escapes), a value of another type, a body read as a form by its media type,
a query parameter another decoder merges or splits, a header another server joins, a second
request smuggled in a body the upstream leaves unread. `deep_cases()` adds exhaustive
enumerations for `GATEWAY_DIFFERENTIAL=deep`.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

PROJECT_PREFIX = "/track/v2/projects/app"

# Each route as the gateway reads it and as every upstream stack reads it.
ROUTES: dict[str, dict[str, list[str] | str]] = {
    "events": {
        "suffix": "/customers/events",
        "json": ["customer_ids.registered"],
        "header": ["X-User-Id"],
        "query": [],
    },
    "batch": {"suffix": "/batch", "json": ["batch[*].userId"], "header": [], "query": []},
    "identify": {"suffix": "/identify", "json": [], "header": [], "query": ["user_id"]},
    "profile": {
        "suffix": "/profile",
        "json": ["customer_id", "user_key"],
        "header": [],
        "query": [],
    },
}
METHODS = {"identify": ["GET", "POST", "DELETE", "OPTIONS"]}

JSON_TYPE = b"application/json"
RID = b"{rid}"  # replaced by the case's request id when sent


@dataclass(frozen=True)
class Case:
    name: str
    route: str
    method: str = "POST"
    query: str = ""
    headers: tuple[bytes, ...] = ()  # whole header lines, sent as given
    body: bytes = b""
    token: bool = True  # alice's valid token in `Authorization: Bearer`
    content_type: bytes | None = JSON_TYPE  # None: no Content-Type header
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def isolated(self) -> bool:
        """A body on another method than POST: an upstream may leave it unread and read it as
        the next request on the connection, so this case gets a gateway (and a pool) alone."""
        return bool(self.body) and self.method != "POST"

    @property
    def target(self) -> str:
        suffix = ROUTES[self.route]["suffix"]
        assert isinstance(suffix, str)
        return PROJECT_PREFIX + suffix + (f"?{self.query}" if self.query else "")

    def raw(self, request_id: str, token: str) -> bytes:
        lines = [
            f"{self.method} {self.target} HTTP/1.1".encode(),
            b"Host: 127.0.0.1",
            b"X-Request-Id: " + request_id.encode(),
        ]
        if self.token:
            lines.append(b"Authorization: Bearer " + token.encode())
        if self.content_type is not None and (self.body or self.method == "POST"):
            lines.append(b"Content-Type: " + self.content_type)
        lines += [line.replace(RID, request_id.encode()) for line in self.headers]
        body = self.body.replace(RID, request_id.encode())
        if body or self.method == "POST":
            lines.append(b"Content-Length: %d" % len(body))
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def describe(self) -> str:
        shown = [f"{self.method} {self.target}"]
        shown.append("alice's token" if self.token else "no token")
        if self.content_type is not None and (self.body or self.method == "POST"):
            shown.append(f"Content-Type: {_show(self.content_type)}")
        shown += [_show(line) for line in self.headers]
        if self.body:
            shown.append(f"body {_show(self.body)}")
        return "; ".join(shown)


def _show(data: bytes) -> str:
    text = repr(data)[2:-1]
    return text if len(text) <= 240 else text[:240] + "..."


# --- JSON text, written by hand so keys can carry any escape -------------------------------------


def lit(key: str) -> str:
    """A JSON string literal: UTF-8 as is, control characters escaped."""
    return json.dumps(key, ensure_ascii=False)


def obj(*members: tuple[str, str]) -> str:
    return "{" + ",".join(f"{key}:{value}" for key, value in members) + "}"


Steps = list[tuple[str, bool]]  # (key, followed by [*])


def steps_of(path: str) -> Steps:
    return [(p[:-3], True) if p.endswith("[*]") else (p, False) for p in path.split(".")]


def nest(steps: Steps, leaf: str) -> str:
    """The document holding `leaf` at `steps` (one element per `[*]`)."""
    if not steps:
        return leaf
    (key, star), rest = steps[0], steps[1:]
    inner = nest(rest, leaf)
    return obj((lit(key), f"[{inner}]" if star else inner))


def with_variant(steps: Steps, at: int, variant: str, real: str, other: str, mode: str) -> str:
    """The document with key literal `variant` beside step `at`'s key, holding `other` below
    it; `mode` is "alone" (the variant without the real key), "before" or "after" it."""
    (key, star), rest = steps[0], steps[1:]
    if at > 0:
        inner = with_variant(rest, at - 1, variant, real, other, mode)
        return obj((lit(key), f"[{inner}]" if star else inner))

    def below(leaf: str) -> str:
        inner = nest(rest, leaf)
        return f"[{inner}]" if star else inner

    theirs, ours = (variant, below(other)), (lit(key), below(real))
    members = {"alone": [theirs], "before": [theirs, ours], "after": [ours, theirs]}[mode]
    return obj(*members)


ALICE, BOB = lit("alice"), lit("bob")


def _replace_first(key: str, old: str, new: str) -> str | None:
    return key.replace(old, new, 1) if old in key else None


def _escaped_last_letter(key: str) -> str:
    """The key's literal with its last letter written as a \\u escape."""
    index = max(i for i, c in enumerate(key) if c.isalpha())
    return '"' + key[:index] + f"\\u{ord(key[index]):04x}" + key[index + 1 :] + '"'


def key_variants(key: str) -> dict[str, str]:
    """Literals of other keys that some parser may read as `key` (label → JSON literal)."""
    spelled: dict[str, str | None] = {
        "same key twice": key,
        "upper case": key.upper(),
        "capitalised": key[:1].upper() + key[1:],
        "long s U+017F": _replace_first(key, "s", "\u017f"),
        "Kelvin sign U+212A": _replace_first(key, "k", "\u212a"),
        "dotless i U+0131": _replace_first(key, "i", "\u0131"),
        "trailing NUL": key + "\x00",
        "NUL then text": key + "\x00x",
        "trailing U+001F": key + "\x1f",
        "trailing DEL": key + "\x7f",
        "trailing space": key + " ",
        "trailing zero-width space": key + "\u200b",
    }
    variants = {label: lit(text) for label, text in spelled.items() if text is not None}
    if "s" in key:
        variants["long s as \\u017f"] = lit(key.replace("s", "\u017f", 1)).replace(
            "\u017f", "\\u017f"
        )
    variants["a letter as a \\u escape"] = _escaped_last_letter(key)
    return variants


def key_cases(variants_of: dict[str, dict[str, str]] | None = None) -> Iterator[Case]:
    """Every JSON identity step with every key variant, alone (with and without the token)
    and beside the real key on either side."""
    for route, spec in ROUTES.items():
        paths = spec["json"]
        assert isinstance(paths, list)
        for path in paths:
            steps = steps_of(path)
            for at, (key, _) in enumerate(steps):
                variants = (variants_of or {}).get(key) or key_variants(key)
                for label, variant in variants.items():
                    modes = ["before", "after"]
                    if label != "same key twice":
                        modes = ["alone", *modes]
                    for mode in modes:
                        body = with_variant(steps, at, variant, ALICE, BOB, mode).encode()
                        where = f"{route}: {path}: {key!r} {label}, {mode}"
                        if mode == "alone":
                            yield Case(f"{where}, no token", route, body=body, token=False)
                        yield Case(f"{where}, alice's token", route, body=body)


VALUES = {
    "null": "null",
    "number": "7",
    "zero": "0",
    "true": "true",
    "false": "false",
    "empty string": '""',
    "array of bob": '["bob"]',
    "empty array": "[]",
    "object naming bob": '{"id":"bob"}',
    "empty object": "{}",
    "bob": BOB,
    "alice": ALICE,
    "alice escaped": '"\\u0061lice"',
    "alice NUL bob": '"alice\\u0000bob"',
    "alice, trailing space": '"alice "',
    "ALICE": '"ALICE"',
}


def value_cases() -> Iterator[Case]:
    """Each identity place holding a value of another type or spelling."""
    for route, spec in ROUTES.items():
        paths = spec["json"]
        assert isinstance(paths, list)
        for path in paths:
            for label, value in VALUES.items():
                body = nest(steps_of(path), value).encode()
                for token in (True, False):
                    who = "alice's token" if token else "no token"
                    yield Case(f"{route}: {path} = {label}, {who}", route, body=body, token=token)
    batch = {
        "alice then bob": '{"batch":[{"userId":"alice"},{"userId":"bob"}]}',
        "alice then null": '{"batch":[{"userId":"alice"},{"userId":null}]}',
        "alice then no user": '{"batch":[{"userId":"alice"},{}]}',
        "only nulls": '{"batch":[{"userId":null},{"userId":null}]}',
        "object, not array": '{"batch":{"0":{"userId":"bob"}}}',
        "batch twice": '{"batch":[{"userId":"alice"}],"batch":[{"userId":"bob"}]}',
        "userId in an array": '{"batch":[[{"userId":"bob"}]]}',
    }
    for label, text in batch.items():
        for token in (True, False):
            who = "alice's token" if token else "no token"
            yield Case(f"batch: {label}, {who}", "batch", body=text.encode(), token=token)


def _deep(depth: int, then: str) -> bytes:
    return ('{"deep":' + "[" * depth + "]" * depth + "," + then + "}").encode()


def document_cases() -> Iterator[Case]:
    """Bodies that are not one plain JSON document."""
    alice = nest(steps_of("customer_ids.registered"), ALICE).encode()
    bob = nest(steps_of("customer_ids.registered"), BOB).encode()
    bodies: dict[str, tuple[bytes, bool]] = {
        "BOM, bob": (b"\xef\xbb\xbf" + bob, False),
        "BOM, alice": (b"\xef\xbb\xbf" + alice, True),
        "alice document then bob document": (alice + bob, True),
        "alice document, newline, bob document": (alice + b"\n" + bob, True),
        "alice document, NUL, bob document": (alice + b"\x00" + bob, True),
        "bob document then alice document": (bob + alice, True),
        "alice, trailing comma": (b'{"customer_ids":{"registered":"alice",}}', True),
        "alice, comment hiding bob": (
            b'{"customer_ids":{"registered":"alice"/*,"registered":"bob"*/}}',
            True,
        ),
        "alice, NaN beside": (b'{"customer_ids":{"registered":"alice"},"n":NaN}', True),
        "alice, 1e999 beside": (b'{"customer_ids":{"registered":"alice"},"n":1e999}', True),
        "alice, 20-digit integer beside": (
            b'{"customer_ids":{"registered":"alice"},"n":12345678901234567890}',
            True,
        ),
        "bob, invalid UTF-8 in the key": (b'{"customer_ids":{"registered\xff":"bob"}}', True),
        "bob, lone surrogate in the key": (
            b'{"customer_ids":{"registered\\ud800":"bob"}}',
            True,
        ),
        "alice, bob under a key with a raw NUL": (
            b'{"customer_ids":{"registered":"alice","registered\x00":"bob"}}',
            True,
        ),
        "bob in a top-level array": (b"[" + bob + b"]", False),
        "customer_ids an array": (b'{"customer_ids":[{"registered":"bob"}]}', False),
        "depth 64 then bob": (_deep(64, '"customer_ids":{"registered":"bob"}'), False),
        "depth 1100 then bob": (_deep(1100, '"customer_ids":{"registered":"bob"}'), False),
        "depth 20000 then bob": (_deep(20000, '"customer_ids":{"registered":"bob"}'), False),
        "depth 1100 then alice": (_deep(1100, '"customer_ids":{"registered":"alice"}'), True),
        "bob, UTF-16": ('{"customer_ids":{"registered":"bob"}}'.encode("utf-16"), False),
    }
    for label, (body, token) in bodies.items():
        yield Case(f"events: {label}", "events", body=body, token=token)


FORM_LOOKALIKES: dict[str, tuple[str, bytes, bool]] = {
    "profile, alice and a form naming bob": (
        "profile",
        b'{"customer_id":"alice","pad":"&customer_id=bob&"}',
        True,
    ),
    "profile, no user and a form naming bob": ("profile", b'{"pad":"&customer_id=bob&"}', False),
    "events, alice and a form naming bob": (
        "events",
        b'{"customer_ids":{"registered":"alice"},'
        b'"pad":"&customer_ids[registered]=bob&customer_ids.registered=bob&"}',
        True,
    ),
    "events, no user and a form naming bob": (
        "events",
        b'{"pad":"&customer_ids[registered]=bob&customer_ids.registered=bob&"}',
        False,
    ),
    "batch, alice and a form naming bob": (
        "batch",
        b'{"batch":[{"userId":"alice"}],"pad":"&batch[0][userId]=bob&"}',
        True,
    ),
}

FORM = b"application/x-www-form-urlencoded"
MEDIA_TYPES: dict[str, bytes | None] = {
    "form": FORM,
    "form; charset=utf-8": FORM + b"; charset=utf-8",
    "form upper case": FORM.upper(),
    "form capitalised": b"Application/X-Www-Form-Urlencoded",
    "NBSP byte then form": b"\xa0" + FORM,
    "NEL byte then form": b"\x85" + FORM,
    "form then NBSP byte": FORM + b"\xa0",
    "form then NEL byte": FORM + b"\x85",
    "UTF-8 NBSP then form": b"\xc2\xa0" + FORM,
    "VT then form": b"\x0b" + FORM,
    "FS then form": b"\x1c" + FORM,
    "form then tab": FORM + b"\t",
    "form ;charset=utf-8": FORM + b" ;charset=utf-8",
    'form; charset="utf-8"': FORM + b'; charset="utf-8"',
    "form; charset = utf-8": FORM + b"; charset = utf-8",
    "form, json": FORM + b", application/json",
    "json, form": b"application/json, " + FORM,
    "json; charset=utf-8": b"application/json; charset=utf-8",
    "json ; charset = utf-8": b"application/json ; charset = utf-8",
    "json; charset=UTF-8": b"application/json;charset=UTF-8",
    "json; charset=utf-16": b"application/json; charset=utf-16",
    "JSON upper case": b"APPLICATION/JSON",
    'json; x="a;b"': b'application/json; x="a;b"',
    "json then NBSP byte": b"application/json\xa0",
    "text/plain": b"text/plain",
    "text/plain; charset=utf-8": b"text/plain; charset=utf-8",
    "vnd.api+json": b"application/vnd.api+json",
    "multipart": b"multipart/form-data; boundary=x",
    "NBSP byte then multipart": b"\xa0multipart/form-data; boundary=x",
    "form with no slash": b"x-www-form-urlencoded",
    "empty": b"",
    "none": None,
}


def media_type_cases() -> Iterator[Case]:
    for label, (route, body, token) in FORM_LOOKALIKES.items():
        for type_label, media_type in MEDIA_TYPES.items():
            who = "alice's token" if token else "no token"
            yield Case(
                f"{label}: Content-Type {type_label}, {who}",
                route,
                body=body,
                token=token,
                content_type=media_type,
            )
    multipart = b'--x\r\nContent-Disposition: form-data; name="customer_id"\r\n\r\nbob\r\n--x--\r\n'
    for type_label in ("multipart", "NBSP byte then multipart", "text/plain"):
        media_type = MEDIA_TYPES[type_label]
        yield Case(
            f"profile: multipart body naming bob, Content-Type {type_label}, no token",
            "profile",
            body=multipart,
            token=False,
            content_type=media_type,
        )
    yield Case(
        "profile: two Content-Types, json then form, alice's token",
        "profile",
        body=FORM_LOOKALIKES["profile, alice and a form naming bob"][1],
        headers=(b"Content-Type: " + FORM,),
    )
    yield Case(
        "profile: Content_Type form beside Content-Type json, alice's token",
        "profile",
        body=FORM_LOOKALIKES["profile, alice and a form naming bob"][1],
        headers=(b"Content_Type: " + FORM,),
    )


QUERIES = {
    "user_id=alice": "user_id=alice",
    "user_id=bob": "user_id=bob",
    "user_id=alice&USER_ID=bob": "user_id=alice&USER_ID=bob",
    "user_id=alice&User_Id=bob": "user_id=alice&User_Id=bob",
    "USER_ID=bob": "USER_ID=bob",
    "user_id=alice&user_id=bob": "user_id=alice&user_id=bob",
    "user_id=bob&user_id=alice": "user_id=bob&user_id=alice",
    "user_id[]=bob": "user_id[]=bob",
    "user_id=alice&user_id[]=bob": "user_id=alice&user_id[]=bob",
    "user_id[0]=bob": "user_id[0]=bob",
    "user_id[x]=bob": "user_id[x]=bob",
    "user_id%5B%5D=bob": "user_id%5B%5D=bob",
    "user%5Fid=bob": "user%5Fid=bob",
    "user%5fid=bob": "user%5fid=bob",
    "user_id=alice;user_id=bob": "user_id=alice;user_id=bob",
    "user_id=bob;user_id=alice": "user_id=bob;user_id=alice",
    "user_id=alice%3Buser_id%3Dbob": "user_id=alice%3Buser_id%3Dbob",
    "user_id=b%6Fb": "user_id=b%6Fb",
    "user_id=%62ob": "user_id=%62ob",
    "user_id=bob+": "user_id=bob+",
    "user_id=alice+": "user_id=alice+",
    "user+id=bob": "user+id=bob",
    "user_id=alice&user_id": "user_id=alice&user_id",
    "user_id": "user_id",
    "user_id=": "user_id=",
    "user_id=alice&&user_id=bob": "user_id=alice&&user_id=bob",
    "&user_id=bob": "&user_id=bob",
    "?user_id=bob": "?user_id=bob",
    "user_id=al%00ice": "user_id=al%00ice",
    "user_id%00=bob": "user_id%00=bob",
    "user_id=alice&user_id%00=bob": "user_id=alice&user_id%00=bob",
    "user_id%20=bob": "user_id%20=bob",
    "user_id=alice&user_id.x=bob": "user_id=alice&user_id.x=bob",
    "user_%C4%B1d=bob (dotless i)": "user_%C4%B1d=bob",
    "user_id=alice%ZZ": "user_id=alice%ZZ",
    "user_id=%C3%28": "user_id=%C3%28",
}


def query_cases() -> Iterator[Case]:
    for label, query in QUERIES.items():
        for token in (True, False):
            who = "alice's token" if token else "no token"
            yield Case(f"identify: GET ?{label}, {who}", "identify", "GET", query, token=token)
    for method in ("POST", "DELETE", "OPTIONS"):
        for label in ("user_id=alice&USER_ID=bob", "user_id[]=bob", "user_id%00=bob"):
            yield Case(f"identify: {method} ?{label}, alice's token", "identify", method, label)


SMUGGLED = (
    b"POST " + PROJECT_PREFIX.encode() + b"/identify?user_id=bob HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\n"
    b"X-Request-Id: " + RID + b"-smuggled\r\n"
    b"X-Auth-Status: verified\r\n"
    b"X-Authenticated-User: bob\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def smuggling_cases() -> Iterator[Case]:
    """A body on a method whose body an upstream may leave unread: the next request on the
    connection, authorised by no one."""
    for method in ("GET", "DELETE", "OPTIONS"):
        for token in (True, False):
            who = "alice's token" if token else "no token"
            query = "user_id=alice" if token else ""
            yield Case(
                f"identify: {method} with a second request in its body, {who}",
                "identify",
                method,
                query,
                body=SMUGGLED,
                token=token,
                content_type=None,
            )
        yield Case(
            f"identify: {method} with a JSON body naming bob, alice's token",
            "identify",
            method,
            "user_id=alice",
            body=b'{"customer_id":"bob","user_id":"bob"}',
        )


HEADERS = {
    "X-User-Id: alice": ([b"X-User-Id: alice"], True),
    "X-User-Id: bob": ([b"X-User-Id: bob"], True),
    "X-User-Id: bob, no token": ([b"X-User-Id: bob"], False),
    "X-User-Id twice, alice then bob": ([b"X-User-Id: alice", b"X-User-Id: bob"], True),
    "X-User-Id twice, bob then alice": ([b"X-User-Id: bob", b"X-User-Id: alice"], True),
    "X-User-Id alice, X_User_Id bob": ([b"X-User-Id: alice", b"X_User_Id: bob"], True),
    "X_User_Id: bob": ([b"X_User_Id: bob"], True),
    "X_User_Id: bob, no token": ([b"X_User_Id: bob"], False),
    "X-User-Id: alice, bob": ([b"X-User-Id: alice, bob"], True),
    "X-USER-ID: bob, no token": ([b"X-USER-ID: bob"], False),
    "X-User-Id empty": ([b"X-User-Id: "], True),
    "X-User-Id: alice and NBSP byte": ([b"X-User-Id: alice\xa0"], True),
    "X-User-Id: alice with obs-fold bob": ([b"X-User-Id: alice\r\n bob"], True),
    "X-User-Id with a space before the colon": ([b"X-User-Id : bob"], True),
    "X-Auth-Status and X-Authenticated-User forged, no token": (
        [b"X-Auth-Status: verified", b"X-Authenticated-User: bob"],
        False,
    ),
    "X_Auth_Status and X_Authenticated_User forged, no token": (
        [b"X_Auth_Status: verified", b"X_Authenticated_User: bob"],
        False,
    ),
    "X-Authenticated-User forged, alice's token": ([b"X-Authenticated-User: bob"], True),
    "X-Auth-Status forged twice, no token": (
        [b"X-Auth-Status: verified", b"x-auth-status: verified"],
        False,
    ),
}


def header_cases() -> Iterator[Case]:
    anonymous = b'{"customer_ids":{"cookie":"c-1"}}'
    for label, (lines, token) in HEADERS.items():
        yield Case(f"events: {label}", "events", headers=tuple(lines), body=anonymous, token=token)


def control_cases() -> Iterator[Case]:
    """Requests every reading agrees on: the test's own check that stacks read at all."""
    yield Case(
        "control: events, alice names alice",
        "events",
        body=nest(steps_of("customer_ids.registered"), ALICE).encode(),
        extra={"expect": "verified"},
    )
    yield Case(
        "control: events, no token, no user",
        "events",
        body=b'{"customer_ids":{"cookie":"c-1"}}',
        token=False,
        extra={"expect": "anonymous"},
    )
    yield Case(
        "control: batch, alice names alice",
        "batch",
        body=b'{"batch":[{"userId":"alice"},{"userId":"alice"}]}',
        extra={"expect": "verified"},
    )
    yield Case(
        "control: identify, alice names alice",
        "identify",
        "GET",
        "user_id=alice",
        extra={"expect": "verified"},
    )
    yield Case(
        "control: profile, alice names alice twice",
        "profile",
        body=b'{"customer_id":"alice","user_key":"alice"}',
        extra={"expect": "verified"},
    )


def default_cases() -> list[Case]:
    return [
        *control_cases(),
        *key_cases(),
        *value_cases(),
        *document_cases(),
        *media_type_cases(),
        *query_cases(),
        *smuggling_cases(),
        *header_cases(),
    ]


# --- the deep run --------------------------------------------------------------------------------

CONTROL_AND_SPACE = [chr(c) for c in [*range(0x20), *range(0x7F, 0xA1)]] + [
    c for c in map(chr, range(0xA1, 0x3000)) if c.isspace() or unicodedata.category(c) == "Cf"
]


@functools.cache
def _folds_to_ascii(letter: str) -> list[str]:
    """Non-ASCII characters whose case mapping or folding gives `letter` in some case."""
    return [
        c
        for c in map(chr, range(0x80, 0x10000))
        if letter.lower() in {c.lower(), c.upper().lower(), c.casefold()}
        and unicodedata.category(c) != "Cs"
    ]


def deep_key_variants(key: str) -> dict[str, str]:
    """More keys some parser may read as `key`: every letter in upper case and as every
    character whose case mapping or folding gives it, every control, space or format
    character before, inside or after it (those the default run has are left out)."""
    variants: dict[str, str] = {}
    for index, letter in enumerate(key):
        if letter.isalpha():
            variants[f"{letter!r} at {index} upper"] = lit(
                key[:index] + letter.upper() + key[index + 1 :]
            )
            for other in _folds_to_ascii(letter):
                variants[f"{letter!r} at {index} as U+{ord(other):04X}"] = lit(
                    key[:index] + other + key[index + 1 :]
                )
    for char in CONTROL_AND_SPACE:
        name = f"U+{ord(char):04X}"
        variants[f"{name} after"] = lit(key + char)
        variants[f"{name} before"] = lit(char + key)
        variants[f"{name} inside"] = lit(key[:2] + char + key[2:])
    default = set(key_variants(key).values())
    return {label: text for label, text in variants.items() if text not in default}


def deep_cases() -> list[Case]:
    keys = {key for spec in ROUTES.values() for path in spec["json"] for key, _ in steps_of(path)}
    cases = list(key_cases({key: deep_key_variants(key) for key in keys}))
    lookalike = FORM_LOOKALIKES["profile, no user and a form naming bob"][1]
    for byte in range(256):
        for where, media_type in (
            ("before", bytes([byte]) + FORM),
            ("after", FORM + bytes([byte])),
        ):
            cases.append(
                Case(
                    f"profile: Content-Type form with byte 0x{byte:02x} {where}, no token",
                    "profile",
                    body=lookalike,
                    token=False,
                    content_type=media_type,
                )
            )
    for byte in range(256):
        encoded = f"%{byte:02X}"
        queries = (f"user_id{encoded}=bob", f"{encoded}user_id=bob", f"user{encoded}id=bob")
        cases += [
            Case(f"identify: GET ?{query}, no token", "identify", "GET", query, token=False)
            for query in queries
        ]
    return cases
