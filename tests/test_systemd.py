"""The systemd unit passes `systemd-analyze verify` without a warning and scores an exposure of at most
2.5 in `systemd-analyze security --offline=true`; its environment file sets every serve option."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from streampage.cli import apply_environment_defaults, engine_options
from streampage.config import EngineConfig, option_names
from streampage.server.app import add_arguments, server_config
from streampage.server.config import ServerConfig, flag_fields

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "streampage.service"
ENV_FILE = SYSTEMD / "streampage.env"
INSTALLED_EXEC = "/opt/streampage/.venv/bin/streampage"
MAX_EXPOSURE = 2.5

# In CI (.ci/run installs it) a missing systemd-analyze is a failure, not a skip.
needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
                                           reason="systemd-analyze is not installed (apt-get install systemd)")


@pytest.fixture
def unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's streampage (verify checks it exists)."""
    executable = Path(sys.executable).parent / "streampage"
    assert executable.exists(), "pip install -e . installs the streampage command"
    path = tmp_path / "streampage.service"
    path.write_text(UNIT.read_text().replace(INSTALLED_EXEC, str(executable)))
    return path


def run_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


@needs_systemd_analyze
def test_unit_verifies_without_warnings(unit_here: Path) -> None:
    result = run_analyze("verify", str(unit_here))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


@needs_systemd_analyze
def test_unit_exposure_is_low(unit_here: Path) -> None:
    result = run_analyze("security", "--offline=true", "--no-pager", str(unit_here))
    found = re.search(r"Overall exposure level for streampage\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_has_the_lifecycle_the_server_implements() -> None:
    unit = unit_settings()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"] and unit["DynamicUser"] == ["yes"]
    assert unit["ExecStart"] == [f"{INSTALLED_EXEC} serve $STREAMPAGE_MODEL"]
    assert unit["EnvironmentFile"] == ["/etc/streampage/streampage.env"]
    assert "char-nvidia-frontend rw" in unit["DeviceAllow"] and unit["PrivateDevices"] == ["no"]
    assert _seconds(unit["TimeoutStopSec"][0]) > ServerConfig().drain_timeout + 2 * ServerConfig().close_timeout
    assert _seconds(unit["TimeoutStartSec"][0]) >= 600
    assert int(unit["LimitNOFILE"][0]) > ServerConfig().max_connections
    assert "WatchdogSec" in unit


def _seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(s|min)", value).groups()  # type: ignore[union-attr]
    return int(number) * (60 if unit == "min" else 1)


def env_lines() -> dict[str, tuple[str, bool]]:
    """STREAMPAGE_ name -> (value, active) for every line of the environment file, commented or not."""
    lines = {}
    for line in ENV_FILE.read_text().splitlines():
        found = re.fullmatch(r"(#?)(STREAMPAGE_[A-Z_]+)=(.*)", line)
        if found:
            lines[found.group(2)] = (found.group(3), not found.group(1))
    return lines


def test_environment_file_names_every_serve_option() -> None:
    engine = [name for concern in fields(EngineConfig) for name in option_names(concern.name)]
    names = {"STREAMPAGE_" + name.upper() for name in [*engine, *flag_fields()]}
    assert names <= set(env_lines()), sorted(names - set(env_lines()))


def test_environment_file_values_are_valid_options() -> None:
    """Every value in the file, commented examples included, parses into valid options."""
    environ = {name: value for name, (value, _) in env_lines().items() if value}
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    apply_environment_defaults(parser, environ)
    args = parser.parse_args([])
    assert server_config(args).host == "0.0.0.0"
    EngineConfig.create(**engine_options(args))
