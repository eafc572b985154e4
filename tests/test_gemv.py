"""`skinny_linear` (kernels/gemv.py) against torch's x @ W^T + b.

Without CUDA the kernel runs on CPU tensors through the Triton interpreter (tests/conftest.py), on tiny
shapes in fp32 and fp16 (the interpreter's bf16 tl.dot is wrong); with CUDA the same cases run on the
GPU. The GPU-only tests take the real bf16 projection shapes of Llama-3.2-1B and Llama-3-8B, every
sweep candidate, and replay split-K calls from a CUDA graph (the arrival counters must come back to
zero every call).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import triton

from streampage import kernels
from streampage.config import ConfigError, EngineConfig, gemv_projections
from streampage.kernels import GemvConfig, gemv_candidates, pdl, skinny_linear
from streampage.kernels.arrival_counters import all_zero
from streampage.kernels.gemv import balanced_split
from streampage.model import layers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (tests/conftest.py sets it)", allow_module_level=True)

# (rtol, atol) against the fp32 product: fp32 differs by summation order; 16-bit outputs are rounded
# once (half a unit in the last place, up to |y| ~ 16 here).
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-2), torch.bfloat16: (1.6e-2, 1e-1)}
DTYPES = [torch.float32, torch.float16]
# Small tiles, so the tiny shapes have several N tiles, several K tiles and a ragged last one of each.
CONFIGS = {
    "fma": GemvConfig(16, 32, 1, 4, 3),
    "fma-split3": GemvConfig(16, 32, 3, 4, 3),
    "mma": GemvConfig(16, 32, 1, 4, 2, dot=True),
    "mma-split2": GemvConfig(32, 16, 2, 4, 3, dot=True),
}


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ weight.double().T
    return (y if bias is None else y + bias.double()).float()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol)


def make(m: int, n: int, k: int, dtype: torch.dtype, bias: bool) -> tuple[torch.Tensor, ...]:
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    weight = torch.randn(n, k, device=DEVICE).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    return x, weight, b


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(16, 32), (48, 96), (100, 200)])
def test_matches_torch(dtype: torch.dtype, config: GemvConfig, m: int, n: int, k: int) -> None:
    x, weight, bias = make(m, n, k, dtype, bias=(n + m) % 2 == 0)  # half the cases with a bias
    y = skinny_linear(x, weight, bias, config=config)
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close(y, reference(x, weight, bias), dtype)
    assert all_zero(), "a split-K call left an arrival counter set"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_strided_and_offset_rows(dtype: torch.dtype, config: GemvConfig) -> None:
    """Rows of a wider buffer starting past its first row and column (a graph's static buffer, a
    column slice), a transposed view, and a weight that is itself a row slice of a larger one."""
    buffer = torch.randn(12, 150, device=DEVICE).to(dtype)
    x = buffer[2:5, 7:103]  # [3, 96], row stride 150, element offset 307
    big = torch.randn(70, 96, device=DEVICE).to(dtype)
    weight = big[10:58]  # [48, 96] at an offset
    bias = torch.randn(100, device=DEVICE).to(dtype)[::2][:48]  # stride 2
    assert_close(skinny_linear(x, weight, bias, config=config), reference(x, weight, bias), dtype)
    xt = torch.randn(96, 5, device=DEVICE).to(dtype).T  # stride (1, 5): K is not the contiguous dim
    assert_close(skinny_linear(xt, weight, config=config), reference(xt, weight, None), dtype)


def test_split_larger_than_k_tiles() -> None:
    """More splits than K tiles: the empty ones are dropped (balanced_split), the result unchanged."""
    assert balanced_split(3, 10) == 3 and balanced_split(8, 3) == 3 and balanced_split(32, 5) == 5
    assert balanced_split(7, 0) == 1
    x, weight, bias = make(2, 40, 64, torch.float32, bias=True)
    y = skinny_linear(x, weight, bias, config=GemvConfig(16, 32, 10, 4, 2))
    assert_close(y, reference(x, weight, bias), torch.float32)
    assert all_zero()


def test_repeated_split_calls_reuse_counters() -> None:
    """Calls one after another share the per-device counters: each leaves them as it found them."""
    cfg = GemvConfig(16, 32, 4, 4, 3)
    for m, n in ((1, 100), (8, 20), (3, 100)):
        x, weight, bias = make(m, n, 200, torch.float32, bias=m == 3)
        assert_close(skinny_linear(x, weight, bias, config=cfg), reference(x, weight, bias), torch.float32)
    assert all_zero()


@pytest.mark.parametrize("m", [1, 2, 8])
def test_default_config(m: int) -> None:
    x, weight, bias = make(m, 100, 200, torch.float16, bias=True)
    assert_close(skinny_linear(x, weight, bias), reference(x, weight, bias), torch.float16)


def test_default_heuristic() -> None:
    """The H200 sweep's winning shape: 64 x 128 bf16 tiles, MMAs; K split until the N tiles give each
    of 132 SMs about two programs, never below two K tiles a split."""
    down_1b = GemvConfig.default(1, 2048, 8192)  # 32 N tiles, 64 K tiles
    assert (down_1b.block_n, down_1b.block_k, down_1b.split_k, down_1b.dot) == (64, 128, 8, True)
    assert GemvConfig.default(1, 16384, 2048).split_k == 1  # 1B gate_up: 256 N tiles
    assert GemvConfig.default(1, 4096, 14336).split_k == 4  # 8B down: 64 N tiles
    assert GemvConfig.default(1, 6144, 4096).split_k == 3  # 8B qkv: 96 N tiles
    assert GemvConfig.default(1, 64, 256).split_k == 1  # two K tiles
    assert GemvConfig.default(1, 2048, 8192, itemsize=4).block_k == 64


def test_candidates() -> None:
    found = gemv_candidates(1, 2048, 8192)
    assert found[0] == GemvConfig.default(1, 2048, 8192)
    assert len(found) == len(set(found))
    assert {c.dot for c in found} == {False, True} and any(c.split_k > 1 for c in found)
    assert all(c.split_k == balanced_split(-(-8192 // c.block_k), c.split_k) for c in found)


def test_rejects_bad_shapes() -> None:
    x, weight, _ = make(2, 16, 32, torch.float32, bias=False)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        skinny_linear(torch.randn(9, 32, device=DEVICE), weight)
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        skinny_linear(x[:, :16], weight)
    with pytest.raises(ValueError, match="float16"):
        skinny_linear(x.half(), weight)
    with pytest.raises(ValueError, match="bias"):
        skinny_linear(x, weight, torch.zeros(15, device=DEVICE))


def test_exported() -> None:
    assert kernels.skinny_linear is skinny_linear and kernels.GemvConfig is GemvConfig


# --- CUDA only: real shapes ---------------------------------------------------------------------

# (name, N, K) of Llama-3.2-1B and Llama-3-8B's projections, as the bench times them.
MODEL_SHAPES = [
    ("1b-qkv", 3072, 2048), ("1b-o", 2048, 2048), ("1b-gate_up", 16384, 2048), ("1b-down", 2048, 8192),
    ("8b-qkv", 6144, 4096), ("8b-o", 4096, 4096), ("8b-gate_up", 28672, 4096), ("8b-down", 4096, 14336),
]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}


def _scaled(m: int, n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs whose products are O(1) at any K, so one tolerance per dtype serves every shape."""
    x = torch.randn(m, k, device="cuda").to(dtype)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    return x, weight, torch.randn(n, device="cuda").to(dtype)


