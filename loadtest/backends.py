"""What the load generator talks to: the server's address and protocol, and one client per run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from loadtest.records import RequestRecord
from loadtest.websocket_backend import open_websocket_client
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
    connections: int = 0            # WebSocket: 0 = a socket per request, N = multiplex over N sockets
    compression: bool = False       # WebSocket permessage-deflate (costs client CPU)
    ignore_eos: bool = True
    temperature: float = 0.0

    @property
    def url(self) -> str:
        scheme = "ws" if self.kind == "streampage" else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.endpoint or DEFAULT_ENDPOINTS[self.kind]}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


class BackendClient(Protocol):
    async def request(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Send one request and fill `record` until it ends; failures are recorded, not raised."""


@asynccontextmanager
async def open_client(config: BackendConfig) -> AsyncIterator[BackendClient]:
    """A client for one load point (a multiplexed pool is opened here, outside any request's time)."""
    if config.kind == "openai":
        # Imported here so the WebSocket path does not need aiohttp.
        from loadtest.openai_backend import open_openai_client
        async with open_openai_client(config) as client:
            yield client
    else:
        async with open_websocket_client(config) as client:
            yield client
