"""Identity, token and session from a request's headers, query and JSON body.

Every configured place is read, and a place that could be read two ways is refused: a header
sent twice (or once as `X-User-Id` and once as `X_User_Id`, which CGI-style servers merge), a
query parameter sent twice, a JSON key in two letter cases, two different values anywhere.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_plus

from gateway.auth.verify import token_digest
from gateway.base.memo import BoundedMemo
from gateway.refusals.reasons import Reason, Rejected


@dataclass(frozen=True, slots=True)
class HeaderSource:
    name: str  # lower case, `_` read as `-`
    scheme: str | None = None  # lower case
    id: str | None = None  # under an `id_map` subject: the id type this source carries

    def __str__(self) -> str:
        return f"header {self.name}" + (f" ({self.scheme})" if self.scheme else "")


@dataclass(frozen=True, slots=True)
class QuerySource:
    name: str
    id: str | None = None

    def __str__(self) -> str:
        return f"query {self.name}"


STAR: Final = None  # a `[*]` step in a JSON path


@dataclass(frozen=True, slots=True)
class JsonSource:
    path: str
    steps: tuple[str | None, ...]  # key names, or STAR for every element of an array
    id: str | None = None

    def __str__(self) -> str:
        return f"json {self.path}"


Source = HeaderSource | QuerySource | JsonSource

_JSON_PATH_TOKEN: Final = re.compile(r"\[\*\]|[^.\[\]]+|\.")


def parse_json_path(path: str) -> tuple[str | None, ...]:
    """`commands[*].data.customer_ids` → ("commands", STAR, "data", "customer_ids")."""
    steps: list[str | None] = []
    expect_name = True
    position = 0
    for match in _JSON_PATH_TOKEN.finditer(path):
        if match.start() != position:
            break
        piece = match.group()
        position = match.end()
        if piece == ".":
            if expect_name:
                raise ValueError("empty key")
            expect_name = True
        elif piece == "[*]":
            if not steps or expect_name:
                raise ValueError("[*] must follow a key")
            steps.append(STAR)
        else:
            if not expect_name:
                raise ValueError("keys must be separated by .")
            steps.append(piece)
            expect_name = False
    if position != len(path) or expect_name:
        raise ValueError("expected keys separated by . with optional [*]")
    return tuple(steps)


def collect_headers(
    keys: list[str], raw_headers: list[tuple[bytes, bytes]], watched: frozenset[str]
) -> dict[str, list[str]]:
    """The values of the watched headers, by `header_key`, in the order they came."""
    found: dict[str, list[str]] = {}
    try:
        for index, key in enumerate(keys):  # not zip(..., strict=True): see forward_headers
            if key in watched:
                value = raw_headers[index][1]
                values = found.get(key)
                if values is None:
                    found[key] = [value.decode("utf-8")]
                else:
                    values.append(value.decode("utf-8"))
    except UnicodeDecodeError:
        raise Rejected(Reason.HEADER_INVALID) from None
    return found


def query_name_key(name: str) -> str:
    """A query parameter's name as the most lenient upstream reads it: without case (ASP.NET
    and some Go routers match names in any case, by Unicode folding) and with PHP's reading of
    spaces and dots as `_`. Names that one upstream merges are one parameter here."""
    return name.casefold().replace(" ", "_").replace(".", "_")


_CONTROL: Final = re.compile("[\x00-\x1f\x7f]")
# A bracket makes a name structured for PHP and for Node's `qs` (Express): `user_id[]=bob` is
# the array ["bob"] under `user_id` there, so it is a second value of `user_id`, never another
# parameter.
STRUCTURED: Final = "[structured]"


def parse_query(raw_query: str | None) -> dict[str, list[str]]:
    """Query parameters as the upstream's form decoder reads them (`+` is a space), keyed by
    `query_name_key`; a structured name (`a[]`, `a[b]`) adds STRUCTURED under its base name."""
    if not raw_query:
        return {}
    if ";" in raw_query:
        # Some frameworks also split on `;`: refuse rather than guess which reading applies.
        raise Rejected(Reason.QUERY_INVALID)
    params: dict[str, list[str]] = {}
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        try:
            name = unquote_plus(name, errors="strict")
            value = unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            raise Rejected(Reason.QUERY_INVALID) from None
        if _CONTROL.search(name):
            raise Rejected(Reason.QUERY_INVALID)  # C readers end a name at its NUL
        base, bracket, _ = name.partition("[")
        params.setdefault(query_name_key(base), []).append(STRUCTURED if bracket else value)
    return params


_ABSENT: Final[Any] = object()


_casefolded_keys: Final[BoundedMemo[str, str]] = BoundedMemo(4096)


def _casefolded(key: str) -> str:
    """`key.casefold()`, each distinct key folded once: an SDK's events repeat the same keys."""
    folded = _casefolded_keys.get(key)
    if folded is None:
        folded = _casefolded_keys.keep(key, key.casefold())
    return folded


