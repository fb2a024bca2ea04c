"""Property tests (hypothesis): every parser the gateway runs on client input, and the whole
pipeline through real HTTP, checked against independent oracles rather than examples.

Profiles: `fast` (the default, used by `make test`) runs 30-75 examples per property; `deep`
(`GATEWAY_FUZZ=deep`) runs thousands. The oracles read requests the way an upstream would
(`json.loads`, which keeps the last duplicate; a plain path walk; `posixpath`, `unquote`, URL
parsers) and check the gateway never authorised one reading and forwarded another.
"""

from __future__ import annotations

import base64
import copy
import gzip
import itertools
import json
import math
import os
import posixpath
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.auth.extract import (
    HeaderSource,
    JsonSource,
    RequestParts,
    Source,
    parse_json_path,
    walk_json,
)
from gateway.auth.jsonstrict import JSONRejected, loads_strict
from gateway.auth.subject import IdMapSubject, ScalarSubject
from gateway.auth.target import parse_target
from gateway.auth.verified import VerifiedToken, token_exp, token_kid, token_user
from gateway.auth.verify import TokenVerifier
from gateway.base.clock import ManualClock
from gateway.config.compiled import CompiledConfig, compile_config
from gateway.config.router import RouteEntry, Router, compile_template
from gateway.config.settings import ConfigError, Problem, load_settings, parse_settings
from gateway.refusals.reasons import Rejected
from tests.conftest import (
    NOW,
    GatewayFactory,
    KeyPair,
    RunningGateway,
    Tokens,
    Upstream,
    b64url,
    base_config,
    raw_request,
    sign_raw,
)

# --- profiles ----------------------------------------------------------------------------------

_COMMON: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("fast", max_examples=75, **_COMMON)
settings.register_profile("deep", max_examples=3000, **_COMMON)
PROFILE = "deep" if os.environ.get("GATEWAY_FUZZ") == "deep" else "fast"
FUZZ = settings(settings.get_profile(PROFILE))
# Real HTTP per example: a few dozen in `fast`, still hundreds in `deep`.
FUZZ_HTTP = settings(FUZZ, max_examples=30 if PROFILE == "fast" else 600)

if PROFILE == "deep":  # thousands of examples take longer than the suite's 60 s per test
    pytestmark = pytest.mark.timeout(900)

LEEWAY = 30  # the projects' default leeway_seconds

# --- JSON with duplicate keys: objects as lists of pairs ---------------------------------------


@dataclass(frozen=True)
class Key:
    name: str
    escape: int  # 0: as is, 1: ASCII-escaped, 2: every UTF-16 unit as \uXXXX


@dataclass(frozen=True)
class Obj:
    """A JSON object as written: its pairs in order, duplicates allowed."""

    pairs: tuple[tuple[Key, Node], ...]


Node: TypeAlias = "bool | int | float | str | list[Node] | Obj | None"


def dump_key(key: Key) -> str:
    if key.escape == 2:
        units = key.name.encode("utf-16-be")
        return (
            '"'
            + "".join(f"\\u{units[i]:02x}{units[i + 1]:02x}" for i in range(0, len(units), 2))
            + '"'
        )
    return json.dumps(key.name, ensure_ascii=key.escape == 1)


def dump(node: Node, spaced: bool = False) -> str:
    """The JSON text of `node`, written pair by pair (so duplicates survive)."""
    comma, colon = (", ", ": ") if spaced else (",", ":")
    if isinstance(node, Obj):
        inner = comma.join(dump_key(k) + colon + dump(v, spaced) for k, v in node.pairs)
        return "{" + inner + "}"
    if isinstance(node, list):
        return "[" + comma.join(dump(v, spaced) for v in node) + "]"
    return json.dumps(node, ensure_ascii=False)


def has_duplicate(node: Node) -> bool:
    if isinstance(node, Obj):
        names = [k.name for k, _ in node.pairs]
        return len(set(names)) != len(names) or any(has_duplicate(v) for _, v in node.pairs)
    if isinstance(node, list):
        return any(has_duplicate(v) for v in node)
    return False


def has_control_key(node: Node) -> bool:
    """A key holding U+0000-U+001F or U+007F, which the strict reading refuses."""
    if isinstance(node, Obj):
        return any(
            any(c < " " or c == "\x7f" for c in k.name) or has_control_key(v) for k, v in node.pairs
        )
    if isinstance(node, list):
        return any(has_control_key(v) for v in node)
    return False


def as_python(node: Node) -> Any:
    """What `json.loads` makes of `dump(node)`: the last of duplicate keys wins."""
    if isinstance(node, Obj):
        return {k.name: as_python(v) for k, v in node.pairs}
    if isinstance(node, list):
        return [as_python(v) for v in node]
    return node


def to_node(value: Any) -> Node:
    if isinstance(value, dict):
        return Obj(tuple((Key(k, 0), to_node(v)) for k, v in value.items()))
    if isinstance(value, list):
        return [to_node(v) for v in value]
    assert value is None or isinstance(value, bool | int | float | str)
    return value


def objects_in(node: Node) -> list[Obj]:
    """Every object in `node`, in document order."""
    found: list[Obj] = []
    if isinstance(node, Obj):
        found.append(node)
        for _, value in node.pairs:
            found.extend(objects_in(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(objects_in(value))
    return found


def with_duplicate(node: Node, which: int, second: Node) -> Node:
    """`node` with one key of its `which`-th object (document order) written a second time."""
    objects = [o for o in objects_in(node) if o.pairs]
    if not objects:
        return node
    target = objects[which % len(objects)]

    def rebuild(current: Node) -> Node:
        if current is target:
            assert isinstance(current, Obj)
            key = current.pairs[which % len(current.pairs)][0]
            return Obj((*current.pairs, (key, second)))
        if isinstance(current, Obj):
            return Obj(tuple((k, rebuild(v)) for k, v in current.pairs))
        if isinstance(current, list):
            return [rebuild(v) for v in current]
        return current

    return rebuild(node)


scalars: st.SearchStrategy[Node] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
)


def json_trees(
    key_names: st.SearchStrategy[str], leaves: st.SearchStrategy[Node], max_leaves: int = 20
) -> st.SearchStrategy[Node]:
    keys = st.builds(Key, key_names, st.integers(0, 2))

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        objects = st.lists(st.tuples(keys, children), max_size=4).map(lambda p: Obj(tuple(p)))
        return st.one_of(st.lists(children, max_size=4), objects)

    return st.recursive(leaves, extend, max_leaves=max_leaves)


SHORT_KEYS = st.sampled_from(["a", "b", "A", "é", "\U0001f600", "exp", "e\u0301"]) | st.text(
    max_size=3
)
any_trees = json_trees(SHORT_KEYS, scalars)

# JSON values as plain Python (no duplicates possible), for tokens and configs.
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)


