"""`streampage serve [MODEL] [options]`: the CLI face of the streaming server.

Every option is a flag and a `STREAMPAGE_<OPTION>` environment variable (the systemd environment
file sets them). `lifecycle.run_server` does the work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from streampage.cli import add_engine_arguments, engine_options
from streampage.config import ConfigError, EngineConfig
from streampage.server.config import ServerConfig, flag_fields
from streampage.server.lifecycle import configure_logging, real_engine_starter, run_server

logger = logging.getLogger("streampage.server")

_FLAG_HELP = {
    "host": "address to listen on",
    "port": "TCP port (0: any free port)",
    "api_key": "require this key (Authorization: Bearer KEY, or the subprotocol bearer.KEY); "
               "prefer the environment variable, the command line is visible to other users",
    "allowed_origins": "browser origins allowed besides the page's own (comma-separated in the "
                       "environment; * allows any)",
    "max_message_bytes": "largest client message",
    "max_prompt_tokens": "longest prompt in tokens (default: the model's max_model_len)",
    "max_output_tokens": "largest max_tokens a request may ask for",
    "max_requests_per_connection": "live requests per socket (too_many_requests past it)",
    "max_connections": "open sockets (HTTP 503 past it)",
    "max_queued_requests": "requests waiting for their first token, all sockets (server_overloaded)",
    "max_queued_prompt_tokens": "their prompt tokens (server_overloaded)",
    "max_request_timeout": "seconds: ceiling and default of a request's timeout_s",
    "client_buffer_bytes": "bytes queued for a slow client before its socket is closed (1008)",
    "drain_timeout": "seconds in-flight requests get to finish after SIGTERM",
    "log_level": "debug, info, warning or error",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser, model_positional=True)
    group = parser.add_argument_group("server")
    defaults = ServerConfig()
    for name in flag_fields():
        default = getattr(defaults, name)
        shown = default not in (None, ()) and name != "api_key"
        help_text = _FLAG_HELP[name] + (f" (default: {default})" if shown else "")
        flag = "--" + name.replace("_", "-")
        if name == "allowed_origins":
            group.add_argument(flag, nargs="*", default=None, help=help_text)
        else:
            group.add_argument(flag, type=_flag_type(name), default=None, help=help_text)


def _flag_type(name: str) -> type:
    annotation = str(ServerConfig.__dataclass_fields__[name].type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def server_config(args: argparse.Namespace) -> ServerConfig:
    given = {name: getattr(args, name) for name in flag_fields() if getattr(args, name, None) is not None}
    if "allowed_origins" in given:
        given["allowed_origins"] = tuple(given["allowed_origins"])
    return ServerConfig(**given)


def run(args: argparse.Namespace) -> int:
    try:
        config = server_config(args)
        options = engine_options(args)
        model = options.pop("model", None) or None
        EngineConfig.create(**options)  # refuse bad options before listening
    except ConfigError as exc:
        logger.error("%s", exc)
        return 2
    configure_logging(config.log_level)
    try:
        return _run_loop(run_server(config, start_engine=real_engine_starter(model, options)))
    except OSError as exc:  # the address is taken or not ours to bind
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # uvloop does not exist on Windows
        return asyncio.run(main)
    return uvloop.run(main)
