"""What the load generator talks to: the server's address and protocol, and the client interface."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loadtest.records import RequestRecord
from loadtest.workloads import RequestSpec

BACKENDS = ("streampage", "openai")
DEFAULT_ENDPOINTS = {"streampage": "/v1/stream", "openai": "/v1/completions"}


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "streampage"
    host: str = "127.0.0.1"
    port: int = 8000
    endpoint: str | None = None     # the path; None: the backend's default
    api_key: str | None = None
    model: str | None = None        # OpenAI `model`; None: the first one `/v1/models` lists
    prompt_tokenizer: str | None = None  # OpenAI: send prompts as text decoded with this tokenizer
    connections: int = 0            # WebSocket: 0 = a socket per request, N = multiplex over N sockets
    compression: bool = False       # WebSocket permessage-deflate (costs client CPU)
    ignore_eos: bool = True
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.kind!r}")
        if self.connections < 0:
            raise ValueError(f"connections must be >= 0, got {self.connections}")

    @property
    def url(self) -> str:
        scheme = "ws" if self.kind == "streampage" else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.endpoint or DEFAULT_ENDPOINTS[self.kind]}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class BackendUnavailable(RuntimeError):
    """The run could not start: the server refused or did not answer its setup (pool, model list)."""

    def __init__(self, url: str, cause: Exception) -> None:
        super().__init__(f"cannot use {url}: {type(cause).__name__}: {cause}")


class BackendClient(Protocol):
    async def request(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Send one request and fill `record` until it ends; failures are recorded, not raised."""