# --- strict JSON ---------------------------------------------------------------------------------

JSONISH = st.text(alphabet='{}[]":,0123456789.eE+-truefalsnNaIiy \\u\t\n', max_size=40)


@FUZZ
@given(
    data=st.binary(max_size=200)
    | JSONISH.map(str.encode)
    | any_trees.map(lambda n: dump(n).encode())
)
def test_strict_json_returns_or_refuses_and_agrees_with_json_loads(data: bytes) -> None:
    try:
        value = loads_strict(data)
    except JSONRejected:
        event("refused")
        return
    event("accepted")
    # Accepted: the upstream's stdlib reading of the same bytes is the same document.
    assert json.loads(data) == value


@FUZZ
@given(
    tree=json_trees(st.text(max_size=5), scalars).filter(lambda n: not has_duplicate(n)),
    spaced=st.booleans(),
)
def test_strict_json_round_trips_every_document_without_duplicates(
    tree: Node, spaced: bool
) -> None:
    text = dump(tree, spaced)
    for encoded in (text.encode(), json.dumps(json.loads(text)).encode()):
        if has_control_key(tree):
            with pytest.raises(JSONRejected) as refused:
                loads_strict(encoded)
            assert refused.value.control_in_key
            continue
        value = loads_strict(encoded)
        assert value == json.loads(encoded)
        assert value == as_python(tree)


@FUZZ
@given(tree=any_trees, which=st.integers(0, 50), second=scalars, spaced=st.booleans())
@example(tree=Obj(((Key("exp", 0), 1), (Key("exp", 2), 2))), which=0, second=None, spaced=False)
def test_strict_json_refuses_a_duplicate_key_at_any_depth(
    tree: Node, which: int, second: Node, spaced: bool
) -> None:
    tree = with_duplicate(tree, which, second)
    text = dump(tree, spaced).encode()
    if has_duplicate(tree):
        event("duplicate")
        with pytest.raises(JSONRejected) as refused:
            loads_strict(text)
        # Objects are checked inner first: a control character may be found before.
        assert refused.value.duplicate_key or (
            refused.value.control_in_key and has_control_key(tree)
        )
    elif has_control_key(tree):
        with pytest.raises(JSONRejected) as refused:
            loads_strict(text)
        assert refused.value.control_in_key
    else:
        event("no duplicate")
        assert loads_strict(text) == json.loads(text) == as_python(tree)


# --- identity extraction: one reading ------------------------------------------------------------

EVENT_PATH = ("customer_ids", "registered")
BATCH_PATH: tuple[str | None, ...] = ("commands", None, "data", "customer_ids", "registered")
IDENTITY_SOURCES: tuple[Source, ...] = (
    JsonSource("customer_ids.registered", parse_json_path("customer_ids.registered")),
    JsonSource(
        "commands[*].data.customer_ids.registered",
        parse_json_path("commands[*].data.customer_ids.registered"),
    ),
    HeaderSource("x-user-id"),
)
USERS = ["alice", "bob", "ALICE", "alice ", "\u0430lice", "", "al\u0000ice", "e\u0301", "é"]
IDENTITY_KEYS = st.sampled_from(
    [
        "customer_ids",
        "registered",
        "Registered",
        "CUSTOMER_IDS",
        "commands",
        "data",
        "DATA",
        "cookie",
    ]
) | st.text(max_size=3)
identity_leaves: st.SearchStrategy[Node] = st.one_of(
    st.sampled_from(USERS[:5]), st.sampled_from(USERS[:5]), st.sampled_from(USERS), scalars
)


@st.composite
def identity_documents(draw: st.DrawFn) -> Node:
    """Bodies with identities at random depths: random trees over the identity path's key
    names, or the real shapes (one event, a batch), either coherent (one user, no variants:
    these should be read) or adversarial (case variants, other users, wrong types, extras)."""
    shape = draw(st.sampled_from(["tree", "coherent", "adversarial"]))
    if shape == "tree":
        return draw(json_trees(IDENTITY_KEYS, identity_leaves, max_leaves=25))
    principal = draw(st.sampled_from(USERS[:5]))
    if shape == "coherent":
        leaves: st.SearchStrategy[Node] = st.just(principal)
        key_names = st.sampled_from(["event_type", "props", "cookie", "ts"])
        parents, registered, data = ["customer_ids"], ["registered"], ["data"]
    else:
        leaves = st.one_of(st.just(principal), st.just(principal), identity_leaves)
        key_names = IDENTITY_KEYS
        parents, registered, data = (
            ["customer_ids", "CUSTOMER_IDS"],
            ["registered", "Registered"],
            ["data", "DATA"],
        )
    keys = st.builds(Key, key_names, st.integers(0, 2))
    extra = st.lists(st.tuples(keys, json_trees(key_names, identity_leaves, 6)), max_size=1)

    def customer_ids() -> Obj:
        pairs = [(Key(draw(st.sampled_from(registered)), 0), draw(leaves))]
        pairs += draw(extra)
        return Obj(tuple(draw(st.permutations(pairs))))

    top: list[tuple[Key, Node]] = draw(extra)
    if draw(st.booleans()):
        top.append((Key(draw(st.sampled_from(parents)), 0), customer_ids()))
    if draw(st.booleans()):
        commands: list[Node] = []
        for _ in range(draw(st.integers(0, 3))):
            content = Obj(((Key("customer_ids", 0), customer_ids()), *draw(extra)))
            commands.append(Obj(((Key(draw(st.sampled_from(data)), 0), content),)))
        top.append((Key("commands", 0), commands))
    document: Node = Obj(tuple(draw(st.permutations(top))))
    if shape == "adversarial" and draw(st.integers(0, 3)) == 0:
        document = with_duplicate(document, draw(st.integers(0, 20)), draw(identity_leaves))
    return document


def upstream_reads(
    document: Any, steps: Sequence[str | None], *, any_case: bool = False
) -> list[Any]:
    """What an upstream reads at `steps` after `json.loads`: a plain walk, a missing key, a null
    or a wrong type is nothing there. `any_case`: an upstream that matches keys under Unicode
    case folding, as Go's encoding/json does."""
    nodes = [document]
    for step in steps:
        following: list[Any] = []
        for node in nodes:
            if step is None:
                if isinstance(node, list):
                    following.extend(node)
            elif isinstance(node, dict):
                if any_case:
                    following.extend(v for k, v in node.items() if k.casefold() == step.casefold())
                elif step in node:
                    following.append(node[step])
        nodes = [n for n in following if n is not None]
    return nodes


