"""`streampage bench throughput` end to end on the CPU: a tiny checkpoint, a fixed workload, the table
and the JSON; and streampage's figures are out before a comparison starts (HF's takes minutes on a
GPU, and a run cut short there must still report what it measured)."""

from __future__ import annotations

import json

import pytest

from streampage import cli
from streampage.bench import hf_baselines
from tests.checkpoints import make_checkpoint

ARGS = ["bench", "throughput", "--workload", "fixed", "--num-prompts", "3", "--input-len", "12",
        "--output-len", "5", "--temperature", "0", "--max-model-len", "64"]


def test_fixed_workload_reports_every_token_and_writes_json(tmp_path, capsys) -> None:
    model = make_checkpoint(tmp_path, "llama")
    output = tmp_path / "throughput.json"
    assert cli.main([*ARGS, "--model", str(model), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "workload fixed" in printed and "3 prompts, 15 output tokens" in printed
    result = json.loads(output.read_text())["results"][0]
    assert result["system"] == "streampage" and result["output_tokens"] == 15
    assert result["output_tok_s"] == pytest.approx(15 / result["seconds"])
    assert result["preemptions"] == 0 and result["steps"] >= 5


def test_streampage_figures_are_saved_before_the_hf_comparison_runs(tmp_path, capsys, monkeypatch) -> None:
    model = make_checkpoint(tmp_path, "llama")
    output = tmp_path / "throughput.json"

    def hf_cut_short(*args, **kwargs):
        saved = json.loads(output.read_text())["results"]
        assert [r["system"] for r in saved] == ["streampage"]
        assert "streampage " in capsys.readouterr().out  # its row is already printed
        raise KeyboardInterrupt  # the call's time limit, in effect

    monkeypatch.setattr(hf_baselines, "hf_continuous_batching", hf_cut_short)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*ARGS, "--model", str(model), "--output", str(output), "--compare", "hf"])
    assert json.loads(output.read_text())["results"][0]["output_tokens"] == 15