def walk_json(document: Any, steps: Sequence[str | None]) -> list[Any]:
    """Every value at the end of `steps`; a missing key or a JSON null drops that branch (SDKs
    send `"userId": null` for anonymous events), any other wrong type is 400."""
    current = [document]
    for step in steps:
        following: list[Any] = []
        if step is STAR:
            for node in current:
                if node is None:
                    continue
                if not isinstance(node, list):
                    raise Rejected(Reason.IDENTITY_NOT_ARRAY)
                following.extend(node)
        else:
            folded = _casefolded(step)
            for node in current:
                if node is None:
                    continue
                if not isinstance(node, dict):
                    raise Rejected(Reason.IDENTITY_NOT_OBJECT)
                value = node.get(step, _ABSENT)
                # Keys that read as ours under Unicode case folding (Go's encoding/json matches
                # `regi\u017ftered`, with a long s, to a field `registered`): ours alone, if
                # present. Another spelling, alone or beside ours, is a second reading for such
                # an upstream.
                ours = 0 if value is _ABSENT else 1
                if len(node) != ours:
                    readings = 0
                    for key in node:
                        if _casefolded(key) == folded:
                            readings += 1
                    if readings != ours:
                        raise Rejected(Reason.CASE_VARIANT_KEY)
                if value is not _ABSENT and value is not None:
                    following.append(value)
        current = following
    return current


def distinct_keys(mapping: dict[str, Any]) -> dict[str, Any]:
    """An object whose keys are read whole (an `id_map` identity): none two equal under Unicode
    case folding, since a case-insensitive reader would take either for the other."""
    if len(set(map(str.casefold, mapping))) != len(mapping):
        raise Rejected(Reason.CASE_VARIANT_KEY)
    return mapping


# What a request may name as a user or a session, and a token as its user: no control
# characters, no lone surrogates, so every such value can be compared and forwarded exactly.
_IDENTITY_TEXT: Final = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]+")


def is_identity_text(text: str) -> bool:
    """`_IDENTITY_TEXT`, with ASCII (nearly every id) checked without the regex: within ASCII,
    `str.isprintable` refuses exactly the control characters and DEL."""
    if text.isascii():
        return text != "" and text.isprintable()
    return _IDENTITY_TEXT.fullmatch(text) is not None


def identity_text(value: Any) -> str:
    """An identity value: a non-empty string without control characters, else 400."""
    if not isinstance(value, str) or not is_identity_text(value):
        raise Rejected(Reason.IDENTITY_INVALID)
    return value


# What `walk_json` found at each JSON path, or the reason it refused: for a large body the walk
# runs on a worker thread beside the parsing, and extraction reads its results.
Walked = dict[tuple[str | None, ...], "list[Any] | Reason"]


def walk_all(document: Any, paths: Sequence[tuple[str | None, ...]]) -> Walked:
    walked: Walked = {}
    for steps in paths:
        try:
            walked[steps] = walk_json(document, steps)
        except Rejected as refused:
            walked[steps] = refused.reason
    return walked


