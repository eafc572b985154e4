"""WebSocket scenarios: what clients that misbehave do to everyone else's latency.

Each scenario measures the same seeded workload at the same load point twice, a baseline and a
disturbed run, and compares the measured (well-behaved) clients' latency percentiles:
  multiplex        baseline: one socket per request; disturbed: every request multiplexed over
                   `--connections` sockets (1 if 0). No extra clients: the socket layout is the change.
  slow-readers     `--disturbers` extra clients, each on its own socket with a tiny receive buffer, stop
                   reading for `--slow-pause` seconds after `--disturb-after` tokens of each request.
  cancel-storm     extra clients send `response.cancel` after `--disturb-after` tokens, then start over.
  reconnect-churn  extra clients drop their socket (no close handshake) after `--disturb-after` tokens,
                   reconnect and start over.
Disturbers loop until the measured run ends; their records are kept (role `disturber`) and their
outcomes counted, but they never enter the measured summary.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Any

from loadtest.backends import BackendConfig
from loadtest.driver import LoadPoint, PointResult, open_client, run_point
from loadtest.metrics import LATENCY_METRICS, percentile_key
from loadtest.records import DISTURBER, RequestRecord
from loadtest.websocket_backend import Stream, StreamConnection, connect_error, create_payload
from loadtest.workloads import RequestSpec, WorkloadConfig, generate

SCENARIOS = ("multiplex", "slow-readers", "cancel-storm", "reconnect-churn")
RECONNECT_BACKOFF_S = 0.1   # between failed connection attempts of a disturber, so it cannot spin


@dataclass(frozen=True)
class ScenarioConfig:
    name: str
    disturbers: int = 8
    disturb_after: int = 4      # tokens a disturber reads before it misbehaves
    slow_pause_s: float = 2.0

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.name!r}")
        if self.disturbers < 0 or self.disturb_after < 1 or self.slow_pause_s < 0:
            raise ValueError("disturbers must be >= 0, disturb_after >= 1 and slow_pause >= 0, got "
                             f"{self.disturbers}, {self.disturb_after}, {self.slow_pause_s}")


@dataclass
class ScenarioResult:
    config: ScenarioConfig
    baseline: PointResult
    disturbed: PointResult


async def run_scenario(scenario: ScenarioConfig, backend: BackendConfig, point: LoadPoint,
                       workload: WorkloadConfig, *, request_timeout: float = 600.0,
                       progress: bool = True) -> ScenarioResult:
    """Baseline then disturbed run of the same measured workload."""
    baseline_backend, disturbed_backend = backend, backend
    if scenario.name == "multiplex":
        baseline_backend = replace(backend, connections=0)
        disturbed_backend = replace(backend, connections=max(1, backend.connections))
    runs = []
    # The disturbed run sends the baseline's lengths with new tokens (point 1), so a prefix cache does
    # not serve it what the baseline computed.
    for run_index, (run_backend, disturb) in enumerate(((baseline_backend, False), (disturbed_backend, True))):
        async with (
            open_client(run_backend) as client,
            _disturbers(scenario if disturb else None, backend, workload, request_timeout) as extra,
        ):
            result = await run_point(client, point, generate(workload, point=run_index), seed=workload.seed,
                                     request_timeout=request_timeout, progress=progress)
        result.records.extend(extra)
        runs.append(result)
    return ScenarioResult(scenario, *runs)


def compare(baseline: dict[str, Any], disturbed: dict[str, Any],
            percentiles: Sequence[float]) -> dict[str, dict[str, float | None]]:
    """Each latency statistic of the measured clients: baseline, disturbed, and disturbed / baseline."""
    stats = ["mean", "median", *(percentile_key(p) for p in percentiles)]
    table = {}
    for key in (f"{stat}_{metric}_ms" for metric in LATENCY_METRICS for stat in stats):
        before, after = baseline.get(key), disturbed.get(key)
        ratio = after / before if before and after is not None else None
        table[key] = {"baseline": before, "disturbed": after, "ratio": ratio}
    return table


Behaviour = Callable[[StreamConnection, Stream], Awaitable[None]]


def _behaviour(scenario: ScenarioConfig) -> Behaviour | None:
    """What a disturber does once it has read `disturb_after` tokens (None: the scenario has none)."""
    if scenario.name == "slow-readers":
        return lambda connection, stream: connection.stall(scenario.slow_pause_s)
    if scenario.name == "cancel-storm":
        return lambda connection, stream: connection.cancel(stream.record.request_id)
    if scenario.name == "reconnect-churn":
        return _drop_socket
    return None


@asynccontextmanager
async def _disturbers(scenario: ScenarioConfig | None, backend: BackendConfig, workload: WorkloadConfig,
                      request_timeout: float) -> AsyncIterator[list[RequestRecord]]:
    """Run the scenario's disturbing clients for as long as the block runs; yields their records."""
    records: list[RequestRecord] = []
    behaviour = _behaviour(scenario) if scenario else None
    tasks = []
    if scenario is not None and behaviour is not None:
        for index in range(scenario.disturbers):
            # A seed offset per disturber: their prompts differ from the measured ones and each other.
            specs = generate(workload, seed_offset=1 + index)
            loop = _disturb(scenario, backend, index, specs, records, behaviour, request_timeout)
            tasks.append(asyncio.create_task(loop))
    try:
        yield records
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _disturb(scenario: ScenarioConfig, backend: BackendConfig, index: int, specs: Iterator[RequestSpec],
                   records: list[RequestRecord], behaviour: Behaviour, request_timeout: float) -> None:
    """One disturbing client: request, read a few tokens, misbehave, repeat until cancelled."""
    connection: StreamConnection | None = None
    record: RequestRecord | None = None
    try:
        for cycle in itertools.count():
            spec = next(specs)
            # Long enough that the misbehaviour always lands mid-stream.
            max_tokens = max(spec.max_tokens, 2 * scenario.disturb_after)
            record = RequestRecord(f"d{index}-{cycle}", len(spec.prompt_token_ids), max_tokens,
                                   perf_counter(), role=DISTURBER)
            records.append(record)
            if connection is None or connection.closed:
                connection = await _reconnect(scenario, backend, record)
                if connection is None:
                    continue
            payload = create_payload(replace(spec, max_tokens=max_tokens), record.request_id, backend)
            await _one_disturbance(connection, Stream(record, scenario.disturb_after), payload, behaviour,
                                   request_timeout)
    finally:
        if record is not None:
            # Cut short by the end of the measured run, not by the server.
            record.finish(perf_counter(), "run_ended")
        if connection is not None and not connection.closed:
            connection.abort()


async def _reconnect(scenario: ScenarioConfig, backend: BackendConfig,
                     record: RequestRecord) -> StreamConnection | None:
    try:
        return await StreamConnection.open(backend, slow_reader=scenario.name == "slow-readers")
    except Exception as exc:  # a refused disturber is an outcome to count, not a crash
        record.finish(perf_counter(), connect_error(exc))
        await asyncio.sleep(RECONNECT_BACKOFF_S)
        return None


async def _one_disturbance(connection: StreamConnection, stream: Stream, payload: dict[str, Any],
                           behaviour: Behaviour, request_timeout: float) -> None:
    request_id = payload["request_id"]
    try:
        async with asyncio.timeout(request_timeout):
            await connection.submit(payload, stream)
            await stream.reached.wait()
            if not stream.finished.is_set():
                await behaviour(connection, stream)
            await stream.finished.wait()
    except TimeoutError:
        connection.forget(request_id)
        stream.end(perf_counter(), "timeout")


async def _drop_socket(connection: StreamConnection, stream: Stream) -> None:
    stream.end(perf_counter(), "client_abort")
    connection.abort()
    await connection.reader