def everything_read(text: str, header: str | None, *, any_case: bool = False) -> list[Any]:
    document = json.loads(text)
    found = upstream_reads(document, EVENT_PATH, any_case=any_case)
    found += upstream_reads(document, BATCH_PATH, any_case=any_case)
    return found + ([header] if header is not None else [])


def gateway_identity(text: str, header: str | None) -> tuple[str | None, bool]:
    """(identity, refused) as the gateway's strict parser and extractor decide."""
    try:
        document = loads_strict(text.encode())
    except JSONRejected:
        return None, True
    headers = {"x-user-id": [header]} if header is not None else {}
    try:
        identity = ScalarSubject("sub", "uid").identity(
            IDENTITY_SOURCES, RequestParts(headers, {}, document)
        )
    except Rejected:
        return None, True
    return identity, False


@FUZZ
@given(document=identity_documents(), header=st.none() | st.sampled_from(USERS))
def test_identity_is_exactly_what_the_upstream_reads(document: Node, header: str | None) -> None:
    text = dump(document)
    identity, refused = gateway_identity(text, header)
    if refused:
        event("refused")
        return
    read = everything_read(text, header)
    if identity is None:
        event("anonymous")
        assert read == [], "anonymous to the gateway, identified to the upstream"
    else:
        event("identified")
        assert read, "identified to the gateway, anonymous to the upstream"
        assert all(value == identity for value in read), (identity, read)


@FUZZ
@given(document=identity_documents(), header=st.none() | st.sampled_from(USERS))
@example(
    document=Obj(((Key("CUSTOMER_IDS", 0), Obj(((Key("registered", 0), "mallory"),))),)),
    header=None,
)
def test_identity_is_what_a_case_insensitive_upstream_reads(
    document: Node, header: str | None
) -> None:
    # walk_json refuses a key in two letter cases in one object because "a case-insensitive
    # upstream could read the other spelling"; that upstream must then never read a user the
    # gateway did not authorise, whatever the spelling.
    text = dump(document)
    identity, refused = gateway_identity(text, header)
    if refused:
        return
    read = everything_read(text, header, any_case=True)
    assert all(value == identity for value in read), (identity, read)
    assert (identity is None) == (read == []), (identity, read)


@FUZZ
@given(document=identity_documents())
def test_walk_json_raises_only_rejected(document: Node) -> None:
    value = as_python(document)
    for source in IDENTITY_SOURCES:
        if isinstance(source, JsonSource):
            try:
                found = walk_json(value, source.steps)
            except Rejected:
                continue
            # Every value found is one the plain walk finds too, in the same order.
            assert found == upstream_reads(value, source.steps)


ID_TYPES = st.sampled_from(["registered", "email", "cookie", "Registered", "COOKIE"])


@FUZZ
@given(
    ids=st.lists(
        st.tuples(st.builds(Key, ID_TYPES, st.integers(0, 2)), identity_leaves), max_size=4
    ),
    wrap=st.booleans(),
)
def test_id_map_identity_is_every_hard_id_the_upstream_reads(
    ids: list[tuple[Key, Node]], wrap: bool
) -> None:
    inner: Node = Obj(tuple(ids))
    document = Obj(((Key("customer_ids", 0), inner),)) if wrap else inner
    text = dump(document)
    subject = IdMapSubject("sub", frozenset({"cookie"}))
    sources = (JsonSource("customer_ids", parse_json_path("customer_ids")),)
    try:
        identity = subject.identity(sources, RequestParts({}, {}, loads_strict(text.encode())))
    except (JSONRejected, Rejected):
        return
    read = upstream_reads(json.loads(text), ["customer_ids"])
    # A null id is no id (SDKs send nulls for ids they do not have).
    hard = {k: v for found in read for k, v in found.items() if k != "cookie" and v is not None}
    assert (dict(identity) if identity is not None else {}) == hard


# --- path normalisation --------------------------------------------------------------------------

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
PATH_PIECES = [
    "track",
    "v2",
    "projects",
    "app",
    "customers",
    "events",
    "",
    ".",
    "..",
    "...",
    "%2F",
    "%2f",
    "%2e",
    "%2E%2E",
    "%00",
    "%25",
    ";x=1",
    ";",
    "\\",
    "~",
    "TRACK",
    "é",
    "\x00",
    " ",
    "%",
    "#",
    "a?b",
    "//",
]
targets = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(PATH_PIECES) | st.text(max_size=3), max_size=8).map(
        lambda segments: "/" + "/".join(segments)
    ),
    st.tuples(st.lists(st.sampled_from(PATH_PIECES), max_size=6), st.text(max_size=8)).map(
        lambda t: "/" + "/".join(t[0]) + "?" + t[1]
    ),
    st.lists(st.sampled_from(PATH_PIECES), max_size=6).map(lambda s: "/" + "/".join(s) + "/"),
)


@pytest.fixture(scope="module")
def compiled_base(tmp_path_factory: pytest.TempPathFactory, key_a: KeyPair) -> CompiledConfig:
    """The shared test config (tests/conftest.py), compiled for its router and verifier, with
    a route whose template ends in `/` beside one whose template does not."""
    where = tmp_path_factory.mktemp("fuzz-base")
    (where / "keys").mkdir()
    (where / "keys" / "a.pem").write_text(key_a.public_pem)
    raw = base_config("http://127.0.0.1:9")
    slash = {**raw["routes"][1], "name": "track-batch-slash"}
    raw["routes"].append({**slash, "path": slash["path"] + "/"})
    return compile_config(parse_settings(raw, where / "gateway.yaml", {}), ManualClock(NOW))


def is_normal(path: str) -> bool:
    """No empty, `.` or `..` segment, though the path may end in `/` (PostHog's `/batch/`)."""
    segments = path.removesuffix("/").split("/")[1:]
    return path == "/" or (path.startswith("/") and all(s not in ("", ".", "..") for s in segments))


@FUZZ
@given(raw=targets)
def test_accepted_targets_have_one_reading(raw: str, compiled_base: CompiledConfig) -> None:
    try:
        target = parse_target(raw)
    except Rejected:
        event("refused")
        return
    event("accepted")
    path = target.path
    assert is_normal(path)
    assert "%" not in path
    assert "\\" not in path
    assert ";" not in path
    assert all(c in UNRESERVED + "/" for c in path)
    # Every usual reader sees the same path: no decoding, no normalisation left to do (but
    # normpath's dropping a trailing `/`, which upstreams read as part of the path).
    assert posixpath.normpath(path) == (path.removesuffix("/") or "/")
    assert unquote(path) == path
    assert urlsplit(path).path == path
    assert URL(path).path == path
    assert URL("http://h" + path).path == path
    assert parse_target(path).path == path  # idempotent
    try:
        route, params = compiled_base.router.match("POST", path)
    except Rejected:
        return
    entry = next(e for e in compiled_base.router.entries if e.route is route)
    found = entry.pattern.fullmatch(path)
    assert found is not None
    assert found.groupdict() == params
    assert all(value and "/" not in value for value in params.values())
    template = next(r.path for r in compiled_base.settings.routes if r.name == route.name)
    assert path.endswith("/") == template.endswith("/")


