"""`streampage serve` options: every server option is a flag and a STREAMPAGE_ environment variable."""

from __future__ import annotations

import argparse

import pytest

from streampage.cli import apply_environment_defaults, engine_options
from streampage.config import ConfigError
from streampage.server.app import add_arguments, server_config
from streampage.server.config import ServerConfig, flag_fields


def parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    apply_environment_defaults(parser, environ or {})
    return parser.parse_args(argv)


def test_defaults_are_the_server_config_defaults() -> None:
    args = parse([])
    assert server_config(args) == ServerConfig()
    assert args.model is None and engine_options(args) == {}


def test_flags_and_environment_set_every_option() -> None:
    environ = {"STREAMPAGE_API_KEY": "k3y", "STREAMPAGE_ALLOWED_ORIGINS": "https://a.example,https://b.example",
               "STREAMPAGE_MAX_CONNECTIONS": "7", "STREAMPAGE_DRAIN_TIMEOUT": "2.5",
               "STREAMPAGE_MAX_NUM_SEQS": "8", "STREAMPAGE_PORT": "9000"}
    args = parse(["/models/x", "--port", "9100", "--max-prompt-tokens", "100"], environ)
    config = server_config(args)
    assert config.api_key == "k3y"
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert (config.max_connections, config.drain_timeout, config.max_prompt_tokens) == (7, 2.5, 100)
    assert config.port == 9100, "the command line wins over the environment"
    assert engine_options(args) == {"model": "/models/x", "max_num_seqs": 8}


def test_every_server_option_has_a_flag() -> None:
    args = parse([])
    for name in flag_fields():
        assert hasattr(args, name), name


@pytest.mark.parametrize("argv", [["--max-connections", "0"], ["--port", "70000"], ["--drain-timeout", "-1"],
                                  ["--api-key", "has space"], ["--log-level", "loud"]])
def test_bad_values_are_refused_by_name(argv: list[str]) -> None:
    with pytest.raises(ConfigError, match=argv[0][2:].replace("-", "_")):
        server_config(parse(argv))
