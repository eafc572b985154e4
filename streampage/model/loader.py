"""Hugging Face checkpoint directory -> the decoder in eval mode, plus the shape the runner sizes the KV
pool by and the engine takes its limits from.

Weights stream tensor by tensor from the safetensors files into each parameter's `weight_loader`, which
keeps only this rank's shard: peak memory is the model plus one checkpoint tensor. `random_weights=True`
feeds generated tensors through the same path, so benchmarks get full-size models without checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from streampage.model.llama import DecoderSpec, LlamaForCausalLM, checkpoint_tensor_shapes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A model directory cannot be loaded; the message names the file, tensor or field at fault."""


@dataclass(frozen=True)
class ModelShape:
    """What the runner and engine need to know about the loaded model (head counts are this rank's)."""

    architecture: str
    num_layers: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank: the pool's third-from-last dimension
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # from config.json and generation_config.json
    # Set only when attention is windowed and the window is shorter than max_position_embeddings: the
    # attention path attends to the whole context, which is exact only up to the window.
    sliding_window: int | None
    dtype: torch.dtype
    weight_bytes: int  # parameters on this rank (tied weights counted once)

    @property
    def max_model_len(self) -> int:
        """The longest context this model computes exactly."""
        return min(self.max_position_embeddings, self.sliding_window or self.max_position_embeddings)


@dataclass(frozen=True)
class LoadedModel:
    model: LlamaForCausalLM
    shape: ModelShape
    spec: DecoderSpec


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    *,
    random_weights: bool | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LoadedModel:
    """Build the model of `model_dir/config.json` on `device` and fill it from the directory's
    safetensors, or (random_weights) from a seeded generator, deterministic per seed and device type.
    random_weights=None takes random weights exactly when config.json says `streampage_random_weights`
    (the benchmark shapes of `streampage demo-model --shape`).

    dtype: a torch dtype or "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "float16",
    "bfloat16". Raises CheckpointError naming what is missing or unsupported.
    """
    model_dir, device = Path(model_dir), torch.device(device)
    config = load_config(model_dir)
    spec = decoder_spec(config, model_dir)
    if random_weights is None:
        random_weights = bool(getattr(config, "streampage_random_weights", False))
    files = [] if random_weights else checkpoint_files(model_dir)
    dtype = resolve_dtype(dtype, device)
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(spec)
    if random_weights:
        tensors = random_checkpoint_tensors(spec, seed=seed, dtype=dtype, device=device)
    else:
        tensors = read_checkpoint_tensors(files)
    load_weights(model, tensors, progress=progress)
    model.eval()
    return LoadedModel(model, model_shape(model, config, model_dir, dtype), spec)


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's (fast) tokenizer, with its chat template if it has one."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{model_dir} has no tokenizer: expected one of {', '.join(TOKENIZER_FILES)}")
    return AutoTokenizer.from_pretrained(model_dir)


def load_config(model_dir: Path) -> PretrainedConfig:
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(
            f"{model_dir} has no config.json; a checkpoint directory holds config.json, *.safetensors "
            "and a tokenizer (tokenizer.json)"
        )
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as exc:  # an unknown model_type
        raise CheckpointError(f"{model_dir / 'config.json'} cannot be read by transformers: {exc}") from exc


def decoder_spec(config: PretrainedConfig, model_dir: Path) -> DecoderSpec:
    try:
        return DecoderSpec.from_hf_config(config)
    except ValueError as exc:
        raise CheckpointError(f"{model_dir / 'config.json'}: {exc}") from exc


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created directly in the model dtype (no float32 copy of a large model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by model.safetensors.index.json if there is
    one (sharded checkpoints), else every *.safetensors in the directory."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in names if not (model_dir / name).is_file()]
        if missing:
            raise CheckpointError(f"{index.name} in {model_dir} names missing shard files: {', '.join(missing)}")
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors weights in {model_dir} (only safetensors checkpoints are supported; a "
            "directory of configuration only loads with random_weights=True)"
        )
    return files


def read_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor, one at a time (safetensors memory-maps the files)."""
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as checkpoint:
            for name in checkpoint.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, checkpoint.get_tensor(name)


def random_checkpoint_tensors(
    spec: DecoderSpec, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """A seeded stand-in for a checkpoint of `spec`: norms 1, biases 0, every matrix N(0, std) with the
    config's initializer_range, which keeps bf16 activations finite at real model sizes."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, shape in checkpoint_tensor_shapes(spec).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, dtype=dtype, device=device)
        else:
            values = torch.empty(shape, dtype=torch.float32, device=device)
            yield name, values.normal_(0.0, spec.initializer_range, generator=generator).to(dtype)


def load_weights(model: LlamaForCausalLM, tensors: Iterable[tuple[str, torch.Tensor]], progress: bool) -> None:
    """Hand each checkpoint tensor to the weight_loader of the parameter it belongs to; every tensor the
    spec implies must arrive, with the shape it implies."""
    expected = checkpoint_tensor_shapes(model.spec)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    bar = tqdm(tensors, total=len(expected), desc="loading weights", unit="tensor", disable=not progress)
    for name, tensor in bar:
        if name not in expected:
            if _ignorable(name, model.spec):
                continue
            raise CheckpointError(f"checkpoint tensor {name!r} has no place in a {model.spec.architecture}")
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; config.json implies {expected[name]}"
            )
        param, shard_id = _parameter_of(model, params, name)
        param.weight_loader(param, tensor, shard_id)  # type: ignore[attr-defined]
        loaded.add(name)
    missing = sorted(expected.keys() - loaded)
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors: {', '.join(missing[:5])}")


def _ignorable(name: str, spec: DecoderSpec) -> bool:
    """Tensors some checkpoints carry that the model derives: rope tables and a tied LM head."""
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and spec.tie_word_embeddings)


def _parameter_of(
    model: LlamaForCausalLM, params: dict[str, torch.nn.Parameter], name: str
) -> tuple[torch.nn.Parameter, Any]:
    """The parameter a checkpoint tensor loads into and the shard id, for the merged projections."""
    module_path, _, leaf = name.rpartition(".")
    parent, _, module = module_path.rpartition(".")
    if module in model.packed_modules:
        merged, shard_id = model.packed_modules[module]
        return params[f"{parent}.{merged}.{leaf}"], shard_id
    return params[name], None


def model_shape(model: LlamaForCausalLM, config: PretrainedConfig, model_dir: Path, dtype: torch.dtype) -> ModelShape:
    spec, attention = model.spec, model.attention_layers()[0]
    window = spec.sliding_window
    return ModelShape(
        architecture=spec.architecture,
        num_layers=spec.num_layers,
        num_heads=attention.num_heads,
        num_kv_heads=attention.num_kv_heads,
        head_dim=spec.head_dim,
        hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_ids=eos_token_ids(config, model_dir),
        sliding_window=window if window is not None and window < spec.max_position_embeddings else None,
        dtype=dtype,
        weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )


def eos_token_ids(config: PretrainedConfig, model_dir: Path) -> tuple[int, ...]:
    """End-of-sequence ids of config.json and generation_config.json (instruct models often list their
    end-of-turn token only in the latter), in order, without repeats."""
    ids = _id_list(getattr(config, "eos_token_id", None))
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        ids += _id_list(json.loads(generation_config.read_text()).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def _id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
