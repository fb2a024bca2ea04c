"""How a project's tokens name their user, and how a request's identity is compared with it.

Three shapes (`subject.format`):

- `key_value` (MoEngage): `{"key": <key>, "value": <user id>}`;
- `string` (Braze): the claim is the user id;
- `id_map` (Bloomreach): a map of id types to values, in `sub` (customer tokens) or `ids`
  (stream tokens). The request must name no hard id the token lacks: Bloomreach merges profiles
  on any hard id, so an extra id is an attempt to write into someone else's profile.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.auth.extract import (
    RequestParts,
    Source,
    distinct_keys,
    identity_text,
    is_identity_text,
    values_at,
)
from gateway.refusals.reasons import Reason, Rejected

Identity = str | Mapping[str, str]


def header_safe(user: str) -> str:
    """Percent-encode (as UTF-8) every byte outside printable ASCII, and `%` itself; spaces at
    either end too, since HTTP parsers strip them and the user would arrive changed."""
    # Within ASCII, `str.isprintable` holds exactly for space to `~`: no regex for the usual id.
    if (
        user.isascii()
        and user.isprintable()
        and user.find("%") == -1
        and user[:1] != " "
        and user[-1:] != " "
    ):
        return user
    encoded = "".join(
        c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode())
        for c in user
    )
    stripped = encoded.strip(" ")
    start = encoded.index(stripped) if stripped else len(encoded)
    return "%20" * start + stripped + "%20" * (len(encoded) - start - len(stripped))


@dataclass(frozen=True, slots=True)
class ScalarSubject:
    """`key_value` when `key` is set, else `string`."""

    claim: str
    key: str | None

    def read_token(self, claims: Mapping[str, Any]) -> str:
        subject = claims.get(self.claim)
        if self.key is not None:
            if not isinstance(subject, dict) or len(subject) != 2 or subject.get("key") != self.key:
                raise Rejected(Reason.SUBJECT_INVALID)
            subject = subject.get("value")
        if not isinstance(subject, str) or not is_identity_text(subject):
            raise Rejected(Reason.SUBJECT_INVALID)
        return subject

    def identity(self, sources: Sequence[Source], parts: RequestParts) -> str | None:
        """The one user the request names, or None when it names none (anonymous)."""
        identity: str | None = None
        for source in sources:
            for raw in values_at(source, parts):
                value = identity_text(raw)
                if identity is None:
                    identity = value
                elif value != identity:
                    raise Rejected(Reason.IDENTITY_CONFLICT)
        return identity

    def authorises(self, identity: Identity, subject: Identity) -> bool:
        return identity == subject

    def header(self, identity: Identity | None, subject: Identity) -> str:
        assert isinstance(subject, str)
        return header_safe(subject)


@dataclass(frozen=True, slots=True)
class IdMapSubject:
    claim: str
    anonymous_ids: frozenset[str]

    def read_token(self, claims: Mapping[str, Any]) -> Mapping[str, str]:
        ids = claims.get(self.claim)
        if (
            not isinstance(ids, dict)
            or not ids
            or not all(isinstance(v, str) and is_identity_text(v) for v in ids.values())
        ):
            raise Rejected(Reason.SUBJECT_INVALID)
        return ids

    def identity(self, sources: Sequence[Source], parts: RequestParts) -> Mapping[str, str] | None:
        """Every hard id the request names (anonymous ids left out), or None if it names none."""
        found: dict[str, str] = {}
        for source in sources:
            for raw in values_at(source, parts):
                for id_type, value in self._ids_in(source, raw):
                    if found.setdefault(id_type, value) != value:
                        raise Rejected(Reason.IDENTITY_CONFLICT)
        hard = {k: v for k, v in found.items() if k not in self.anonymous_ids}
        return hard or None

    @staticmethod
    def _ids_in(source: Source, raw: Any) -> list[tuple[str, str]]:
        if source.id is not None:
            return [(source.id, identity_text(raw))]
        if not isinstance(raw, dict):
            raise Rejected(Reason.IDENTITY_INVALID)
        return [(k, identity_text(v)) for k, v in distinct_keys(raw).items() if v is not None]

    def authorises(self, identity: Identity, subject: Identity) -> bool:
        assert isinstance(identity, Mapping)
        assert isinstance(subject, Mapping)
        return all(subject.get(k) == v for k, v in identity.items())

    def header(self, identity: Identity | None, subject: Identity) -> str:
        shown = identity if identity is not None else subject
        assert isinstance(shown, Mapping)
        if identity is None:
            shown = {k: v for k, v in shown.items() if k not in self.anonymous_ids}
        # ensure_ascii keeps the header printable ASCII without percent-encoding the JSON.
        return json.dumps(dict(shown), separators=(",", ":"), sort_keys=True)


Subject = ScalarSubject | IdMapSubject


def identity_key(identity: Identity) -> str:
    """One string per identity, for keying a session by its user."""
    if isinstance(identity, str):
        return identity
    return json.dumps(dict(identity), separators=(",", ":"), sort_keys=True)
