"""`tests/setup/system-packages.sh`, which `make test` and `make bench` run first: it finds the
Debian packages missing for the target, installs them as root or through passwordless sudo, and
otherwise stops with the one command to run. Run here with a PATH of stand-ins (a user who is
not root, a sudo that refuses), so it never installs anything."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "setup" / "system-packages.sh"
# Each command `make bench` runs, and the Debian package that has it.
BENCH_PACKAGES = {
    "wrk": "wrk",
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "redis-server": "redis-server",
}


def _stand_in(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _run(tmp_path: Path, present: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The script with only `present` (and bash) on its PATH, as a user who may not install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    bash = shutil.which("bash")
    assert bash is not None
    (bin_dir / "bash").symlink_to(bash)
    _stand_in(bin_dir / "id", "echo 1000")
    _stand_in(bin_dir / "sudo", "exit 1")
    for command in present:
        _stand_in(bin_dir / command, "exit 0")
    return subprocess.run(
        [str(SCRIPT), *args],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "present", [[], ["wrk", "redis-server"], ["nginx", "haproxy"], ["wrk", "nginx", "haproxy"]]
)
def test_bench_names_the_one_command_that_installs_what_is_missing(
    tmp_path: Path, present: list[str]
) -> None:
    done = _run(tmp_path, present, "bench")
    missing = " ".join(p for command, p in BENCH_PACKAGES.items() if command not in present)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == (
        "missing system packages; run: sudo sh -c 'apt-get update && "
        f"apt-get install -y --no-install-recommends {missing}'\n"
    )


def test_bench_with_everything_present_installs_nothing(tmp_path: Path) -> None:
    done = _run(tmp_path, list(BENCH_PACKAGES), "bench")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_an_unknown_target_is_refused_with_the_usage(tmp_path: Path) -> None:
    done = _run(tmp_path, list(BENCH_PACKAGES), "benchmark")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: ")