@FUZZ
@given(
    segments=st.lists(
        st.text(alphabet=UNRESERVED, min_size=1, max_size=6).filter(lambda s: s not in (".", "..")),
        max_size=8,
    ),
    query=st.none() | st.text(alphabet=UNRESERVED + "=&%+", max_size=10),
    trailing_slash=st.booleans(),
)
def test_canonical_targets_are_accepted_unchanged(
    segments: list[str], query: str | None, trailing_slash: bool
) -> None:
    path = "/" + "/".join(segments) + ("/" if trailing_slash and segments else "")
    raw = path if query is None else f"{path}?{query}"
    target = parse_target(raw)
    assert (target.path, target.query) == (path, query)


TEMPLATES = [
    "/",
    "/{x}",
    "/{x}/",
    "/track/{rest:.*}",
    "/track/{rest:.*}/",
    "/track/{rest:[a-z/]+}",
    "/track/v2/",
    "/track/v2",
]


@FUZZ
@given(
    template=st.sampled_from(TEMPLATES),
    segments=st.lists(st.sampled_from(["track", "v2", "a", "b"]), max_size=4),
    trailing_slash=st.booleans(),
)
def test_a_route_matches_a_trailing_slash_only_when_its_template_ends_in_one(
    template: str, segments: list[str], trailing_slash: bool
) -> None:
    """Whatever a placeholder's own regex could reach: `/batch/` and `/batch` never meet."""
    path = "/" + "/".join(segments) + ("/" if trailing_slash and segments else "")
    assert parse_target(path).path == path
    router = Router([RouteEntry(compile_template(template), frozenset({"POST"}), template)])
    try:
        route, _ = router.match("POST", path)
    except Rejected:
        event("no match")
        return
    event("match")
    assert route == template
    assert path.endswith("/") == template.endswith("/")


# --- token verification ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verifier(compiled_base: CompiledConfig) -> TokenVerifier:
    found = compiled_base.project("app").verifier
    assert found is not None
    return found


B64_ALPHABET = UNRESERVED.replace(".", "").replace("~", "")
ALGS = [
    "RS256",
    "RS512",
    "RS384",
    "PS256",
    "HS256",
    "ES256",
    "EdDSA",
    "none",
    "None",
    "NONE",
    "nOnE",
    "",
]


@st.composite
def token_headers(draw: st.DrawFn) -> dict[str, Any]:
    header: dict[str, Any] = {"alg": draw(st.sampled_from(["RS256", "RS512"]))}
    if draw(st.booleans()):
        header["kid"] = "key-a"
    if draw(st.booleans()):
        header["typ"] = draw(st.sampled_from(["JWT", "jwt"]))
    for name, values in (
        ("alg", st.sampled_from(ALGS) | json_values),
        ("kid", st.sampled_from(["key-b", "KEY-A", "", "key-a\x00", "../key-a"]) | json_values),
        ("typ", st.sampled_from(["at+jwt", "JWS", ""]) | json_values),
        ("crit", st.lists(st.text(max_size=4), max_size=2) | json_values),
        ("jku", st.just("http://127.0.0.1:9/jwks.json")),
        ("jwk", json_values),
        ("x5c", st.lists(st.text(max_size=8), max_size=2)),
        ("extra", json_values),
    ):
        if draw(st.integers(0, 9)) == 0:
            header[name] = draw(values)
    return header


time_values = st.one_of(
    st.integers(int(NOW) - 100, int(NOW) + 100_000),
    st.floats(NOW - 100, NOW + 100_000),
    st.integers(),
    st.floats(),
    st.sampled_from([2**53, 2**53 - 1, 2**64, -1, 0, True, False, None, "1e3", [], {}, 1e400]),
    json_values,
)
users = st.sampled_from(["alice", "bob", "\u0430lice", "ALICE", " alice"]) | st.text(max_size=6)


@st.composite
def token_payloads(draw: st.DrawFn) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "sub": {"key": "uid", "value": draw(users)},
        "exp": draw(st.integers(int(NOW) - 40, int(NOW) + 100_000)),
    }
    for name in ("iat", "nbf"):
        if draw(st.booleans()):
            payload[name] = draw(st.integers(int(NOW) - 1000, int(NOW) + 60))
    for name, values in (
        (
            "sub",
            st.fixed_dictionaries({"key": st.sampled_from(["uid", "UID", "email"]), "value": users})
            | json_values,
        ),
        ("exp", time_values),
        ("nbf", time_values),
        ("iat", time_values),
        ("aud", json_values),
        ("extra", json_values),
    ):
        if draw(st.integers(0, 7)) == 0:
            payload[name] = draw(values)
    if draw(st.integers(0, 7)) == 0:
        payload.pop(draw(st.sampled_from(sorted(payload))))
    return payload


@dataclass(frozen=True)
class Mutation:
    kind: str
    position: int
    text: str


NO_MUTATION = Mutation("none", 0, "")
mutations = st.one_of(
    st.just(NO_MUTATION),
    st.just(NO_MUTATION),  # two in three tokens reach the signature and claims intact
    st.builds(
        Mutation,
        st.sampled_from(
            [
                "flip",
                "swap",
                "pad",
                "insert",
                "truncate",
                "replace_segment",
                "wrap",
                "extra_segment",
                "case",
            ]
        ),
        st.integers(0, 10_000),
        st.text(max_size=3) | st.text(alphabet=B64_ALPHABET + "=+/.", max_size=12),
    ),
)


def mutate(token: str, mutation: Mutation) -> str:
    position = mutation.position % (len(token) + 1)
    segments = token.split(".")
    match mutation.kind:
        case "flip":
            index = position % len(token)
            flipped = chr(ord(token[index]) ^ (1 << (mutation.position % 7)))
            return token[:index] + flipped + token[index + 1 :]
        case "swap":
            order = list(itertools.permutations(range(len(segments))))[mutation.position % 6]
            return ".".join(segments[i] for i in order if i < len(segments))
        case "pad":
            segments[position % len(segments)] += "=" * (1 + mutation.position % 2)
            return ".".join(segments)
        case "insert":
            return token[:position] + mutation.text + token[position:]
        case "truncate":
            return token[:position]
        case "replace_segment":
            segments[position % len(segments)] = mutation.text
            return ".".join(segments)
        case "wrap":
            return f" {token}\t" if mutation.position % 2 else f"Bearer {token}"
        case "extra_segment":
            return token + "." + mutation.text
        case "case":
            index = position % len(token)
            return token[:index] + token[index].swapcase() + token[index + 1 :]
    return token


