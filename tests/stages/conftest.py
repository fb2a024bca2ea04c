"""Fixtures of the stage tests: the config of `support.CONFIG`, compiled at the tests' clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.base.clock import ManualClock
from gateway.config.compiled import CompiledConfig
from tests.conftest import KeyPair
from tests.stages.support import CONFIG, compile_yaml


@pytest.fixture
def config(tmp_path: Path, clock: ManualClock, key_a: KeyPair) -> CompiledConfig:
    return compile_yaml(tmp_path, CONFIG, clock, {"a.pem": key_a})
