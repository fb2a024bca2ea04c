"""The documentation stays in step with the code: every key of the config model is described
in docs/configuration.md, and nothing in the repository points outside it or talks about how it
was written instead of what it is."""

from __future__ import annotations

import re
import subprocess
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from gateway.config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# A file outside the repository, the internal name of the product contract, or the history of
# the work: none of it means anything to a user. (Assembled, so this file does not match.)
INTERNAL_REFERENCE = re.compile(
    "|".join(
        (
            r"\.\./" + "shared",
            r"\b" + "SP" + r"EC\b",
            r"(?i:\b(?:earlier|previous|next|last) " + r"sessions?\b)",
            r"(?i:\bsessions? " + r"ago\b)",
        )
    )
)


# `defaults` has the keys of a project: documented once, as projects.<id>.*
SAME_AS = {"defaults": "projects.<id>"}


def _models_in(annotation: object) -> list[tuple[type[BaseModel], str]]:
    """The models inside a field's type, each with the notation of how it nests: `[]` for an
    element of a list, `.<id>` for a value of a map."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    if origin in (tuple, list):
        return [(m, "[]" + s) for arg in typing.get_args(annotation) for m, s in _models_in(arg)]
    if origin is dict:
        return [(m, ".<id>" + s) for m, s in _models_in(typing.get_args(annotation)[1])]
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [found for arg in typing.get_args(annotation) for found in _models_in(arg)]
    return []


def config_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        if path in SAME_AS:
            continue
        nested = _models_in(field.annotation)
        if not nested:
            keys.add(path)
        for inner, notation in nested:
            keys |= config_keys(inner, path + notation + ".")
    return keys


def test_every_config_key_is_in_the_configuration_reference() -> None:
    documented = set(re.findall(r"`([^`\s]+)`", (DOCS / "configuration.md").read_text()))
    keys = config_keys(Settings)
    assert len(keys) > 60  # the walk found the nested models
    missing = sorted(keys - documented)
    assert not missing, f"docs/configuration.md does not describe: {missing}"


def test_nothing_in_the_repository_points_outside_it_or_at_how_it_was_made() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    found = []
    for name in filter(None, tracked):
        path = ROOT / name.decode()
        if not path.is_file() or path.suffix in {".pem", ".png", ".gz"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [
            f"{name.decode()}:{number}: {line.strip()}"
            for number, line in enumerate(text.splitlines(), 1)
            if INTERNAL_REFERENCE.search(line)
        ]
    assert not found, "\n".join(found)
