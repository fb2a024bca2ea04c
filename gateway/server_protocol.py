"""aiohttp's low-level server, with the contract's JSON answer for requests it cannot parse.

aiohttp answers an unparsable request (bad request line, oversized header, smuggling attempt)
itself, in plain text, and logs the parser's message, which can quote the request's bytes. This
subclass answers in the contract's shape instead and logs only the kind of error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.app import new_request_id
from gateway.errors import render_error
from gateway.reasons import Reason

log = logging.getLogger("gateway.server")


ProtocolErrorHook = Callable[[BaseRequest, Reason, str, int], None]


class _ContractRequestHandler(RequestHandler):
    __slots__ = ("on_protocol_error",)
    on_protocol_error: ProtocolErrorHook

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        reason = Reason.HTTP_MALFORMED if status == 400 else Reason.INTERNAL
        if exc is not None and reason is Reason.HTTP_MALFORMED:
            # The traceback's frames point back at the exception: a cycle per refused request
            # that only the garbage collector would free. Nothing here needs the traceback.
            exc.__traceback__ = None
        request_id = new_request_id()
        if reason is Reason.INTERNAL:
            log.error(
                "request failed inside the gateway",
                exc_info=exc,
                extra={"fields": {"request_id": request_id}},
            )
        else:
            log.info(
                "unparsable request",
                extra={"fields": {"request_id": request_id, "error": type(exc).__name__}},
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is dropped")
        answer = render_error(reason, request_id)
        response = web.Response(status=answer.status, headers=answer.headers, body=answer.body)
        response.headers["X-Request-Id"] = request_id
        response.force_close()
        self.on_protocol_error(request, reason, request_id, answer.status)
        return response


class ContractServer(web.Server):
    def __init__(self, handler: Any, on_protocol_error: ProtocolErrorHook, **kwargs: Any) -> None:
        self.on_protocol_error = on_protocol_error  # so refused requests are logged and counted
        # The body is read raw: the gateway decides which encodings it accepts, decodes once
        # and forwards what it decoded (aiohttp would otherwise decode first, silently).
        super().__init__(handler, access_log=None, auto_decompress=False, **kwargs)

    def __call__(self) -> RequestHandler:
        handler = _ContractRequestHandler(self, loop=self._loop, **self._kwargs)
        handler.on_protocol_error = self.on_protocol_error
        return handler
