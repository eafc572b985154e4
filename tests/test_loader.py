"""Loading checkpoints: sharded files, what the shape reports, random weights, and the errors a user
sees for a directory that cannot be loaded."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import make_checkpoint
from safetensors.torch import load_file, save_file
from transformers import GPT2Config

from streampage.model.loader import CheckpointError, load_model, load_tokenizer


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = parameters(a), parameters(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(left[name], right[name], rtol=0, atol=0, msg=name)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    sharded = make_checkpoint(tmp_path, "qwen3", max_shard_size="40KB")
    single = make_checkpoint(tmp_path, "qwen3")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert_same_parameters(load_model(sharded, progress=False).model, load_model(single, progress=False).model)


def test_shape_reports_what_the_runner_needs(tmp_path):
    shape = load_model(make_checkpoint(tmp_path, "llama32"), "float32", "cpu", progress=False).shape
    assert (shape.architecture, shape.num_layers, shape.num_heads, shape.num_kv_heads) == ("LlamaForCausalLM", 2, 4, 2)
    assert (shape.head_dim, shape.hidden_size, shape.vocab_size) == (16, 64, 397)
    assert (shape.max_position_embeddings, shape.max_model_len, shape.sliding_window) == (256, 256, None)
    assert shape.bos_token_id == 0
    assert shape.eos_token_ids == (1, 3)  # </s> from config.json, then <|im_end|> from generation_config.json
    assert shape.dtype == torch.float32
    # tied embeddings count once: embedding + 2 layers + final norm
    layer = 64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 88 + 2 * 64
    assert shape.weight_bytes == 4 * (397 * 64 + 2 * layer + 64)


def test_a_sliding_window_shorter_than_the_context_caps_max_model_len(tmp_path):
    shape = load_model(make_checkpoint(tmp_path, "mistral"), progress=False).shape
    assert (shape.sliding_window, shape.max_position_embeddings, shape.max_model_len) == (128, 256, 128)


def test_a_window_longer_than_the_context_is_not_reported(tmp_path):
    shape = load_model(make_checkpoint(tmp_path, "mistral", sliding_window=4096), progress=False).shape
    assert (shape.sliding_window, shape.max_model_len) == (None, 256)


def test_dtype_auto_is_float32_on_cpu_and_explicit_dtypes_apply(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    assert load_model(path, progress=False).model.lm_head.weight.dtype == torch.float32
    loaded = load_model(path, "bfloat16", progress=False)
    assert loaded.shape.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.model.rotary.cos_sin.dtype == torch.float32  # rope tables stay exact


def test_random_weights_are_deterministic_per_seed_and_need_no_weight_files(tmp_path):
    path = make_checkpoint(tmp_path, "qwen2")
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    first = load_model(path, random_weights=True, seed=3, progress=False).model
    assert_same_parameters(first, load_model(path, random_weights=True, seed=3, progress=False).model)
    other = load_model(path, random_weights=True, seed=4, progress=False).model
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)
    assert torch.equal(first.model.norm.weight, torch.ones(64))


def test_config_marked_for_random_weights_loads_without_weight_files(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "streampage_random_weights": True}))
    assert load_model(path, progress=False).shape.num_layers == 2


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no config.json"):
        load_model(tmp_path)


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, "
                                              r"MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_model(tmp_path)


def test_unsupported_rope_type(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="rope type 'dynamic' is not supported"):
        load_model(path)


def test_missing_weights(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights in .*random_weights=True"):
        load_model(path)


def test_missing_shard_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"names missing shard files: {shard.name}"):
        load_model(path)


def test_missing_tensor_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensors: model.layers.1.mlp.up_proj.weight"):
        load_model(path, progress=False)


def test_tensor_that_contradicts_the_config_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 90}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(.*88.*\); "
                                              r"config\.json implies \(.*90.*\)"):
        load_model(path, progress=False)


def test_unknown_tensor_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.extra\.weight' has no place"):
        load_model(path, progress=False)


def test_tokenizer_loads_with_its_chat_template(tmp_path):
    tokenizer = load_tokenizer(make_checkpoint(tmp_path, "qwen2"))
    assert tokenizer.is_fast
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt.startswith("<s><|im_start|>user\nhi<|im_end|>")


def test_missing_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"has no tokenizer: expected one of tokenizer\.json"):
        load_tokenizer(tmp_path)
