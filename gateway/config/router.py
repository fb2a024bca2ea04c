"""First-match routing on compiled path templates.

A path reaches the router only in the one form `gateway.auth.target` accepts. `/batch` and
`/batch/` are different paths to many upstreams (PostHog takes `/batch/`), so a route matches a
path that ends in `/` only when its own template does, and never the other way round.
"""

from __future__ import annotations

import re
from typing import Final, Generic, TypeVar

from gateway.auth.target import SEGMENT_CHARS
from gateway.base.memo import BoundedMemo
from gateway.refusals.reasons import MethodNotAllowed, Reason, Rejected


class TemplateError(ValueError):
    pass


def compile_template(template: str) -> re.Pattern[str]:
    """`/a/{project}/b/{id:[0-9]{4}}` → a regex with one named group per placeholder."""
    if not template.startswith("/"):
        raise TemplateError("must start with /")
    out: list[str] = []
    literal = ""  # the template with each placeholder as `{}`, for the segment checks
    names: set[str] = set()
    i = 0
    while i < len(template):
        char = template[i]
        if char == "}":
            raise TemplateError(f"unbalanced }} at offset {i}")
        if char != "{":
            if not (char == "/" or re.fullmatch(SEGMENT_CHARS, char)):
                raise TemplateError(f"character {char!r} can never match a valid path")
            out.append(re.escape(char))
            literal += char
            i += 1
            continue
        name, pattern, i = _placeholder(template, i, names)
        out.append(f"(?P<{name}>{pattern or SEGMENT_CHARS})")
        literal += "{}"
    _check_segments(literal)
    if not template.endswith("/"):
        # A placeholder's own regex (`{rest:.*}`) could otherwise reach a trailing `/`.
        out.append("(?<!/)")
    try:
        return re.compile("".join(out))
    except re.error as exc:
        raise TemplateError(f"placeholder regex does not compile: {exc}") from None


def _placeholder(template: str, start: int, names: set[str]) -> tuple[str, str, int]:
    """The placeholder opening at `start`: its name, its regex ("" for one segment), and the
    offset after it. Braces nest, for regexes like `[0-9]{4}`."""
    depth, end = 1, start + 1
    while end < len(template) and depth:
        depth += {"{": 1, "}": -1}.get(template[end], 0)
        end += 1
    if depth:
        raise TemplateError(f"unclosed {{ at offset {start}")
    name, _, pattern = template[start + 1 : end - 1].partition(":")
    if not name.isidentifier():
        raise TemplateError(f"placeholder name {name!r} is not an identifier")
    if name in names:
        raise TemplateError(f"placeholder {name!r} appears twice")
    names.add(name)
    return name, pattern, end


def _check_segments(literal: str) -> None:
    """The segments the target parser refuses: a route with one could never match a request."""
    segments = literal.removesuffix("/").split("/")[1:]
    if "" in segments:
        raise TemplateError("has an empty segment")
    if "." in segments or ".." in segments:
        raise TemplateError("has a . or .. segment")


def placeholder_pattern(template: str, name: str) -> str | None:
    """The regex written for `{name:regex}` in a template, None for a plain `{name}`."""
    match = re.search(r"\{" + re.escape(name) + r"(?::((?:[^{}]|\{[^{}]*\})*))?\}", template)
    return match.group(1) if match and match.group(1) else None


RouteT = TypeVar("RouteT")


class RouteEntry(Generic[RouteT]):
    """A route's compiled template and methods. (A plain class: mypyc does not compile a
    generic dataclass.)"""

    def __init__(self, pattern: re.Pattern[str], methods: frozenset[str], route: RouteT) -> None:
        self.pattern: Final = pattern
        self.methods: Final = methods
        self.route: Final = route


class Router(Generic[RouteT]):
    """First match wins; a path that matches only under other methods is a 405 with `Allow`."""

    def __init__(self, entries: list[RouteEntry[RouteT]]) -> None:
        self._entries = tuple(entries)
        self._matches: BoundedMemo[tuple[str, str], tuple[RouteT, dict[str, str]]]
        self._matches = BoundedMemo(4096)

    @property
    def entries(self) -> tuple[RouteEntry[RouteT], ...]:
        return self._entries

    def match(self, method: str, path: str) -> tuple[RouteT, dict[str, str]]:
        """The route and its placeholders' values (a dict the caller must not change)."""
        found = self._matches.get((method, path))
        if found is None:
            found = self._matches.keep((method, path), self._match(method, path))
        return found

    def _match(self, method: str, path: str) -> tuple[RouteT, dict[str, str]]:
        allowed: set[str] = set()
        for entry in self._entries:
            found = entry.pattern.fullmatch(path)
            if found is None:
                continue
            if method in entry.methods:
                return entry.route, found.groupdict()
            allowed |= entry.methods
        if allowed:
            raise MethodNotAllowed(", ".join(sorted(allowed)))
        raise Rejected(Reason.ROUTE_NOT_FOUND)
