"""The built-in demo checkpoint: a small Llama with random weights and its own tokenizer, so a fresh
machine can serve without downloading anything. Its text is noise.

`write_demo_model(path, shape)` writes a complete Hugging Face checkpoint directory. The "demo" shape is
a few MB of float32 weights. The benchmark shapes carry the real configuration of a known model (its
real vocabulary size) with the demo tokenizer and no weights: config.json marks them with
`streampage_random_weights`, and the loader fills them from a seeded generator on the device.
Everything written is a pure function of the shape: two writes give identical bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from streampage.model.loader import decoder_spec, load_config, random_checkpoint_tensors

DEMO_SEED = 0
DEMO_VOCAB_SIZE = 1024
BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)

# ChatML turns after a BOS; the generation prompt opens the assistant's turn, which ends with <|im_end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

# config.json fields per shape. The benchmark shapes are the published configurations of those models.
SHAPES: dict[str, dict[str, Any]] = {
    "demo": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32",
        # wider than the usual 0.02 so the next-token distribution is peaked and greedy choices are
        # far from ties (parity tests against transformers compare greedy tokens)
        "initializer_range": 0.1,
    },
    "llama3-8b": {  # Llama 3.1 8B
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02,
    },
    "llama3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": {**_LLAMA31_ROPE, "factor": 32.0},
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "initializer_range": 0.02,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": False, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 28, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "initializer_range": 0.02,
    },
}

# The tokenizer's training text, written for this project.
CORPUS = (
    "A small model with random weights cannot write, but it can keep a server busy. It reads the "
    "prompt, fills its cache block by block, and answers with tokens that look like words from far "
    "away. The point is not the answer. The point is that every part of the system moves: requests "
    "arrive, wait, run, stream and finish, and the memory they held returns to the pool.",
    "Think of the cache as a library with shelves of equal size. A sequence asks for a shelf when the "
    "last one is full, and gives all of them back when it is done. Two readers of the same opening "
    "chapter can share its shelves until one of them writes in the margin; then that reader gets a "
    "copy of the page and the other keeps the original.",
    "The river was low in August. Children walked across the stones where the water used to be too "
    "deep, and the old boatman sat in the shade counting the days until the rain. In the evening the "
    "swallows came down to drink, and the town smelled of bread, dust and cut grass.",
    "To make soup for four people, warm a spoon of oil in a heavy pot, add one onion and two carrots "
    "cut small, and let them soften for ten minutes. Pour in a litre of water or stock, a handful of "
    "lentils and a pinch of salt. Simmer for thirty minutes, taste, and serve it with lemon.",
    "Weather report: cloudy in the north with light rain after noon; sunny intervals in the south, "
    "highs of 24 degrees; winds from the west at 15 to 20 km/h. Tomorrow, showers moving east, then "
    "clearing by the evening. The weekend looks dry and warm, 26 to 28 degrees.",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i, add(i, i * 2))\n\n"
    "if __name__ == \"__main__\":\n    values = [3, 1, 4, 1, 5, 9, 2, 6]\n    print(sorted(values))\n",
    "Questions people ask: What time is it? Where is the station? How much does this cost? Could you "
    "help me, please? Thank you very much. You are welcome. Good morning, good evening, good night. "
    "Yes, no, maybe, of course, not yet, see you later, have a nice day!",
    "Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 100 1000; 3.14, 2.71, 1.41; 12 March 2024, 1 January "
    "2025; 09:30, 14:45, 23:59. Prices: $5, 12 euros, 300 yen. Percentages: 5%, 50%, 99.9%.",
    "A few words from elsewhere: café, naïve, façade, jalapeño, Straße, Ærø, smörgåsbord, Łódź, "
    "résumé, coöperate, déjà vu, crème brûlée, São Paulo, Zürich, Kraków, Ελλάδα, Россия, 日本, 한국.",
    "The engine runs in steps. Each step it picks which sequences go next, gives them memory, runs the "
    "model once over all their new tokens, samples one token for each, and sends the text to the "
    "people waiting for it. When memory runs out, the newest sequence steps aside and comes back later.",
    "In the garden there were apple trees, a pear tree, rows of beans and tomatoes, and a bench under "
    "the walnut tree where the cat slept through the afternoon. The gardener wrote the names of the "
    "plants on small wooden labels, and every spring the rain washed half of the letters away.",
    "Good software is read more often than it is written. Short functions with clear names, errors "
    "that say what went wrong and how to fix it, tests that check what a user would notice, and "
    "comments that explain why, not what. Measure before you optimise, then measure again.",
    "The train left at seven. Through the window: fields, a village with a white church, a lake, then "
    "the long tunnel under the mountain. A man in a grey coat read the newspaper, a student slept on "
    "her backpack, and a small boy counted the cows until he lost track somewhere after forty.",
    "Letters of the alphabet: A B C D E F G H I J K L M N O P Q R S T U V W X Y Z; a b c d e f g h i "
    "j k l m n o p q r s t u v w x y z. Symbols: ( ) [ ] { } < > + - * / = _ # @ & | ~ ^ ' \" ` ; : , .",
)


def build_tokenizer(vocab_size: int = DEMO_VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE trained on CORPUS (deterministic): any UTF-8 text round-trips; encoding adds <s>.
    The corpus has merges for a vocabulary of up to about 1250 tokens; beyond that training stops early."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def write_tokenizer(path: Path, tokenizer: Tokenizer, model_max_length: int) -> None:
    """tokenizer.json plus the transformers side (special tokens, chat template) in files that
    transformers 4.x and 5.x both read."""
    tokenizer.save(str(path / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [IM_START, IM_END]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
    }
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", specials)


def default_demo_path() -> Path:
    """$STREAMPAGE_DEMO_MODEL_DIR, else streampage/demo-model under the user's cache directory."""
    override = os.environ.get("STREAMPAGE_DEMO_MODEL_DIR")
    if override:
        return Path(override).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "streampage" / "demo-model"


