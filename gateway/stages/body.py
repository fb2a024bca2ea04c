"""The body: whole and within the limits (413, 400 on a broken or late one), then its one JSON
reading for the routes that read it."""

from __future__ import annotations

import asyncio

from gateway.auth.body import THREAD_BYTES, JsonBody, read_json_body
from gateway.config.routes import Route
from gateway.config.settings import LimitsSettings
from gateway.http.errors import BodyBroken, BodyTimeout, BodyTooLarge
from gateway.http.messages import Request
from gateway.refusals.reasons import Reason, Rejected


def body_at_hand(request: Request, limits: LimitsSettings) -> bytes | None:
    """The body when it came whole with the head, within the limit; else None (`read_body`)."""
    body = request.complete_body()
    return body if body is not None and len(body) <= limits.max_body_bytes else None


async def read_body(request: Request, limits: LimitsSettings) -> bytes:
    declared = request.content_length
    if declared is not None and declared > limits.max_body_bytes:
        raise Rejected(Reason.BODY_TOO_LARGE)  # before `100 Continue`: nothing is sent
    try:
        body = await request.body(limits.body_timeout_seconds)
    except BodyTooLarge:
        raise Rejected(Reason.BODY_TOO_LARGE) from None
    except BodyTimeout:
        raise Rejected(Reason.BODY_TIMEOUT) from None
    except BodyBroken:  # bad framing, or the client went away mid-body
        raise Rejected(Reason.HTTP_MALFORMED) from None
    if len(body) > limits.max_body_bytes:  # whatever limit the connection read it with
        raise Rejected(Reason.BODY_TOO_LARGE)
    return body


async def read_json(
    request: Request, route: Route, body: bytes, limits: LimitsSettings
) -> JsonBody:
    """The body's one JSON reading; a large or compressed one is read on a worker thread
    (orjson and zlib hold the GIL only while they run; the strict decoder hands it over
    every few milliseconds), so the event loop keeps serving meanwhile."""
    encodings = request.header_values("content-encoding")
    reading = (
        body,
        request.header_values("content-type"),
        encodings,
        limits.max_decompressed_bytes,
    )
    if len(body) > THREAD_BYTES or encodings:
        # The walk to the route's JSON paths too: a batch of 20,000 events is 20,000 steps.
        return await asyncio.to_thread(read_json_body, *reading, route.json_paths)
    return read_json_body(*reading)
