"""Request bodies that are read for identity: one encoding, one media type, one JSON document.

A body the gateway decoded is forwarded decoded, so the upstream reads the very bytes that were
authorised rather than decompressing them again in its own way.

Reading a large body takes milliseconds (about 15 per MiB in orjson, more in the strict
decoder): the pipeline reads bodies past `THREAD_BYTES`, and every compressed one, on a worker
thread, so other requests on the event loop are not held while it runs.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from gateway.auth.extract import Walked, walk_all
from gateway.auth.jsonstrict import JSONRejected, loads_strict
from gateway.base.memo import BoundedMemo
from gateway.refusals.reasons import Reason, Rejected

_WBITS: Final = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


def content_coding(values: list[str]) -> str | None:
    """The one content coding named by the Content-Encoding header, None for identity. A list
    (`identity, gzip`), a repeated header or an unknown coding is refused: readers disagree
    about which codings of a list apply, and in what order."""
    if not values:
        return None
    if len(values) > 1 or "," in values[0]:
        raise Rejected(Reason.ENCODING_UNSUPPORTED)
    coding = values[0].strip().lower()
    if coding == "identity":
        return None
    if coding not in _WBITS:
        raise Rejected(Reason.ENCODING_UNSUPPORTED)
    return coding


def decompress(body: bytes, coding: str, max_bytes: int) -> bytes:
    decoder = zlib.decompressobj(_WBITS[coding])
    try:
        out = decoder.decompress(body, max_bytes + 1)
    except zlib.error:
        raise Rejected(Reason.ENCODING_INVALID) from None
    if len(out) > max_bytes:
        raise Rejected(Reason.DECOMPRESSED_TOO_LARGE)
    if not decoder.eof or decoder.unused_data:
        # A truncated stream, or a second gzip member another decoder might ignore or append.
        raise Rejected(Reason.ENCODING_INVALID)
    return out


# RFC 9110 §8.3.1: `type/subtype` tokens, then `; name=value` parameters (token or
# quoted-string), separated by optional spaces and tabs, and nothing else. Readers disagree about
# anything outside this grammar (Django strips a leading NBSP and sees a form where a strict
# reader sees no known type), so it is refused rather than read one way.
_NAME: Final = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110's `token`
_QUOTED: Final = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_PARAMETER: Final = re.compile(rf"({_NAME})=({_NAME}|{_QUOTED})")
_MEDIA_TYPE: Final = re.compile(
    rf"({_NAME})/({_NAME})((?:[ \t]*;[ \t]*(?:{_PARAMETER.pattern})?)*)"
)
_UTF8: Final = ("utf-8", "utf8")
_accepted_media_types: Final[BoundedMemo[str, bool]] = BoundedMemo(256)


def check_media_type(values: list[str]) -> None:
    """Refuse bodies the upstream could read as something other than one JSON document."""
    if not values:
        return
    if len(values) > 1:
        raise Rejected(Reason.HEADER_DUPLICATE)
    if values[0] not in _accepted_media_types:
        _check_media_type(values[0])  # raises for a refused one, which is not kept
        _accepted_media_types.keep(values[0], True)


def _check_media_type(value: str) -> None:
    parsed = _MEDIA_TYPE.fullmatch(value)
    if parsed is None:
        raise Rejected(Reason.MEDIA_TYPE_INVALID)
    media_type = f"{parsed[1]}/{parsed[2]}".lower()
    if media_type == "application/x-www-form-urlencoded":
        raise Rejected(Reason.MEDIA_TYPE_FORM)
    if media_type.startswith("multipart/"):
        raise Rejected(Reason.MEDIA_TYPE_MULTIPART)
    names: set[str] = set()
    for name, raw in _PARAMETER.findall(parsed[3]):
        folded = name.lower()
        if folded in names:
            raise Rejected(Reason.MEDIA_TYPE_INVALID)  # which one would the upstream read?
        names.add(folded)
        if folded == "charset" and raw.strip('"').lower() not in _UTF8:
            raise Rejected(Reason.CHARSET_UNSUPPORTED)


def parse_json_body(body: bytes) -> Any:
    try:
        return loads_strict(body)
    except JSONRejected as exc:
        if exc.duplicate_key:
            raise Rejected(Reason.DUPLICATE_KEY) from None
        if exc.control_in_key:
            raise Rejected(Reason.KEY_CONTROL_CHARACTER) from None
        raise Rejected(Reason.JSON_INVALID) from None


THREAD_BYTES: Final = 64 * 1024
NOT_READ: Final[Any] = object()  # `JsonBody.document` when the body was empty or could not be read


@dataclass(slots=True)
class JsonBody:
    """A body read for identity: the bytes to forward and their one JSON reading, or the
    reason each step refused it (kept, so the pipeline reports it in the contract's order)."""

    forwarded: bytes
    decoded: bool
    encoding_refused: Reason | None  # media type, coding or size: 413/415/400
    parse_refused: Reason | None  # not one strict JSON document: 400
    document: Any  # NOT_READ when it was not read
    walked: Walked | None  # what the route's JSON paths hold, when walked ahead

    # Written out: mypyc compiles this one, not the one @dataclass would generate at import.
    def __init__(
        self,
        forwarded: bytes,
        decoded: bool = False,
        *,
        encoding_refused: Reason | None = None,
        parse_refused: Reason | None = None,
        document: Any = NOT_READ,
        walked: Walked | None = None,
    ) -> None:
        self.forwarded = forwarded
        self.decoded = decoded
        self.encoding_refused = encoding_refused
        self.parse_refused = parse_refused
        self.document = document
        self.walked = walked


def read_json_body(
    body: bytes,
    content_types: list[str],
    content_encodings: list[str],
    max_decompressed: int,
    walk: Sequence[tuple[str | None, ...]] = (),
) -> JsonBody:
    """Check the media type, decode the content coding, parse the JSON and walk it to the
    paths in `walk`: no I/O, so it can run on a worker thread."""
    try:
        check_media_type(content_types)
        coding = content_coding(content_encodings)
        decoded = coding is not None
        if coding is not None:
            body = decompress(body, coding, max_decompressed)
    except Rejected as refused:
        return JsonBody(body, encoding_refused=refused.reason)
    if not body:
        return JsonBody(body, decoded)
    try:
        document = parse_json_body(body)
    except Rejected as refused:
        return JsonBody(body, decoded, parse_refused=refused.reason)
    return JsonBody(body, decoded, document=document, walked=walk_all(document, walk) or None)
