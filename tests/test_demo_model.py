"""The built-in demo checkpoint and the benchmark shapes of `streampage demo-model`."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from streampage.model import demo
from streampage.model.forward_context import AttentionMetadata, forward_context
from streampage.model.llama import checkpoint_tensor_shapes
from streampage.model.loader import CheckpointError, decoder_spec, load_config, load_model, load_tokenizer

TEXT = "The river was low in August, café 日本 🙂 <tag> 3.14\n\tend"


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return demo.write_demo_model(tmp_path_factory.mktemp("demo") / "model")


def test_demo_checkpoint_is_small_and_complete(demo_path):
    names = {path.name for path in demo_path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    assert sum(path.stat().st_size for path in demo_path.iterdir()) < 8_000_000


def test_demo_model_loads_and_runs(demo_path):
    loaded = load_model(demo_path, progress=False)
    assert loaded.shape.architecture == "LlamaForCausalLM"
    assert loaded.shape.vocab_size == len(load_tokenizer(demo_path))  # every id the model emits decodes
    model = loaded.model
    attention = model.attention_layers()[0]
    model.bind_kv_cache(torch.zeros(4, 2, 2, 16, attention.num_kv_heads, attention.head_dim))
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(5), block_tables=torch.tensor([[1, 0]], dtype=torch.int32),
        context_lens=torch.tensor([5], dtype=torch.int32), query_start_loc=torch.tensor([0, 5], dtype=torch.int32),
        is_decode=False,
    )
    with torch.no_grad(), forward_context(metadata):
        logits = model.compute_logits(model(torch.tensor([0, 5, 6, 7, 8]), torch.arange(5)))
    assert logits.shape == (5, loaded.shape.vocab_size) and torch.isfinite(logits).all()


def test_demo_weights_are_the_seeded_random_weights(demo_path):
    written = load_model(demo_path, progress=False).model
    generated = load_model(demo_path, random_weights=True, seed=demo.DEMO_SEED, progress=False).model
    for (name, a), (_, b) in zip(written.named_parameters(), generated.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tokenizer_round_trips_text(demo_path):
    tokenizer = load_tokenizer(demo_path)
    ids = tokenizer(TEXT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_chat_template_renders_chatml_and_ends_turns_with_an_eos_token(demo_path):
    tokenizer = load_tokenizer(demo_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert load_model(demo_path, progress=False).shape.eos_token_ids == (tokenizer.eos_token_id, im_end)


def test_writing_is_deterministic(demo_path, tmp_path):
    again = demo.write_demo_model(tmp_path / "again")
    for path in demo_path.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_writing_over_a_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        demo.write_demo_model(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_ensure_demo_model_writes_once_at_the_env_path(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMPAGE_DEMO_MODEL_DIR", str(tmp_path / "cache" / "demo"))
    path = demo.ensure_demo_model()
    assert path == tmp_path / "cache" / "demo" == demo.default_demo_path()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo.ensure_demo_model() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == ["demo"]  # no staging directory left behind


# Published parameter counts of the models the benchmark shapes copy.
PARAMETERS = {"llama3-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920}


@pytest.mark.parametrize("shape", list(PARAMETERS))
def test_benchmark_shapes_have_the_real_configuration_and_no_weights(tmp_path, shape):
    path = demo.write_demo_model(tmp_path / shape, shape)
    spec = decoder_spec(load_config(path), path)
    assert sum(math.prod(s) for s in checkpoint_tensor_shapes(spec).values()) == PARAMETERS[shape]
    assert not list(path.glob("*.safetensors"))
    assert json.loads((path / "config.json").read_text())["streampage_random_weights"] is True
    with pytest.raises(CheckpointError, match="random_weights=True"):
        load_model(path, random_weights=False)


def test_cli_writes_the_demo_and_says_its_text_is_noise(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    assert demo.run(parser.parse_args([str(tmp_path / "cli")])) == 0
    assert "noise" in capsys.readouterr().out
    assert demo.run(parser.parse_args([str(tmp_path / "cli")])) == 0
    assert "already" in capsys.readouterr().out
    assert demo.run(parser.parse_args([str(tmp_path / "cli"), "--shape", "qwen3-0.6b"])) == 1