def serialise(value: dict[str, Any], duplicate: int | None, style: int) -> bytes:
    """One JSON object's bytes: with compact or spaced separators, ASCII-escaped or not, and
    optionally a key of its `duplicate`-th object written twice."""
    if duplicate is None:
        separators = (",", ":") if style % 2 else (", ", ": ")
        return json.dumps(value, separators=separators, ensure_ascii=style > 1).encode()
    node = with_duplicate(to_node(value), duplicate, "dup")
    return dump(node, spaced=style % 2 == 0).encode()


def b64decode_canonical(segment: str) -> bytes:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    assert b64url(raw) == segment, "accepted a non-canonical base64url segment"
    return raw


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    names = [name for name, _ in pairs]
    assert len(set(names)) == len(names), f"accepted a duplicate key among {names}"
    return dict(pairs)


def no_constant(name: str) -> Any:
    raise AssertionError(f"accepted {name}, which is not JSON")


def strict_oracle(raw: bytes) -> Any:
    text = raw.decode("utf-8")
    assert not text.startswith("\ufeff")
    return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)


def numeric_date(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value < 2**53 and math.isfinite(value)


def assert_acceptable(token: str, verified: VerifiedToken, key: rsa.RSAPublicKey) -> None:
    """The oracle for an accepted token: a signature by the configured key over its exact
    bytes, no duplicate key, numeric dates with `exp` in the future, and the right subject."""
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = strict_oracle(b64decode_canonical(header_b64))
    payload = strict_oracle(b64decode_canonical(payload_b64))
    signature = b64decode_canonical(signature_b64)
    assert header.get("alg") in ("RS256", "RS512")
    assert header.get("kid", "key-a") == "key-a"
    assert "crit" not in header
    typ = header.get("typ", "JWT")
    assert isinstance(typ, str)
    assert typ.upper() == "JWT"
    hash_algorithm = hashes.SHA256() if header["alg"] == "RS256" else hashes.SHA512()
    try:
        key.verify(
            signature, f"{header_b64}.{payload_b64}".encode(), padding.PKCS1v15(), hash_algorithm
        )
    except InvalidSignature:
        raise AssertionError("accepted a token whose signature does not verify") from None
    exp = payload["exp"]
    assert numeric_date(exp)
    assert exp + LEEWAY > NOW
    assert token_exp(verified) == exp
    for claim in ("nbf", "iat"):
        if claim in payload:
            assert numeric_date(payload[claim])
            assert payload[claim] <= NOW + LEEWAY
    user = token_user(verified)
    assert payload["sub"] == {"key": "uid", "value": user}
    assert isinstance(user, str)
    assert user
    assert token_kid(verified) == "key-a"


def verify_or_refuse(verifier: TokenVerifier, token: str) -> VerifiedToken | None:
    """The verifier's answer: a verified token, or None for `Rejected` (nothing else)."""
    try:
        verified = verifier.verify(token)
    except Rejected as refused:
        event(f"rejected: {refused.reason.phrase}")
        return None
    event("accepted")
    return verified


@FUZZ
@given(
    token=st.text()
    | st.text(alphabet=B64_ALPHABET + ".=", max_size=60)
    | st.text(st.characters(codec="utf-8"), max_size=10)
)
def test_verifier_on_arbitrary_strings_returns_or_rejects(
    token: str, verifier: TokenVerifier, key_a: KeyPair
) -> None:
    verified = verify_or_refuse(verifier, token)
    if verified is not None:
        assert_acceptable(token, verified, key_a.private.public_key())


# Strings that are not UTF-8 text: `gateway token inspect $'\xff...'` hands the verifier one,
# since Python decodes argv bytes that are not UTF-8 to lone surrogates.
@FUZZ
@given(
    token=st.tuples(
        st.text(alphabet=B64_ALPHABET + ".", max_size=20),
        st.sampled_from(["\ud800", "\udcff", "\udfff"]),
        st.text(alphabet=B64_ALPHABET + ".", max_size=20),
    ).map("".join)
)
@example(token="\udcff.e30.e30")
def test_verifier_on_strings_with_lone_surrogates_returns_or_rejects(
    token: str, verifier: TokenVerifier
) -> None:
    assert verify_or_refuse(verifier, token) is None


# Which object of a header or payload gets a duplicate key, if any (one in four).
duplicates = st.integers(0, 15).map(lambda n: n if n < 4 else None)


@FUZZ
@given(
    header=token_headers(),
    payload=token_payloads(),
    signer=st.sampled_from(["header", "header", "header", "RS384", "key-b"]),
    header_duplicate=duplicates,
    payload_duplicate=duplicates,
    style=st.integers(0, 3),
    mutation=mutations,
)
def test_verifier_accepts_only_what_the_configured_key_signed(
    verifier: TokenVerifier,
    key_a: KeyPair,
    key_b: KeyPair,
    header: dict[str, Any],
    payload: dict[str, Any],
    signer: str,
    header_duplicate: int | None,
    payload_duplicate: int | None,
    style: int,
    mutation: Mutation,
) -> None:
    header_bytes = serialise(header, header_duplicate, style)
    payload_bytes = serialise(payload, payload_duplicate, style)
    alg = header.get("alg") if signer == "header" else "RS384" if signer == "RS384" else "RS256"
    alg = alg if alg in ("RS256", "RS384", "RS512") else "RS256"
    key = key_b if signer == "key-b" else key_a
    token = mutate(sign_raw(header_bytes, payload_bytes, key, alg), mutation)
    verified = verify_or_refuse(verifier, token)
    if verified is not None:
        assert_acceptable(token, verified, key_a.private.public_key())


@FUZZ
@given(
    # A user a request could name: no control characters, no lone surrogates (others are
    # refused as subject_invalid, which the mutation property covers).
    user=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1),
    ttl=st.integers(-LEEWAY + 1, 10**7) | st.floats(-LEEWAY + 1, 10**7),
    alg=st.sampled_from(["RS256", "RS512"]),
    kid=st.booleans(),
    earlier=st.none() | st.integers(0, 10**6),
    ascii_only=st.booleans(),
)
def test_verifier_accepts_every_well_formed_token(
    verifier: TokenVerifier,
    key_a: KeyPair,
    user: str,
    ttl: float,
    alg: str,
    kid: bool,
    earlier: int | None,
    ascii_only: bool,
) -> None:
    header: dict[str, Any] = {"alg": alg, "typ": "JWT", **({"kid": "key-a"} if kid else {})}
    payload: dict[str, Any] = {"sub": {"key": "uid", "value": user}, "exp": NOW + ttl}
    if earlier is not None:
        payload["iat"] = payload["nbf"] = int(NOW) - earlier
    header_bytes = json.dumps(header, ensure_ascii=ascii_only).encode()
    payload_bytes = json.dumps(payload, ensure_ascii=ascii_only).encode()
    token = sign_raw(header_bytes, payload_bytes, key_a, alg)
    verified = verifier.verify(token)
    assert token_user(verified) == user
    assert token_exp(verified) == NOW + ttl
    assert token_kid(verified) == "key-a"