@dataclass(slots=True)
class RequestParts:
    """What extraction reads: the watched headers, the query (when a source needs it), the body."""

    headers: dict[str, list[str]]
    query: dict[str, list[str]]
    body: Any  # the parsed JSON document, when the route reads one
    walked: Walked | None  # `walk_all` of the body, when it was done ahead

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(
        self,
        headers: dict[str, list[str]],
        query: dict[str, list[str]],
        body: Any = _ABSENT,
        walked: Walked | None = None,
    ) -> None:
        self.headers = headers
        self.query = query
        self.body = body
        self.walked = walked


def _single_header(parts: RequestParts, name: str) -> str | None:
    values = parts.headers.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise Rejected(Reason.HEADER_DUPLICATE)
    return values[0]


def query_values(parts: RequestParts, name: str) -> list[str]:
    """Every value the upstream could read for parameter `name`, whatever its spelling; a
    structured spelling (`name[]`) is refused."""
    values = parts.query.get(query_name_key(name), [])
    if STRUCTURED in values:
        raise Rejected(Reason.QUERY_INVALID)
    return values


def _single_query(parts: RequestParts, name: str) -> str | None:
    values = query_values(parts, name)
    if not values:
        return None
    if len(values) > 1:
        raise Rejected(Reason.QUERY_DUPLICATE)
    return values[0]


def values_at(source: Source, parts: RequestParts) -> list[Any]:
    """Every value a source holds in this request; a header or parameter sent twice is 400."""
    if isinstance(source, HeaderSource):
        value: Any = _single_header(parts, source.name)
        return [] if value is None else [value]
    if isinstance(source, QuerySource):
        value = _single_query(parts, source.name)
        return [] if value is None else [value]
    if parts.body is _ABSENT:
        return []
    if parts.walked is not None and (found := parts.walked.get(source.steps)) is not None:
        if isinstance(found, Reason):
            raise Rejected(found)
        return found
    return walk_json(parts.body, source.steps)


def _token_from_header(value: str, scheme: str | None) -> str | None:
    if scheme is None:
        return value.strip() or None
    given, _, rest = value.strip().partition(" ")
    if given.lower() != scheme:
        return None
    return rest.strip() or None


@dataclass(slots=True)
class FoundToken:
    token: str
    sources: tuple[Source, ...]  # every place it was found, so it can be stripped from each
    digest: bytes  # `token_digest`, computed once for the cache and the log

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(self, token: str, sources: tuple[Source, ...], digest: bytes) -> None:
        self.token = token
        self.sources = sources
        self.digest = digest


def extract_token(
    sources: Sequence[HeaderSource | QuerySource], parts: RequestParts, max_bytes: int
) -> FoundToken | None:
    """The request's one token; two different tokens are refused, since each reader could
    pick another one."""
    token: str | None = None
    found_in: list[Source] = []
    for source in sources:
        if isinstance(source, HeaderSource):
            raw_values = parts.headers.get(source.name, ())
            values = [t for v in raw_values if (t := _token_from_header(v, source.scheme))]
        else:
            values = [v.strip() for v in query_values(parts, source.name) if v.strip()]
        if len(values) > 1:
            raise Rejected(Reason.TOKEN_DUPLICATE)
        if not values:
            continue
        if token is not None and values[0] != token:
            raise Rejected(Reason.TOKEN_DUPLICATE)
        token = values[0]
        found_in.append(source)
    if token is None:
        return None
    if len(token) > max_bytes:
        raise Rejected(Reason.TOKEN_TOO_LARGE)
    return FoundToken(token, tuple(found_in), token_digest(token))


MAX_SESSION_ID_BYTES: Final = 128


def extract_session(sources: Sequence[Source], parts: RequestParts) -> str | None:
    """The first session id found; it only keys the failure counter, so one is enough."""
    for source in sources:
        for raw in values_at(source, parts):
            if not isinstance(raw, str) or not is_identity_text(raw):
                raise Rejected(Reason.SESSION_ID_INVALID)
            if len(raw.encode()) > MAX_SESSION_ID_BYTES:
                raise Rejected(Reason.SESSION_ID_TOO_LONG)
            return raw
    return None
