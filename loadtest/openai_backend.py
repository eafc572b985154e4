"""The OpenAI-compatible client: `POST /v1/completions` with `stream: true`, read as server-sent events.

It measures vLLM, SGLang or any server with that API under the same workload: the prompt goes as a
list of token ids, `max_tokens` with `ignore_eos` fixes the output length. Chunks do not say how many
tokens they carry, so each chunk counts as one token on the stream and the final `usage` (asked for
with `stream_options.include_usage`) gives the exact output count used for TPOT and throughput.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from time import perf_counter
from typing import Any

import aiohttp
import orjson

from loadtest.backends import BackendConfig, BackendUnavailable
from loadtest.records import RequestRecord
from loadtest.workloads import RequestSpec

DONE = b"[DONE]"


class OpenAIClient:
    def __init__(self, config: BackendConfig, session: aiohttp.ClientSession, model: str) -> None:
        self._config = config
        self._session = session
        self._model = model

    def payload(self, spec: RequestSpec) -> dict[str, Any]:
        # A server that takes only text re-tokenizes the decoded prompt: its length may differ a little.
        prompt = spec.prompt_token_ids if spec.prompt_text is None else spec.prompt_text
        payload = {
            "model": self._model, "prompt": prompt, "max_tokens": spec.max_tokens,
            "temperature": self._config.temperature, "stream": True, "stream_options": {"include_usage": True},
        }
        if self._config.ignore_eos:  # not an OpenAI field: servers that validate strictly refuse it
            payload["ignore_eos"] = True
        return payload

    async def request(self, spec: RequestSpec, record: RequestRecord) -> None:
        body = orjson.dumps(self.payload(spec))
        headers = {"Content-Type": "application/json", **self._config.auth_headers}
        record.sent_at = perf_counter()
        try:
            async with self._session.post(self._config.url, data=body, headers=headers) as response:
                if response.status != 200:
                    record.finish(perf_counter(), f"http:{response.status}")
                    return
                await _read_events(response, record)
        except aiohttp.ClientError as exc:
            record.finish(perf_counter(), f"connect:{type(exc).__name__}")


async def _read_events(response: aiohttp.ClientResponse, record: RequestRecord) -> None:
    """Fold `data:` lines into the record until `[DONE]`. A stream that ends without it counts as
    complete only after a chunk with a finish reason (HF `transformers serve` sends no `[DONE]`);
    otherwise it is a disconnect."""
    async for line in response.content:
        now = perf_counter()
        if not line.startswith(b"data:"):
            continue   # blank separators, `:` keep-alive comments, `event:` lines
        data = line[5:].strip()
        if data == DONE:
            record.finish(now)
            return
        error = _on_event(orjson.loads(data), record, now)
        if error:
            record.finish(now, error)
            return
    record.finish(perf_counter(), None if record.finish_reason else "disconnect:eof")


def _on_event(event: dict[str, Any], record: RequestRecord, now: float) -> str | None:
    if "error" in event:
        error = event["error"]
        code = (error.get("code") or error.get("type")) if isinstance(error, dict) else error
        return f"error:{code}"
    if choices := event.get("choices"):
        # As vLLM counts: every chunk with a choice is a token chunk, even with empty text.
        record.add_chunk(now, 1)
        record.finish_reason = choices[0].get("finish_reason") or record.finish_reason
    if usage := event.get("usage"):
        record.usage_output_tokens = usage.get("completion_tokens")
        record.server_prompt_tokens = usage.get("prompt_tokens")
    return None


async def first_model(session: aiohttp.ClientSession, config: BackendConfig) -> str:
    """The first model `/v1/models` lists: what the server serves when `--model` is not given."""
    base = config.url.rsplit("/v1/", 1)[0]
    async with session.get(f"{base}/v1/models", headers=config.auth_headers) as response:
        response.raise_for_status()
        models = (await response.json())["data"]
    if not models:
        raise RuntimeError(f"{base}/v1/models lists no model; pass --model")
    return models[0]["id"]


@asynccontextmanager
async def open_openai_client(config: BackendConfig) -> AsyncIterator[OpenAIClient]:
    # No connection limit: a pool cap would queue requests inside aiohttp, out of the measurement's sight.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        try:
            model = config.model or await first_model(session, config)
        except (aiohttp.ClientError, KeyError, RuntimeError) as exc:
            raise BackendUnavailable(config.url, exc) from exc
        yield OpenAIClient(config, session, model)