def assert_gpu_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = GPU_TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("name", "n", "k"), MODEL_SHAPES, ids=[s[0] for s in MODEL_SHAPES])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("dot", [False, True], ids=["fma", "mma"])
def test_gpu_model_shapes(name: str, n: int, k: int, m: int, dtype: torch.dtype, dot: bool) -> None:
    x, weight, bias = _scaled(m, n, k, dtype)
    cfg = dataclasses.replace(GemvConfig.default(m, n, k, _sms(), dtype.itemsize), dot=dot)
    assert_gpu_close(skinny_linear(x, weight, bias, config=cfg), reference(x, weight, bias), dtype, f"{name} {cfg}")
    assert_gpu_close(skinny_linear(x, weight, config=cfg), reference(x, weight, None), dtype, f"{name} no bias")
    assert all_zero()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_sweep_candidates(m: int) -> None:
    """Every config the bench sweeps gives the right answer at the 1B down projection (the bench also
    checks each before timing it; a config that cannot compile on this device is skipped there too)."""
    _, n, k = MODEL_SHAPES[3]
    x, weight, bias = _scaled(m, n, k, torch.bfloat16)
    expected = reference(x, weight, bias)
    for cfg in gemv_candidates(m, n, k, _sms()):
        try:
            actual = skinny_linear(x, weight, bias, config=cfg)
        except triton.runtime.errors.OutOfResources:
            continue
        assert_gpu_close(actual, expected, torch.bfloat16, f"1b-down M={m} {cfg}")
    assert all_zero()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dot", [False, True], ids=["fma", "mma"])
