"""Runs one load point: issues requests on schedule, bounded in count and time, and keeps every record.

Open loop (a finite `--request-rate`): request i is due at its arrival time whatever the server does;
with `--max-concurrency` as well, a due request waits for a free slot and that wait counts in its
latency. Closed loop (`--max-concurrency` at an infinite rate): a request is due the moment a slot
frees. `--duration` stops new requests; those in flight run to their end (or `--request-timeout`).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from time import perf_counter, process_time

from tqdm import tqdm

from loadtest.arrivals import arrival_offsets
from loadtest.backends import BackendClient, BackendConfig
from loadtest.records import RequestRecord
from loadtest.websocket_backend import open_websocket_client
from loadtest.workloads import RequestSpec, WorkloadConfig, generate, with_prompt_text

LAG_PROBE_INTERVAL_S = 0.01


@dataclass(frozen=True)
class LoadPoint:
    request_rate: float = math.inf
    max_concurrency: int | None = None
    burstiness: float = 1.0
    num_prompts: int | None = 1000
    duration_s: float | None = None

    @property
    def closed_loop(self) -> bool:
        return self.max_concurrency is not None and math.isinf(self.request_rate)

    @property
    def label(self) -> str:
        rate = f"rate={self.request_rate:g}"
        return rate if self.max_concurrency is None else f"{rate} concurrency={self.max_concurrency}"


@dataclass
class PointResult:
    point: LoadPoint
    started_at: float
    finished_at: float = 0.0
    records: list[RequestRecord] = field(default_factory=list)
    loop_lags: list[float] = field(default_factory=list)   # seconds the client's event loop ran late
    cpu_s: float = 0.0   # CPU seconds this process spent on the point: near duration_s, the client limits

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at


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


async def measure_point(backend: BackendConfig, point: LoadPoint, workload: WorkloadConfig, *,
                        point_index: int = 0, request_timeout: float = 600.0, progress: bool = True) -> PointResult:
    """One load point on a fresh client. Every point of a run sends the same seeded lengths at the same
    seeded arrival offsets; its prompt tokens are its own (`generate`'s `point`)."""
    specs = generate(workload, point=point_index)
    if backend.prompt_tokenizer:
        specs = with_prompt_text(specs, backend.prompt_tokenizer)
    async with open_client(backend) as client:
        return await run_point(client, point, specs, seed=workload.seed, request_timeout=request_timeout,
                               progress=progress)


async def run_point(client: BackendClient, point: LoadPoint, specs: Iterator[RequestSpec], *,
                    seed: int = 0, request_timeout: float = 600.0, progress: bool = True) -> PointResult:
    """Issue the point's requests and wait for all of them; every issued request has a record."""
    gate = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
    result = PointResult(point, started_at=perf_counter())
    cpu_start = process_time()
    probe = asyncio.create_task(_probe_loop_lag(result.loop_lags))
    tasks: list[asyncio.Task[None]] = []
    try:
        with tqdm(total=point.num_prompts, desc=point.label, unit="req", disable=not progress) as bar:
            issuer = _Issuer(client, gate, point.closed_loop, request_timeout, bar)
            arrivals = arrival_offsets(point.request_rate, point.burstiness, seed)
            for index, (spec, offset) in enumerate(zip(specs, arrivals, strict=False)):
                due = await _next_due(point, gate, result.started_at, offset, index)
                if due is None:
                    break
                record = RequestRecord(f"r{index}", len(spec.prompt_token_ids), spec.max_tokens, due)
                result.records.append(record)
                tasks.append(asyncio.create_task(issuer(spec, record)))
            await asyncio.gather(*tasks)
    finally:
        probe.cancel()
    result.finished_at = perf_counter()
    result.cpu_s = process_time() - cpu_start
    return result


async def _probe_loop_lag(samples: list[float]) -> None:
    """How late the event loop wakes a short timer: a late loop means the client itself is saturated,
    and every timestamp it takes is late by as much."""
    while True:
        start = perf_counter()
        await asyncio.sleep(LAG_PROBE_INTERVAL_S)
        samples.append(perf_counter() - start - LAG_PROBE_INTERVAL_S)


async def _next_due(point: LoadPoint, gate: asyncio.Semaphore | None, start: float, offset: float,
                    index: int) -> float | None:
    """When request `index` is due, after waiting for that moment; None once the point's bounds are hit."""
    if point.num_prompts is not None and index >= point.num_prompts:
        return None
    if gate is not None and point.closed_loop:
        await gate.acquire()
        due = perf_counter()
        if point.duration_s is not None and due - start > point.duration_s:
            gate.release()
            return None
        return due
    if point.duration_s is not None and offset > point.duration_s:
        return None
    due = start + offset
    await asyncio.sleep(max(0.0, due - perf_counter()))
    return due


@dataclass
class _Issuer:
    client: BackendClient
    gate: asyncio.Semaphore | None
    holds_slot: bool          # the closed loop took the slot before the request was due
    timeout: float
    bar: tqdm

    async def __call__(self, spec: RequestSpec, record: RequestRecord) -> None:
        try:
            if self.gate is None or self.holds_slot:
                await self._issue(spec, record)
            else:
                async with self.gate:
                    await self._issue(spec, record)
        finally:
            if self.gate is not None and self.holds_slot:
                self.gate.release()
            self.bar.update(1)

    async def _issue(self, spec: RequestSpec, record: RequestRecord) -> None:
        """One request, always accounted for: a timeout or an unexpected client error is its outcome."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.request(spec, record)
        except TimeoutError:
            record.finish(perf_counter(), "timeout")
        except Exception as exc:  # any failure is a result to report, not a reason to stop the run
            record.finish(perf_counter(), f"client_error:{type(exc).__name__}")
        else:
            record.finish(perf_counter(), "unfinished")
