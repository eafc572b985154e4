"""Write a real safetensors checkpoint of a benchmark shape, with the same seeded random weights the
loader generates for it, so another server (HF `transformers serve`) can load exactly what streampage
serves. Usage: python3 scripts/hf_checkpoint.py SHAPE OUT_DIR
"""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from streampage.bench.workloads import resolve_model
from streampage.model.demo import DEMO_SEED
from streampage.model.loader import decoder_spec, load_config, random_checkpoint_tensors


def main() -> None:
    source, target = Path(resolve_model(sys.argv[1])), Path(sys.argv[2])
    shutil.copytree(source, target, dirs_exist_ok=True)
    config = json.loads((target / "config.json").read_text())
    config.pop("streampage_random_weights", None)
    config["torch_dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config, indent=2))
    spec = decoder_spec(load_config(source), source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = {name: tensor.cpu() for name, tensor in
               random_checkpoint_tensors(spec, seed=DEMO_SEED, dtype=torch.bfloat16, device=device)}
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {target} ({sum(t.numel() for t in weights.values()) / 1e9:.2f} B parameters)")


if __name__ == "__main__":
    main()
