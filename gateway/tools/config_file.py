"""The config file a command names: where it is, loading it, and printing why it is invalid.

Shared by the commands that read a config (`run`, `check-config`, `token inspect`); the config
schema is imported only when a file is loaded, so a command that names none never loads it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config.compiled import CompiledConfig
    from gateway.config.settings import ConfigError


def config_path(args: argparse.Namespace) -> Path:
    """The file of -c, else of $GATEWAY_CONFIG; with neither, the command stops saying so."""
    value = args.config or os.environ.get("GATEWAY_CONFIG")
    if not value:
        raise SystemExit("gateway: no config: pass -c FILE or set GATEWAY_CONFIG")
    return Path(value)


def load(path: Path) -> CompiledConfig:
    from gateway.base.clock import Clock
    from gateway.runtime.process import load_config

    return load_config(path, Clock())


def print_problems(path: Path, error: ConfigError) -> None:
    if [p.path for p in error.problems] == [str(path)]:  # the file itself: one line says it
        print(f"gateway: config {path}: {error.problems[0].message}", file=sys.stderr)
        return
    print(f"config invalid: {path}", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