def test_gpu_graph_replay(dot: bool) -> None:
    """Split-K calls of several shapes captured in one CUDA graph, replayed with new inputs: each
    replay is right (the counters come back to zero inside the graph, every call)."""
    shapes = [(1, 2048, 8192), (4, 2048, 2048), (8, 4096, 14336)]
    inputs = [_scaled(m, n, k, torch.bfloat16) for m, n, k in shapes]
    # Rows of a static buffer, as the runner's graphs pass them.
    buffers = [torch.zeros(8, k, device="cuda", dtype=torch.bfloat16) for _, _, k in shapes]
    configs = [dataclasses.replace(GemvConfig.default(m, n, k, _sms()), dot=dot) for m, n, k in shapes]
    assert all(c.split_k > 1 for c in configs)
    calls = [lambda i=i: skinny_linear(buffers[i][: shapes[i][0]], inputs[i][1], inputs[i][2], config=configs[i])
             for i in range(len(shapes))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:  # compile and allocate the counters before capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [call() for call in calls]
    for replay in range(3):
        for (m, _, _), buffer in zip(shapes, buffers, strict=True):
            buffer[:m].copy_(torch.randn(m, buffer.shape[1], device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        for i, (m, _, _) in enumerate(shapes):
            expected = reference(buffers[i][:m], inputs[i][1], inputs[i][2])
            assert_gpu_close(outputs[i], expected, torch.bfloat16, f"replay {replay} shape {shapes[i]}")
    assert all_zero()


@pytest.fixture
def decode_kernels():
    """Turns the process-wide decode kernel options off again after the test."""
    yield layers.configure_decode_kernels
    layers.configure_decode_kernels(programmatic_launch=False)


def test_decode_gemv_takes_the_named_projections_of_one_to_eight_16_bit_rows(decode_kernels, monkeypatch):
    """`layers.linear` sends decode-sized 16-bit inputs of the projections `decode_gemv` names to
    skinny_linear, and everything else (other projections, more rows, fp32) to F.linear."""
    rows_seen = []
    real = kernels.skinny_linear

    def spy(x, *args, **kwargs):
        rows_seen.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "skinny_linear", spy)
    monkeypatch.setattr(layers, "use_triton", lambda x: True)  # the CUDA path, through the interpreter
    decode_kernels(programmatic_launch=False, gemv_projections=gemv_projections("all"))
    _, weight, bias = make(1, 48, 40, torch.float16, bias=True)
    for rows in (1, 8, 9):
        x = torch.randn(rows, 40, device=DEVICE).to(torch.float16)
        assert_close(layers.linear(x, weight, bias, projection="qkv"), reference(x, weight, bias), torch.float16)
    x32, w32, b32 = make(2, 48, 40, torch.float32, bias=True)
    assert_close(layers.linear(x32, w32, b32, projection="qkv"), reference(x32, w32, b32), torch.float32)
    assert rows_seen == [1, 8]
    x = torch.randn(8, 40, device=DEVICE).to(torch.float16)
    for setting, taken in (("row-parallel", ["o", "down"]), ("qkv,o", ["qkv", "o"]), ("off", [])):
        decode_kernels(programmatic_launch=False, gemv_projections=gemv_projections(setting))
        for projection in ("qkv", "o", "gate_up", "down"):
            rows_seen.clear()
            assert_close(layers.linear(x, weight, bias, projection=projection), reference(x, weight, bias),
                         torch.float16)
            assert rows_seen == ([8] if projection in taken else []), (setting, projection)


def test_programmatic_launch_only_reaches_hopper_and_later(decode_kernels):
    decode_kernels(programmatic_launch=True)
    assert pdl.launch_options(torch.device("cpu")) == {}
    if torch.cuda.is_available():
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        assert pdl.launch_options(torch.device("cuda", torch.cuda.current_device())) == (
            {"PDL": True, "launch_pdl": True} if hopper else {})
    decode_kernels(programmatic_launch=False)
    assert pdl.launch_options(torch.device("cpu")) == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("split_k", [1, 4])
def test_gpu_programmatic_launch_chain_replays_from_a_cuda_graph(decode_kernels, split_k) -> None:
    """Four GEMVs in a row, each reading the one before (the layer's pattern), launched with PDL and
    replayed from a graph with new inputs: every one waits for its input (a missing wait would read
    the previous replay's values)."""
    decode_kernels(programmatic_launch=True)
    torch.manual_seed(split_k)
    weights = [(torch.randn(512, 512, device=DEVICE) / 512**0.5).to(torch.bfloat16) for _ in range(4)]
    config = GemvConfig(64, 128, split_k, 4, 4, dot=True)
    x = torch.zeros(2, 512, device=DEVICE, dtype=torch.bfloat16)

    def chain() -> torch.Tensor:
        y = x
        for weight in weights:
            y = skinny_linear(y, weight, config=config)
        return y

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for trial in range(3):
        x.copy_(torch.randn(2, 512, device=DEVICE))
        graph.replay()
        expected = x.float()
        for weight in weights:
            expected = (expected @ weight.float().T).to(torch.bfloat16).float()
        torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2, msg=f"replay {trial}")
    assert all_zero()


def test_decode_gemv_names_its_choices():
    assert EngineConfig.create(decode_gemv="row-parallel").runner.decode_gemv == "row-parallel"
    assert gemv_projections("row-parallel") == {"o", "down"}
    assert gemv_projections("qkv, o") == {"qkv", "o"}
    assert gemv_projections("off") == set()
    for bad in ("on", "qkv,up", ""):
        with pytest.raises(ConfigError, match="decode_gemv must be one of off, all, row-parallel or a comma "
                                              "list of qkv, o, gate_up, down, got"):
            EngineConfig.create(decode_gemv=bad)
