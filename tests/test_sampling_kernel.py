"""The one-pass sampling kernel (`streampage.kernels.sample_tokens`) and the sampler's fused path.

Without CUDA the kernel runs on CPU tensors through the Triton interpreter (tests/conftest.py) on tiny
shapes, with tiles smaller than the vocabulary (which is not a multiple of the tile) and with the
vocabulary split over several programs, so the tile loop and the merge both run. The interpreter costs
about 10 ms per program and tile, which bounds the number of draws a distribution test can afford.
The GPU tests compare the fused path against the PyTorch reference at the real shape and replay the
kernel from a CUDA graph.
"""

from __future__ import annotations

import os

import pytest
import torch

from streampage import kernels
from streampage.model.sampler import SamplingMetadata, fusable, sample, sample_fused, sample_on_device
from streampage.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

ROWS, VOCAB = 5, 1000
TILE = {"lanes": 16}  # 64-column tiles: 16 of them over 1000 columns, the last one partial
SPLITS = [1, 3]  # 3 splits of 6, 6 and 4 tiles: the merge kernel runs
DTYPES = [torch.float32, torch.bfloat16]


def logits_with_ties(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows with hand-made ties at the max (in one tile, across tiles, across splits), masked
    tokens, and a row where everything is -inf (torch.argmax gives column 0 there)."""
    x = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, [70, 71, 900]] = 20.0  # the same tile, then a later split
    x[1, [999, 400, 3]] = 20.0  # the lowest tie sits in the first tile
    x[2, :500] = float("-inf")  # a banned-looking prefix: the max is in the second half
    x[3] = float("-inf")
    x[4, [64, 128]] = 20.0  # tile boundaries
    return x.to(device=DEVICE, dtype=dtype)


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)


def flat(per_row: list[list[float]]) -> list[float]:
    return [value for row in per_row for value in row]


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor([seed], dtype=torch.int64, device=DEVICE)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the all -inf row
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_is_torch_argmax_with_its_raw_logprob(dtype: torch.dtype, splits: int) -> None:
    logits = logits_with_ties(dtype)
    tokens, logprobs = kernels.sample_tokens(logits, None, None, num_splits=splits, **TILE)
    expected = logits.float().argmax(dim=-1)
    assert tokens.dtype == torch.int64
    assert tokens.tolist() == expected.tolist() == [70, 3, expected[2].item(), 0, 64]
    finite = torch.tensor([True, True, True, False, True])
    torch.testing.assert_close(logprobs[finite], raw_logprobs(logits, tokens)[finite], rtol=0, atol=1e-5)
    assert logprobs[3].isnan()  # -inf - logsumexp(-inf), as the PyTorch path gives


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the all -inf row
def test_greedy_rows_of_a_sampling_launch_ignore_the_noise() -> None:
    logits = logits_with_ties(torch.float32)
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.7], device=DEVICE)
    tokens, logprobs = kernels.sample_tokens(logits, temperature, seed_tensor(3), num_splits=3, **TILE)
    greedy = [0, 2, 3]
    assert tokens[greedy].tolist() == logits.argmax(dim=-1)[greedy].tolist()
    # The sampled rows' tied maxima at 20 hold nearly all the mass even at T = 1.
    assert tokens[1].item() in {999, 400, 3} and tokens[4].item() in {64, 128}
    rows = [0, 1, 2, 4]
    torch.testing.assert_close(logprobs[rows], raw_logprobs(logits, tokens)[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_logprobs_are_raw_log_softmax(dtype: torch.dtype) -> None:
    logits = (torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(1)) * 2).to(DEVICE, dtype)
    temperature = torch.tensor([0.6, 1.0, 2.0, 0.3, 5.0], device=DEVICE)
    tokens, logprobs = kernels.sample_tokens(logits, temperature, seed_tensor(4), num_splits=2, **TILE)
    torch.testing.assert_close(logprobs, raw_logprobs(logits, tokens), rtol=0, atol=1e-5)


@pytest.mark.slow  # 600 interpreted programs: about 9 s on the CPU
def test_temperature_draws_follow_softmax_of_scaled_logits() -> None:
    """300 draws per temperature (one per row; rows get independent noise) against softmax(x / T) by
    Pearson's chi-square. Seeded, so deterministic; 18.47 is the 0.999 quantile with 4 degrees of
    freedom, so a correct kernel fails only for one seed in a thousand, while a draw at the wrong
    temperature (or from softmax(x)) scores in the hundreds."""
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    draws = 300
    temperatures = [0.5, 1.5]
    logits = probs.log().expand(draws * len(temperatures), -1).contiguous().to(DEVICE)
    temperature = torch.tensor(temperatures, device=DEVICE).repeat_interleave(draws)
    tokens, _ = kernels.sample_tokens(logits, temperature, seed_tensor(2024), lanes=2)
    for i, t in enumerate(temperatures):
        counts = torch.bincount(tokens[i * draws : (i + 1) * draws].cpu(), minlength=5).double()
        expected = draws * (probs.log() / t).softmax(dim=-1).double()
        chi_square = ((counts - expected) ** 2 / expected).sum().item()
        assert chi_square < 18.47, (t, counts.tolist(), expected.tolist())


def test_draws_depend_on_the_seed_not_on_splits() -> None:
    logits = torch.zeros(ROWS, VOCAB, device=DEVICE)  # uniform: the noise alone picks the token
    temperature = torch.ones(ROWS, device=DEVICE)
    draw = kernels.sample_tokens(logits, temperature, seed_tensor(11), num_splits=1, **TILE)[0]
    assert kernels.sample_tokens(logits, temperature, seed_tensor(11), num_splits=3, **TILE)[0].tolist() == (
        draw.tolist()
    )
    other = kernels.sample_tokens(logits, temperature, seed_tensor(12), num_splits=1, **TILE)[0]
    assert other.tolist() != draw.tolist()
    assert len(set(draw.tolist())) > 1  # rows draw independently


def test_rows_must_be_contiguous_and_sampling_needs_a_seed() -> None:
    logits = torch.zeros(4, 10, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.sample_tokens(logits.t(), None, None)
    with pytest.raises(ValueError, match="seed"):
        kernels.sample_tokens(logits, torch.ones(4, device=DEVICE), None)


# --- the sampler's fused path ---------------------------------------------------------------------

def build(params: list[SamplingParams], **kwargs) -> SamplingMetadata:
    return SamplingMetadata.build(params, device=DEVICE, **kwargs)


GREEDY, HOT = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)


@pytest.mark.parametrize(
    ("params", "kwargs"),
    [
        ([GREEDY, HOT], {}),
        ([GREEDY, SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)], {}),  # greedy ignores them
        ([SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0)], {}),
    ],
)
def test_fusable_covers_greedy_and_temperature_only_batches(params, kwargs) -> None:
    assert fusable(build(params, **kwargs))


@pytest.mark.parametrize(
    ("params", "kwargs"),
    [
        ([], {}),
        ([GREEDY, SamplingParams(temperature=0.8, top_k=5)], {}),
        ([HOT, SamplingParams(top_p=0.9)], {}),
        ([SamplingParams(min_p=0.1)], {}),
        ([SamplingParams(presence_penalty=0.5)], {"prompt_token_ids": [[1]], "output_token_ids": [[2]]}),
        ([HOT], {"banned_token_ids": [[3]]}),
        ([HOT], {"generators": {0: torch.Generator(device=DEVICE).manual_seed(1)}}),
        ([HOT, GREEDY], {"num_samples": [2, 1]}),
        ([SamplingParams(temperature=0.0, logprobs=2)], {}),
        ([SamplingParams(beam_width=2)], {}),  # asks for top log-probabilities
    ],
    ids=["empty", "top-k", "top-p", "min-p", "penalty", "banned", "seeded", "n", "logprobs", "beam"],
)
def test_everything_else_keeps_the_pytorch_path(params, kwargs) -> None:
    assert not fusable(build(params, **kwargs))


def test_fused_greedy_matches_the_pytorch_path() -> None:
    logits = logits_with_ties(torch.float32)[[0, 1, 2, 4]]
    meta = build([GREEDY] * 4)
    fused = sample_fused(logits, meta).to_host()
    reference = sample(logits.cpu(), SamplingMetadata.build([GREEDY] * 4, device="cpu"))
    assert fused.token_ids == reference.token_ids
    assert flat(fused.logprobs) == pytest.approx(flat(reference.logprobs), abs=1e-5)
    assert fused.top_logprobs == [None] * 4


def test_fused_mixed_batch_reads_each_rows_temperature_and_draws_anew_each_step() -> None:
    # The metadata's temperature is a strided column of its parameter table; a kernel reading it as
    # contiguous would take other rows' (or other columns') values.
    logits = torch.zeros(5, 200, device=DEVICE)
    logits[[1, 3], 17] = 1.0  # greedy rows: a clear argmax; sampled rows: uniform, so 0 if read as greedy
    meta = build([HOT, GREEDY, HOT, GREEDY, HOT])
    assert meta.temperature.stride(0) > 1
    steps = [sample_fused(logits, meta).to_host() for _ in range(2)]
    for step in steps:
        assert step.token_ids[1] == step.token_ids[3] == [17]
    sampled = [[step.token_ids[r][0] for r in (0, 2, 4)] for step in steps]
    assert sampled[0] != sampled[1] and sampled[0] != [0, 0, 0]  # a fresh device seed per step
    raw = logits.log_softmax(dim=-1).cpu()
    for step in steps:
        assert flat(step.logprobs) == pytest.approx([raw[r, t].item() for r, [t] in enumerate(step.token_ids)],
                                                    abs=1e-5)


# --- GPU: the real shape ---------------------------------------------------------------------------

QWEN3_VOCAB = 151936


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 256])
def test_gpu_fused_path_matches_the_reference_at_qwen3_shape(rows: int, dtype: torch.dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(rows)
    logits = (4 * torch.randn(rows, QWEN3_VOCAB, device="cuda", generator=generator)).to(dtype)
    logits[0, [5, 150000]] = 40.0  # a tie across the vocabulary: the lower column wins
    meta = SamplingMetadata.build([GREEDY] * rows, device="cuda")
    fused = sample_on_device(logits, meta).to_host()
    reference = sample_on_device(logits, meta, fused=False).to_host()
    assert fused.token_ids == reference.token_ids and fused.token_ids[0] == [5]
    assert flat(fused.logprobs) == pytest.approx(flat(reference.logprobs), abs=1e-4)
    params = [HOT if r % 4 else GREEDY for r in range(rows)]  # mixed, row 0 greedy
    mixed = sample_on_device(logits, SamplingMetadata.build(params, device="cuda")).to_host()
    assert mixed.token_ids[::4] == fused.token_ids[::4]
    raw = logits.float().log_softmax(dim=-1).cpu()
    expected = [raw[r, t].item() for r, [t] in enumerate(mixed.token_ids)]
    assert flat(mixed.logprobs) == pytest.approx(expected, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_draws_follow_softmax_over_the_full_vocabulary() -> None:
    """8192 draws of one Qwen3-sized row with its mass on a few tokens and a long tail, fused against
    softmax(x / T) by total variation over the top tokens and the tail lumped together."""
    draws, temperature = 8192, 0.6
    row = torch.randn(QWEN3_VOCAB, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    row[:8] += torch.linspace(6.0, 3.0, 8, device="cuda")
    logits = row.expand(draws, -1).contiguous()
    tokens = sample_on_device(logits, SamplingMetadata.build([SamplingParams(temperature=temperature)] * draws,
                                                             device="cuda")).tokens
    probs = (row / temperature).softmax(dim=-1)
    frequencies = torch.bincount(tokens, minlength=QWEN3_VOCAB).double() / draws

    def lumped(p: torch.Tensor) -> torch.Tensor:
        return torch.cat([p[:8], p[8:].sum().unsqueeze(0)])

    assert 0.5 * (lumped(frequencies) - lumped(probs.double())).abs().sum().item() < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_replays_in_a_cuda_graph_with_the_seed_it_reads() -> None:
    logits = torch.zeros(64, QWEN3_VOCAB, device="cuda")
    temperature = torch.ones(64, device="cuda")
    seed = seed_tensor(1)
    kernels.sample_tokens(logits, temperature, seed)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, _ = kernels.sample_tokens(logits, temperature, seed)
    draws = {}
    for value in (1, 2, 1):
        seed.fill_(value)
        graph.replay()
        draws.setdefault(value, []).append(tokens.tolist())
    assert draws[1][0] == draws[1][1] != draws[2][0]
    assert draws[1][0] == kernels.sample_tokens(logits, temperature, seed_tensor(1))[0].tolist()
