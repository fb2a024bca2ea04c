"""`gateway token inspect`: what a token says, and the verdict the gateway would give it.

The verdict runs the very verifier the gateway serves with, on a clock set to `--at`, so the
answer to "why is my token rejected?" is the gateway's own code and reason.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from gateway.auth.subject import Identity
from gateway.auth.verified import token_kid, token_user
from gateway.base.clock import ManualClock
from gateway.config.compiled import compile_config
from gateway.config.settings import LoadedConfig
from gateway.refusals.reasons import Reason, Rejected


@dataclass(frozen=True, slots=True)
class Decoded:
    header: Any
    claims: Any
    problem: str | None  # why the token cannot even be decoded, if it cannot


def _segment(text: str) -> Any:
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return json.loads(raw)


def decode_unverified(token: str) -> Decoded:
    """Header and claims as they stand, without checking anything: for reading, not trusting."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return Decoded(None, None, f"a JWS has 3 dot-separated parts; this has {len(parts)}")
    try:
        return Decoded(_segment(parts[0]), _segment(parts[1]), None)
    except (binascii.Error, ValueError) as exc:
        return Decoded(None, None, f"does not decode: {type(exc).__name__}")


@dataclass(frozen=True, slots=True)
class Verdict:
    code: str  # VERIFIED, or the error code the gateway would answer
    reason: str
    user: Identity | None = None
    kid: str | None = None


def verdict(
    loaded: LoadedConfig, project_id: str, token: str, identity: Identity | None, at: float
) -> Verdict:
    config = compile_config(loaded, ManualClock(at))
    project = config.project(project_id)
    if project.verifier is None:
        reason = Reason.KEYS_UNAVAILABLE
        return Verdict(reason.code.name, reason.phrase)
    try:
        verified = project.verifier.verify(token)
    except Rejected as refused:
        return Verdict(refused.reason.code.name, refused.reason.phrase)
    if identity is not None and not project.subject.authorises(identity, token_user(verified)):
        mismatch = Reason.SUBJECT_MISMATCH
        return Verdict(mismatch.code.name, mismatch.phrase)
    return Verdict("VERIFIED", "ok", token_user(verified), token_kid(verified))