# --- config loading -------------------------------------------------------------------------------

ConfigPath: TypeAlias = tuple[str | int, ...]


@dataclass(frozen=True)
class Edit:
    """One change to a config: `where` is a path, or an index into every path it has."""

    where: int | ConfigPath
    op: str
    value: Any


def all_paths(node: Any, prefix: ConfigPath = ()) -> list[ConfigPath]:
    found: list[ConfigPath] = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str | int):
                found.extend(all_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found.extend(all_paths(value, (*prefix, index)))
    return found


def apply_edit(config: dict[str, Any], edit: Edit) -> None:
    paths = all_paths(config)
    path = paths[edit.where % len(paths)] if isinstance(edit.where, int) else edit.where
    if not path:
        return
    parent: Any = config
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    if isinstance(parent, list):
        assert isinstance(last, int)
    current = parent[last]
    match edit.op:
        case "delete":
            del parent[last]
        case "replace":
            parent[last] = edit.value
        case "list":
            parent[last] = [current, edit.value]
        case "stringify":
            parent[last] = str(current)
        case "unknown_key":
            if isinstance(current, dict):
                current["zz_unknown"] = edit.value
            elif isinstance(current, list):
                current.append(edit.value)
            else:
                parent[last] = {"zz_unknown": edit.value}
        case "splice":
            if isinstance(current, str):
                parent[last] = (
                    current[: len(current) // 2] + str(edit.value) + current[len(current) // 2 :]
                )
            else:
                parent[last] = edit.value


CONFIG_TEXT = st.text(max_size=6) | st.sampled_from(
    ["${UNSET}", "${SECRET}", "${SECRET:-x}", "$$", "${", "a\x00b", "/", ".", "..", "-1", "nan"]
)
config_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | CONFIG_TEXT
    | st.sampled_from([10**20, -(10**20), 1e309, 0, 65537, "RS256", "none", "id_map", "required"]),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(st.text(max_size=5) | st.integers(0, 3), c, max_size=3)
    ),
    max_leaves=6,
)
edits = st.lists(
    st.builds(
        Edit,
        st.integers(0, 10_000),
        st.sampled_from(["delete", "replace", "list", "stringify", "unknown_key", "splice"]),
        config_values,
    ),
    min_size=1,
    max_size=3,
)

HMAC_SECRET = "h" * 64


def fuzz_config(pem: str) -> dict[str, Any]:
    """A config that uses most of the schema: two projects and the defaults, keys from PEM,
    file, secret and JWKS file, every source kind, API keys, CORS, both error formats."""
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "workers": 1,
        "trusted_proxies": ["10.0.0.0/8"],
        "upstream": {"url": "http://127.0.0.1:9", "timeout_seconds": 5, "max_connections": 8},
        "limits": {"max_body_bytes": 2048, "max_token_bytes": 4096, "body_timeout_seconds": 2},
        "failure_counter": {"backend": "memory", "threshold": 10, "session_ttl_seconds": 60},
        "verified_token_cache": {"max_entries": 10},
        "access_log": {"enabled": False},
        "log_level": "info",
        "defaults": {"mode": "disabled"},
        "projects": {
            "app": {
                "mode": "required",
                "algorithms": ["RS256", "RS512"],
                "subject": {"claim": "sub", "format": "key_value", "key": "uid"},
                "audience": "tracking",
                "leeway_seconds": 30,
                "max_token_lifetime_seconds": 86400,
                "api_keys": ["${API_KEY}", "sha256:" + "0" * 64],
                "keys": [{"id": "k1", "pem": pem}, {"id": "k2", "pem_file": "keys/a.pem"}],
            },
            "shop": {
                "mode": "monitor",
                "algorithms": ["HS256", "RS256"],
                "subject": {"claim": "sub", "format": "id_map", "anonymous_ids": ["cookie"]},
                "keys": [{"id": "s1", "secret": "${SECRET}"}],
                "jwks_file": "keys/jwks.json",
            },
        },
        "identity": [{"json": "customer_ids.registered"}, {"header": "X-User-Id"}],
        "token": [{"header": "Authorization", "scheme": "Bearer"}, {"query": "token"}],
        "session": [{"header": "X-Session-Id"}],
        "routes": [
            {
                "name": "events",
                "methods": ["POST"],
                "path": "/track/{project:app}/events",
                "auth": ["api_key", "sdk_jwt"],
                "token": [{"header": "X-Sdk-Auth-Token"}],
                "cors": {"origins": ["https://shop.example.com"], "max_age_seconds": 60},
            },
            {
                "name": "shop-batch",
                "methods": ["POST", "PUT"],
                "path": "/shop/{project:shop}/batch",
                "auth": ["sdk_jwt"],
                "identity": [
                    {"json": "commands[*].customer_ids"},
                    {"header": "X-Uid", "id": "registered"},
                ],
                "error_format": "bloomreach",
            },
            {
                "name": "config",
                "methods": ["GET"],
                "path": "/config/{id:[0-9]{4}}",
                "project": {"header": "X-App-Id"},
                "auth": ["none"],
            },
            {
                "name": "fixed",
                "methods": ["GET"],
                "path": "/fixed",
                "project": {"id": "app"},
                "auth": ["none"],
            },
        ],
    }


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory, key_a: KeyPair) -> Path:
    where = tmp_path_factory.mktemp("fuzz-config")
    (where / "keys").mkdir()
    (where / "keys" / "a.pem").write_text(key_a.public_pem)
    numbers = key_a.private.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "kid": "j1",
        "alg": "RS256",
        "n": b64url(numbers.n.to_bytes(256, "big")),
        "e": b64url(numbers.e.to_bytes(3, "big")),
    }
    (where / "keys" / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    return where


CONFIG_ENV = {"SECRET": HMAC_SECRET, "API_KEY": "public-key-1"}


def compile_or_problems(load: Callable[[], Any]) -> CompiledConfig | list[Problem]:
    try:
        return compile_config(load(), ManualClock(NOW))
    except ConfigError as exc:
        return exc.problems


def test_fuzz_config_is_valid(config_dir: Path, key_a: KeyPair) -> None:
    raw = fuzz_config(key_a.public_pem)
    compiled = compile_or_problems(lambda: parse_settings(raw, config_dir / "g.yaml", CONFIG_ENV))
    assert isinstance(compiled, CompiledConfig), compiled


@FUZZ
@given(changes=edits)
def test_config_compiles_or_lists_its_problems(
    changes: list[Edit], config_dir: Path, key_a: KeyPair
) -> None:
    assert_compiles_or_lists_problems(changes, config_dir, key_a)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            Edit(("projects", "app", "keys", 1, "pem_file"), "replace", "keys/a\x00.pem"),
            id="pem_file",
        ),
        pytest.param(
            Edit(("projects", "shop", "jwks_file"), "replace", "keys/\x00"), id="jwks_file"
        ),
    ],
)
def test_config_with_a_nul_byte_in_a_file_path_lists_its_problems(
    change: Edit, config_dir: Path, key_a: KeyPair
) -> None:
    # The property above, pinned where its random edits rarely reach: YAML's "\0" escape puts
    # a NUL in a file path, and reading it raises ValueError (embedded null byte), not OSError.
    assert_compiles_or_lists_problems([change], config_dir, key_a)


