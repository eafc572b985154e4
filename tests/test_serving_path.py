"""The serving-path bench's simulated device, and the server's lock-free token-gap histogram."""

from __future__ import annotations

import time

from streampage.bench.serving_path import PacedExecutor, simulated_engine
from streampage.bench.workloads import resolve_model
from streampage.config import EngineConfig
from streampage.sampling_params import SamplingParams


def test_paced_engine_runs_steps_at_the_rate_and_counts_late_launches() -> None:
    engine, _ = simulated_engine(EngineConfig.create(model=resolve_model("demo")), step_rate=200.0)
    executor = engine.executor
    assert isinstance(executor, PacedExecutor)
    for i in range(4):
        engine.add_request(f"r{i}", [5, 6, 7], SamplingParams(max_tokens=10, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.perf_counter() - start
    assert engine.generation_tokens_total == 40
    assert elapsed >= executor.steps / 200.0 * 0.95
    assert executor.late_s < 0.5 * executor.busy_s  # the core kept the device busy
