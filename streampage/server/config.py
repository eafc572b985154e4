"""Server options: where to listen, who may connect, and the limits that keep one client from hurting
the others. Every field is a `streampage serve --flag` and a `STREAMPAGE_FLAG` environment variable."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from streampage.config import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (tests)
    api_key: str | None = field(default=None, repr=False)  # None: no authentication; never printed
    # Browser origins allowed to open a socket besides the page's own; "*" allows any origin.
    allowed_origins: tuple[str, ...] = ()
    max_message_bytes: int = 1 << 20  # one client message (a frame)
    max_prompt_tokens: int | None = None  # None: the engine's max_model_len
    max_output_tokens: int = 4096  # ceiling for a request's max_tokens
    max_requests_per_connection: int = 64  # live requests of one socket
    max_connections: int = 1024  # open sockets of the server
    max_queued_requests: int = 256  # accepted requests that have not produced a token yet
    max_queued_prompt_tokens: int = 1 << 18  # their prompt tokens
    max_request_timeout: float = 600.0  # seconds; the ceiling and default for a request's timeout_s
    client_buffer_bytes: int = 4 << 20  # frames waiting for a slow client; past it the socket closes (1008)
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM
    log_level: str = "info"
    # Fields below are not flags: they exist so tests can shorten waits.
    close_timeout: float = field(default=5.0, metadata={"flag": False})

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_output_tokens", "max_requests_per_connection",
                     "max_connections", "max_queued_requests", "max_queued_prompt_tokens",
                     "client_buffer_bytes"):
            _at_least(name, getattr(self, name), 1)
        if self.max_prompt_tokens is not None:
            _at_least("max_prompt_tokens", self.max_prompt_tokens, 1)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_request_timeout", "drain_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.api_key is not None and not _is_token(self.api_key):
            # The key travels as a subprotocol name for browsers, which must be an HTTP token.
            raise ConfigError("api_key must be non-empty and use only letters, digits and -._~+!#$%&'*^`|")


def flag_fields() -> list[str]:
    """The ServerConfig fields that are command-line flags."""
    return [f.name for f in fields(ServerConfig) if f.metadata.get("flag", True)]


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TOKEN_CHARS for c in text)