def assert_compiles_or_lists_problems(
    changes: list[Edit], config_dir: Path, key_a: KeyPair
) -> None:
    raw = fuzz_config(key_a.public_pem)
    for change in changes:
        try:
            apply_edit(raw, change)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or retyped the place this one names
    outcomes = [
        compile_or_problems(
            lambda: parse_settings(copy.deepcopy(raw), config_dir / "g.yaml", CONFIG_ENV)
        )
    ]
    # The same config through YAML text, as `gateway run` reads it.
    path = config_dir / "fuzzed.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    outcomes.append(compile_or_problems(lambda: load_settings(path, CONFIG_ENV)))
    counting = currently_in_test_context()  # the pinned plain test runs this outside @given
    for outcome in outcomes:
        if isinstance(outcome, CompiledConfig):
            if counting:
                event("compiles")
            continue
        if counting:
            event("ConfigError")
        assert outcome, "a ConfigError without a problem"
        for problem in outcome:
            assert isinstance(problem, Problem)
            assert isinstance(problem.message, str)
            assert problem.message.strip(), problem
            assert str(problem).strip()


# --- end to end, through real HTTP ---------------------------------------------------------------

CONTRACT_CODES = {
    "BAD_REQUEST": 400,
    "TOKEN_NOT_PROVIDED": 401,
    "TOKEN_EXPIRED": 401,
    "TOKEN_REJECTED": 401,
    "API_KEY_NOT_PROVIDED": 401,
    "API_KEY_REJECTED": 401,
    "ROUTE_NOT_FOUND": 404,
    "METHOD_NOT_ALLOWED": 405,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "AUTH_FAILURE_LIMIT": 429,
    "UPSTREAM_UNAVAILABLE": 502,
    "SHUTTING_DOWN": 503,
    "KEYS_UNAVAILABLE": 503,
    "UPSTREAM_TIMEOUT": 504,
}
ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "identity": lambda b: b,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
    "raw-deflate": lambda b: zlib.compress(b)[2:-4],
}
E2E_USERS = ["alice", "bob", "ALICE", "alice ", "\u0430lice", "e\u0301", "é"]