def ensure_demo_model(path: str | Path | None = None) -> Path:
    """The demo checkpoint at `path` (default: default_demo_path()), written on first use."""
    path = Path(path) if path is not None else default_demo_path()
    if not _is_complete(path, "demo"):
        write_demo_model(path)
    return path


def write_demo_model(path: str | Path, shape: str = "demo") -> Path:
    """Write the checkpoint directory of `shape` (a key of SHAPES) at `path`, which must not exist or be
    empty. Files are staged beside it and moved in with one rename, so a reader never sees half a
    checkpoint and concurrent writers of the same path agree."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists and is not empty; remove it or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging_root:
        staging = Path(staging_root) / "checkpoint"
        staging.mkdir()
        _write_checkpoint(staging, shape)
        try:
            staging.rename(path)
        except OSError:
            if not _is_complete(path, shape):  # lost a race only if the winner left a whole checkpoint
                raise
    return path


def _write_checkpoint(path: Path, shape: str) -> None:
    tokenizer = build_tokenizer()
    config = {
        "hidden_act": "silu", "attention_bias": False, "vocab_size": tokenizer.get_vocab_size(),
        **SHAPES[shape],
        "bos_token_id": tokenizer.token_to_id(BOS), "eos_token_id": tokenizer.token_to_id(EOS),
    }
    if shape != "demo":
        config["streampage_random_weights"] = True
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": [config["eos_token_id"], tokenizer.token_to_id(IM_END)],
    })
    write_tokenizer(path, tokenizer, config["max_position_embeddings"])
    if shape == "demo":
        spec = decoder_spec(load_config(path), path)
        weights = dict(random_checkpoint_tensors(spec, seed=DEMO_SEED))
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def _is_complete(path: Path, shape: str) -> bool:
    required = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    if shape == "demo":
        required.append("model.safetensors")
    return all((path / name).is_file() for name in required)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=None,
                        help=f"directory to create (default: {default_demo_path()})")
    parser.add_argument("--shape", choices=list(SHAPES), default="demo",
                        help="demo: the small built-in model; the others: that model's real configuration "
                             "with random weights, for benchmarks")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path) if args.path else default_demo_path()
    if args.shape == "demo" and _is_complete(path, "demo"):
        print(f"The demo model is already at {path}.")
        return 0
    try:
        write_demo_model(path, args.shape)
    except FileExistsError as exc:
        print(f"error: {exc}")
        return 1
    if args.shape == "demo":
        print(f"Wrote the streampage demo model to {path}.")
    else:
        print(f"Wrote the {args.shape} configuration to {path}, without weights: streampage fills it with "
              "seeded random weights when it loads. For benchmarks.")
    print("Its weights are random, so its text is noise: it shows the server working, not a language model.")
    return 0
