"""The load generator against a real `streampage serve` on the demo model (CPU): every request is
accounted for, the summary agrees with the per-request records, and the JSON and PNGs are written.
(The metric formulas themselves are checked on hand-computed cases in test_loadtest_metrics.py.)"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from server_harness import start_serve

from loadtest import main as loadtest_main

pytestmark = pytest.mark.slow


def loadtest_args(port: int, out: Path, plots: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadtest_main.add_arguments(parser)
    return parser.parse_args([
        "--port", str(port), "--num-prompts", "12", "--input-len", "24", "--output-len", "6",
        "--vocab-limit", "1000", "--seed", "3", "--no-progress", "--output", str(out), "--plot-dir", str(plots),
        *extra,
    ])


async def test_a_short_load_against_the_demo_model_is_fully_accounted_for(tmp_path: Path) -> None:
    process, port = await start_serve(tmp_path)
    try:
        out, plots = tmp_path / "results.json", tmp_path / "plots"
        args = loadtest_args(port, out, plots, "--max-concurrency", "1,4", "--connections", "2")
        assert await asyncio.to_thread(loadtest_main.run, args) == 0
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 60)
    results = json.loads(out.read_text())
    assert len(results["runs"]) == 2  # one per concurrency of the sweep
    for run in results["runs"]:
        summary, records = run["summary"], run["records"]
        assert summary["completed"] == 12 and summary["failed"] == 0 and summary["failures"] == {}
        assert summary["total_output"] == 12 * 6 and summary["total_input"] == 12 * 24
        assert len(records) == 12
        # The summary comes from the records' own times (seconds since the load point began): TTFT from
        # when a request was due to its first chunk, E2EL to its last.
        assert all(sum(r["chunk_tokens"]) == r["output_tokens"] == 6 for r in records)
        ttfts = [(r["chunk_times"][0] - r["scheduled_at"]) * 1e3 for r in records]
        e2els = [(r["chunk_times"][-1] - r["scheduled_at"]) * 1e3 for r in records]
        assert summary["mean_ttft_ms"] == pytest.approx(sum(ttfts) / len(ttfts), rel=1e-6)
        assert summary["mean_e2el_ms"] == pytest.approx(sum(e2els) / len(e2els), rel=1e-6)
        assert summary["output_throughput"] == pytest.approx(summary["total_output"] / summary["duration_s"])
    assert sorted(p.suffix for p in plots.iterdir()) and all(p.suffix == ".png" for p in plots.iterdir())
