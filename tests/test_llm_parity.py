"""End-to-end parity with transformers: greedy decoding and beam search, token for token.

Tiny random checkpoints of every supported family, loaded through streampage's own loader, run through
the real paged path (K/V written by slot mapping, read back through block tables) in fp32 on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from checkpoints import FAMILIES, load_reference_model, make_checkpoint

from streampage import LLM, SamplingParams

PROMPTS = [
    [5, 17, 99, 3, 250, 41, 8],
    [300, 12],
    list(range(20, 61)),  # spans several blocks of every size
    [7] * 19,
]
MAX_NEW = 12


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_checkpoint(request, tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param)
    return request.param, path, load_reference_model(path)


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         num_beams=1, pad_token_id=model.generation_config.eos_token_id[0])
    return out[0, len(prompt):].tolist()


def hf_trim(tokens: list[int], eos: set[int]) -> list[int]:
    """HF keeps the EOS that ended a sequence and pads after it; streampage stops at it too."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_greedy_matches_transformers_on_ragged_batches(family_checkpoint, block_size):
    family, path, reference = family_checkpoint
    eos = set(reference.generation_config.eos_token_id)
    expected = [hf_trim(hf_greedy(reference, p, MAX_NEW), eos) for p in PROMPTS]
    llm = LLM(str(path), block_size=block_size, dtype="float32", num_gpu_blocks=64)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == expected, f"{family} block_size={block_size}"
    single = llm.generate([PROMPTS[2]], SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)
    assert single[0].outputs[0].token_ids == expected[2]
    assert llm.engine.kv.num_free_blocks == 64


def test_chunked_prefill_and_mixed_batches_match_transformers(family_checkpoint):
    """A 16-token budget splits every long prompt into chunks and mixes them with other rows' decodes."""
    family, path, reference = family_checkpoint
    eos = set(reference.generation_config.eos_token_id)
    expected = [hf_trim(hf_greedy(reference, p, MAX_NEW), eos) for p in PROMPTS]
    llm = LLM(str(path), block_size=8, dtype="float32", num_gpu_blocks=64, max_num_batched_tokens=16,
              max_num_seqs=4)
    outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_NEW, temperature=0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected, family


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def beam_checkpoint(request, tmp_path_factory):
    """Beam search is family-independent above the model; two families keep the test short."""
    path = make_checkpoint(tmp_path_factory.mktemp("beam"), request.param)
    return path, load_reference_model(path)


@pytest.mark.parametrize(("beam_width", "n", "length_penalty", "early_stopping"),
                         [(2, 1, 1.0, False), (4, 2, 0.6, False), (3, 3, 1.5, True)])
def test_beam_search_matches_transformers(beam_checkpoint, beam_width, n, length_penalty, early_stopping):
    path, reference = beam_checkpoint
    prompt = PROMPTS[0]
    ids = torch.tensor([prompt])
    hf = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                            num_beams=beam_width, num_return_sequences=n, length_penalty=length_penalty,
                            early_stopping=early_stopping, return_dict_in_generate=True, output_scores=True,
                            pad_token_id=reference.generation_config.eos_token_id[0])
    lengths = (hf.beam_indices != -1).sum(dim=1).tolist()
    expected = [hf.sequences[i, len(prompt): len(prompt) + lengths[i]].tolist() for i in range(n)]
    llm = LLM(str(path), dtype="float32", num_gpu_blocks=64, block_size=8)
    params = SamplingParams(max_tokens=MAX_NEW, beam_width=beam_width, n=n, length_penalty=length_penalty,
                            early_stopping=early_stopping, temperature=0)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in got] == expected
    assert llm.engine.kv.num_free_blocks == 64


def test_beam_search_matches_transformers_when_beams_end_early(tmp_path):
    """A checkpoint whose EOS logit rides on another token's: hypotheses finish at different lengths,
    which exercises the finished-beam bookkeeping and the early-stop heuristic."""
    path = make_checkpoint(tmp_path, "llama", seed=3)
    reference = load_reference_model(path)
    eos = reference.generation_config.eos_token_id[0]
    with torch.no_grad():
        head = reference.lm_head.weight
        head[eos] = head[PROMPTS[1][0]] * 1.02
    reference.save_pretrained(path)
    prompt = PROMPTS[1]
    ids = torch.tensor([prompt])
    hf = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                            num_beams=4, num_return_sequences=4, return_dict_in_generate=True, output_scores=True,
                            pad_token_id=eos)
    lengths = (hf.beam_indices != -1).sum(dim=1).tolist()
    assert len(set(lengths)) > 1, "the checkpoint should end beams at different lengths"
    expected = [hf.sequences[i, len(prompt): len(prompt) + lengths[i]].tolist() for i in range(4)]
    llm = LLM(str(path), dtype="float32", num_gpu_blocks=64, block_size=8)
    params = SamplingParams(max_tokens=16, beam_width=4, n=4, temperature=0)
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    assert [c.token_ids for c in got] == expected