@dataclass(frozen=True)
class Request:
    batch: bool
    body: Node | None
    duplicate: int | None
    encoding: str
    declared_encoding: str | None
    content_type: str | None
    token: str  # none | good | expired | other_key | garbage
    token_user: str
    token_header: str
    header_user: str | None
    session: str | None


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Half coherent (one user in every place and in a valid token, one valid encoding: these
    should pass), half adversarial (anything goes: other users, case variants, duplicates,
    wrong encodings and types); hypothesis shrinks either towards the smallest failure."""
    batch = draw(st.booleans())
    coherent = draw(st.booleans())
    principal = draw(st.sampled_from(E2E_USERS))
    if coherent:
        user: st.SearchStrategy[Node] = st.just(principal)
        keys = st.builds(Key, st.sampled_from(["event_type", "props", "ts"]), st.integers(0, 2))
        names = st.just("registered")
    else:
        user = st.one_of(
            st.just(principal), st.just(principal), st.sampled_from(E2E_USERS), identity_leaves
        )
        keys = st.builds(Key, IDENTITY_KEYS, st.integers(0, 2))
        names = st.sampled_from(["registered", "registered", "Registered", "cookie"])
    noise = st.lists(st.tuples(keys, json_trees(IDENTITY_KEYS, identity_leaves, 6)), max_size=1)

    def customer_ids() -> Obj:
        return Obj(((Key(draw(names), draw(st.integers(0, 2))), draw(user)), *draw(noise)))

    top: list[tuple[Key, Node]] = draw(noise)
    if batch:
        commands: list[Node] = [
            Obj(((Key("data", 0), Obj(((Key("customer_ids", 0), customer_ids()),))),))
            for _ in range(draw(st.integers(0, 3)))
        ]
        top.append((Key("commands", 0), commands))
    elif coherent or draw(st.integers(0, 4)):
        parent = (
            "customer_ids" if coherent else draw(st.sampled_from(["customer_ids", "Customer_Ids"]))
        )
        top.append((Key(parent, 0), customer_ids()))
    body: Node | None = Obj(tuple(draw(st.permutations(top))))
    encoding = draw(st.sampled_from(["identity", "identity", "gzip", "deflate", "raw-deflate"]))
    declared = {"identity": None, "raw-deflate": "deflate"}.get(encoding, encoding)
    content_types: list[str | None] = ["application/json", "application/json; charset=utf-8"]
    tokens = ["good"]
    header_users: list[str | None] = [None, principal]
    duplicate = None
    if coherent:
        encoding = "identity" if encoding == "raw-deflate" else encoding
        declared = None if encoding == "identity" else encoding
    else:
        if draw(st.integers(0, 9)) == 0:
            body = None  # an empty body
        if draw(st.integers(0, 4)) == 0:
            declared = draw(
                st.sampled_from([None, "gzip", "GZIP", "x-gzip", "deflate", "gzip, identity", "br"])
            )
        content_types += [
            None,
            "text/plain",
            "application/json; charset=latin-1",
            "application/x-www-form-urlencoded",
        ]
        tokens += ["none", "good", "expired", "other_key", "garbage"]
        header_users += [None, *E2E_USERS]
        if draw(st.integers(0, 3)) == 0:
            duplicate = draw(st.integers(0, 20))
    return Request(
        batch=batch,
        body=body,
        duplicate=duplicate,
        encoding=encoding,
        declared_encoding=declared,
        content_type=draw(st.sampled_from(content_types)),
        token=draw(st.sampled_from(tokens)),
        token_user=principal if coherent else draw(st.sampled_from([principal, *E2E_USERS])),
        token_header=draw(st.sampled_from(["X-Sdk-Auth-Token", "Authorization"])),
        header_user=draw(st.sampled_from(header_users)),
        session=draw(st.none() | st.text(alphabet=UNRESERVED, min_size=1, max_size=10)),
    )


request_ids = (f"fuzz-{n}" for n in itertools.count())


def encode_request(request: Request, token: str | None, request_id: str) -> tuple[str, bytes]:
    path = "/track/v2/projects/app/" + ("batch" if request.batch else "customers/events")
    body = b""
    if request.body is not None:
        tree: Node = request.body
        if request.duplicate is not None:
            tree = with_duplicate(tree, request.duplicate, "mallory")
        body = ENCODINGS[request.encoding](dump(tree).encode())
    headers: list[tuple[str, str]] = [("Host", "127.0.0.1"), ("X-Request-Id", request_id)]
    if request.content_type is not None:
        headers.append(("Content-Type", request.content_type))
    if request.declared_encoding is not None:
        headers.append(("Content-Encoding", request.declared_encoding))
    if token is not None:
        value = f"Bearer {token}" if request.token_header == "Authorization" else token
        headers.append((request.token_header, value))
    if request.header_user is not None:
        headers.append(("X-User-Id", request.header_user))
    if request.session is not None:
        headers.append(("X-Session-Id", request.session))
    headers.append(("Content-Length", str(len(body))))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
    return path, head.encode() + body


@pytest.fixture
async def fuzz_gateway(make_gateway: GatewayFactory) -> RunningGateway:
    """One gateway for all of a test's examples; failures are not limited, so every example
    is decided on its own merits rather than by the session counter."""
    return await make_gateway(failure_counter={"threshold": 10**9})


def assert_contract_error(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status != 500, body
    assert headers["content-type"] == "application/json", (status, headers, body)
    answer = json.loads(body)
    assert next(iter(answer)) == "token_expired"
    code = answer["error"]["code"]
    assert CONTRACT_CODES.get(code) == status, (status, answer)
    assert answer["token_expired"] is (code == "TOKEN_EXPIRED")
    assert headers["x-request-id"] == answer["error"]["request_id"]


@FUZZ_HTTP
@given(request=requests())
async def test_end_to_end_only_the_token_user_reaches_the_upstream(
    fuzz_gateway: RunningGateway,
    upstream: Upstream,
    tokens: Tokens,
    key_b: KeyPair,
    request: Request,
) -> None:
    token = {
        "none": None,
        "good": tokens.good(request.token_user),
        "expired": tokens.expired(request.token_user),
        "other_key": tokens.mint(tokens.claims(request.token_user), key=key_b),
        "garbage": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln",
    }[request.token]
    request_id = next(request_ids)
    path, data = encode_request(request, token, request_id)
    answer = await raw_request(fuzz_gateway.port, data)
    assert answer.status != 500, answer.body
    record = await fuzz_gateway.access_record(request_id)
    assert record["status"] == answer.status
    forwarded = [
        r
        for r in upstream.received
        if ("x-request-id", request_id) in ((k.lower(), v) for k, v in r.headers)
    ]
    event(f"status {answer.status}")
    if record["upstream_status"] is None:
        # The gateway's own answer: the contract's JSON error, and nothing was forwarded.
        assert answer.status != 200
        assert_contract_error(answer.status, answer.headers, answer.body)
        assert forwarded == []
        return
    # Forwarded: the answer is the upstream's, relayed.
    assert answer.status == record["upstream_status"]
    if answer.status == 200:
        assert json.loads(answer.body) == {"success": True}
        assert len(forwarded) == 1
    else:
        # The sample upstream refuses only what its own HTTP parser cannot read (for example an
        # empty body under `Content-Encoding: br`), before recording anything.
        event(f"relayed upstream {answer.status}")
        assert forwarded == []
        return
    received = forwarded[0]
    assert received.path_qs == path
    headers = {k.lower(): v for k, v in received.headers}
    # Read the forwarded request the way the upstream does.
    document = json.loads(received.body) if received.body else None
    read = upstream_reads(document, BATCH_PATH if request.batch else EVENT_PATH)
    if "x-user-id" in headers and not request.batch:  # the batch route reads only its body
        read.append(headers["x-user-id"])
    if read:
        event("identified, forwarded")
        assert request.token == "good", (read, request)
        assert all(value == request.token_user for value in read), (read, request.token_user)
    assert headers["x-auth-status"] in ("verified", "anonymous")
    if headers["x-auth-status"] == "verified":
        assert request.token == "good"
        assert headers["x-authenticated-user"]  # its exact value: the next property
    else:
        assert read == []
        assert "x-authenticated-user" not in headers


@FUZZ_HTTP
@given(
    user=st.text(min_size=1, max_size=12)
    | st.sampled_from(
        [" alice", "alice ", "   ", "100%", "zo\u00eb", "a\tb", "a\r\nX-Auth-Status: x"]
    )
    | st.text(st.characters() | st.sampled_from(["\ud800", " "]), min_size=1, max_size=4)
)
@example(user="alice ")  # forwarded as `X-Authenticated-User: alice `, which reads as "alice"
@example(user="\ud800")  # a JSON escape a JavaScript backend emits for a lone surrogate
async def test_end_to_end_the_upstream_reads_exactly_the_token_user(
    fuzz_gateway: RunningGateway, upstream: Upstream, tokens: Tokens, user: str
) -> None:
    """Whatever a validly signed token names, `X-Authenticated-User` reads back as exactly
    that user (after percent-decoding), or the token is refused: never another user."""
    request_id = next(request_ids)
    body = b'{"customer_ids": {"cookie": "c-1"}}'
    head = (
        f"POST /track/v2/projects/app/customers/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"X-Request-Id: {request_id}\r\nContent-Type: application/json\r\n"
        f"X-Sdk-Auth-Token: {tokens.good(user)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    answer = await raw_request(fuzz_gateway.port, head.encode() + body)
    assert answer.status != 500, answer.body
    if answer.status != 200:
        event(f"refused {answer.status}")
        assert_contract_error(answer.status, answer.headers, answer.body)
        return
    forwarded = [
        r
        for r in upstream.received
        if ("x-request-id", request_id) in ((k.lower(), v) for k, v in r.headers)
    ]
    assert len(forwarded) == 1
    headers = {k.lower(): v for k, v in forwarded[0].headers}
    assert headers["x-auth-status"] == "verified"
    assert unquote(headers["x-authenticated-user"], errors="strict") == user
