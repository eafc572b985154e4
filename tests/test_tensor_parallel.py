"""Tensor parallelism end to end on the CPU: this process is rank 0 (scheduler, KV cache manager,
sampler) and one spawned gloo rank replays each step from rank 0's control message. Two ranks give one
rank's greedy tokens for every model family (split and replicated KV heads, prefix-cache hits, chunked
and mixed steps, preemption by recompute and swap, beam search, copy-on-write); ranks started
torchrun-style join the same way; a rank that dies or hangs fails the engine within seconds and no
process is left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from checkpoints import FAMILIES, make_checkpoint

from streampage import LLM, SamplingParams
from streampage.config import EngineConfig
from streampage.distributed import Rendezvous, init_tensor_parallel, join_world, open_store, shutdown_tensor_parallel
from streampage.engine import llm_engine
from streampage.runner.block_table_mirror import BlockTableMirror, MirrorCopy
from streampage.runner.model_runner import CacheMoves
from streampage.runner.step_inputs import StepInputBuilder, StepInputs
from streampage.runner.tp_control import Kind, decode, encode
from streampage.runner.tp_executor import TensorParallelError, TensorParallelExecutor

# A 96-token budget chunks the long prompts and mixes chunks with decodes; those steps' control messages
# outgrow the frame sized by the step before (two broadcasts), decode steps fit one.
PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77, 12], [300, 12, 44], list(range(20, 61)), list(range(3, 123))]
# device "cpu": these tests are about gloo ranks on the CPU also on a GPU host; the GPU tests at the
# end of the file ask for "cuda".
ENGINE = {"device": "cpu", "dtype": "float32", "block_size": 8, "max_num_seqs": 8, "max_num_batched_tokens": 96}
GREEDY = SamplingParams(max_tokens=6, temperature=0)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Each rank on one thread (the spawned rank inherits OMP_NUM_THREADS): two ranks share two cores."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tp"), "llama")


def token_ids(outputs) -> list[list[int]]:
    return [choice.token_ids for output in outputs for choice in output.outputs]


def run(path: Path, tensor_parallel_size: int, **options) -> tuple[list[list[int]], list[int]]:
    """Greedy tokens of PROMPTS, then of a prompt that extends PROMPTS[2] (a prefix-cache hit); the
    cached-token count of that second request."""
    llm = LLM(str(path), tensor_parallel_size=tensor_parallel_size, num_gpu_blocks=64, **{**ENGINE, **options})
    try:
        first = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        second = llm.generate([[*PROMPTS[2], 9, 9]], GREEDY, use_tqdm=False)
        return token_ids(first) + token_ids(second), [o.num_cached_tokens for o in second]
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_two_ranks_give_the_single_rank_greedy_tokens_for_every_family(tmp_path):
    cases = [(family, {}) for family in sorted(FAMILIES)] + [("qwen2", {"num_key_value_heads": 1})]
    for family, overrides in cases:
        path = make_checkpoint(tmp_path, family, **overrides)
        expected, _ = run(path, 1)
        got, cached = run(path, 2)
        assert got == expected, (family, overrides)
        assert cached == [40], family  # five full blocks of PROMPTS[2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_under_a_small_pool_gives_the_roomy_single_rank_tokens(llama, mode):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    settings = {**ENGINE, "num_cpu_blocks": 64, "watermark": 0.0, "preemption_mode": mode}
    roomy = LLM(str(llama), num_gpu_blocks=128, **settings)
    expected = token_ids(roomy.generate(PROMPTS[:3], params, use_tqdm=False))
    tight = LLM(str(llama), num_gpu_blocks=12, tensor_parallel_size=2, **settings)
    try:
        assert token_ids(tight.generate(PROMPTS[:3], params, use_tqdm=False)) == expected
        assert tight.engine.scheduler.num_preemptions > 0
        assert tight.engine.kv.num_free_blocks == 12
    finally:
        tight.shutdown()


@pytest.mark.slow
def test_beam_search_and_parallel_samples_copy_shared_blocks_on_every_rank(llama):
    """Forked beams and choices share blocks; the first write to a shared partial block copies it on
    every rank (copy-on-write pairs in the control message)."""
    beams = SamplingParams(max_tokens=10, beam_width=3, n=2, temperature=0)
    samples = SamplingParams(max_tokens=10, n=3, seed=5, ignore_eos=True)
    single = LLM(str(llama), num_gpu_blocks=64, **ENGINE)
    expected = token_ids(single.generate([PROMPTS[0]], beams, use_tqdm=False))
    llm = LLM(str(llama), num_gpu_blocks=64, tensor_parallel_size=2, **ENGINE)
    try:
        assert token_ids(llm.generate([PROMPTS[0]], beams, use_tqdm=False)) == expected
        sampled = token_ids(llm.generate([PROMPTS[1]], samples, use_tqdm=False))
        assert [len(t) for t in sampled] == [10, 10, 10]
        assert llm.engine.kv.num_free_blocks == 64
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_ranks_launched_torchrun_style_join_rank_zero(llama, monkeypatch):
    """RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in the environment, as torchrun sets them: rank 0 hosts the
    store at the given port; rank 1 runs the same `streampage generate` command and becomes a worker."""
    expected, _ = run(llama, 1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    worker = subprocess.Popen([sys.executable, "-m", "streampage.cli", "generate", str(llama), "a prompt"],
                              env={**os.environ, **env, "RANK": "1", "LOCAL_RANK": "1"})
    try:
        for name, value in {**env, "RANK": "0", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(name, value)
        got, _ = run(llama, 2)
        assert got == expected
        assert worker.wait(timeout=30) == 0  # the shutdown message ends it cleanly
    finally:
        worker.kill()
        worker.wait()


def _start(path: Path, **options) -> tuple[LLM, subprocess.Popen]:
    llm = LLM(str(path), num_gpu_blocks=64, tensor_parallel_size=2, **{**ENGINE, **options})
    (rank1,) = llm.engine.executor.processes
    return llm, rank1


def _generate_until_it_fails(llm: LLM) -> None:
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        llm.generate(PROMPTS, params, use_tqdm=False)


@pytest.mark.slow
def test_a_killed_rank_fails_the_engine_within_seconds_and_leaves_no_process(llama):
    _fails_within_seconds_when_rank_one_is_killed(llama)


def _fails_within_seconds_when_rank_one_is_killed(llama: Path, **options) -> None:
    llm, rank1 = _start(llama, **options)
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(rank1.pid, signal.SIGKILL)

    timer = threading.Timer(0.5, kill)
    timer.start()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
        _generate_until_it_fails(llm)
    assert time.monotonic() - killed_at[0] < 5
    assert rank1.poll() == -signal.SIGKILL
    assert not dist.is_initialized()  # the groups are gone: this process can start another engine
    with pytest.raises(TensorParallelError, match="shut down"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.shutdown()  # idempotent


@pytest.mark.slow
def test_a_hung_rank_fails_the_engine_after_the_timeout_and_is_killed(llama):
    llm, rank1 = _start(llama, distributed_timeout_s=3.0)
    os.kill(rank1.pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(TensorParallelError, match="cannot continue"):
            _generate_until_it_fails(llm)
        assert time.monotonic() - start < 12  # a keepalive and then the step each wait out the timeout
        assert rank1.poll() == -signal.SIGKILL
    finally:
        if rank1.poll() is None:
            rank1.kill()
        llm.shutdown()


@pytest.mark.slow
def test_spawned_ranks_exit_when_rank_zero_dies(llama):
    script = (f"import os, time\nfrom streampage import LLM\n"
              f"llm = LLM({str(llama)!r}, tensor_parallel_size=2, num_gpu_blocks=64, dtype='float32', device='cpu')\n"
              "print(llm.engine.executor.processes[0].pid, flush=True)\ntime.sleep(600)\n")
    rank0 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        rank1 = int(rank0.stdout.readline())
    finally:
        rank0.kill()
        rank0.wait()
    deadline = time.monotonic() + 10
    while _running(rank1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(rank1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow; its exit is what counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_step_overdue_on_the_device_aborts_the_device_group_and_fails():
    """The monitor's CUDA watch, driven by hand without ranks: a step waiting on the device past the
    timeout has the device group aborted (so NCCL kernels return), and the step then raises."""
    executor = TensorParallelExecutor(EngineConfig.create(tensor_parallel_size=2, distributed_timeout_s=1.0,
                                                          device="cpu"))
    executor._busy_since = time.monotonic() - 2.0
    executor._watch_device()
    assert executor._device_aborted
    with pytest.raises(TensorParallelError, match="waited on the device past the timeout"):
        executor._watched(lambda: None)
    with pytest.raises(TensorParallelError, match="shut down"):
        executor.check_health()


def test_step_messages_round_trip():
    rng = np.random.default_rng(0)
    mirror = BlockTableMirror(9, rows=4)  # rank 0's, as if its last update had written three rows
    mirror.table[:] = rng.integers(0, 50, (4, 9))
    mirror.writes = [(0, 0, 9), (2, 0, 9), (3, 0, 9)]
    inputs = StepInputs(
        input_ids=np.array([5, -1, 7, 9, -1], dtype=np.int64), positions=rng.integers(0, 99, 5),
        slot_mapping=np.array([3, 17, -1, 40, 41], dtype=np.int64),
        block_tables=mirror.table[[2, 0, 3], :7], context_lens=np.array([4, 9, 2], dtype=np.int32),
        query_start_loc=np.array([0, 2, 3, 5], dtype=np.int32), sample_rows=[0, 2],
        is_decode=False, placeholders=np.array([1, 4]), placeholder_sources=np.array([0, 1]),
        table_rows=np.array([2, 0, 3]),
    )
    moves = CacheMoves([(1, 2), (3, 4)], [], [(5, 6)])
    copy = MirrorCopy(9, rows=2)  # grows to hold row 3, as rank 0's mirror did
    kind, got_moves, got = decode(encode(Kind.STEP, moves, inputs, mirror), copy)
    assert kind is Kind.STEP and got_moves == ([[1, 2], [3, 4]], [], [[5, 6]])
    for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens", "query_start_loc",
                 "placeholders"):
        np.testing.assert_array_equal(getattr(got, name), getattr(inputs, name))
        assert getattr(got, name).dtype == getattr(inputs, name).dtype, name
    assert (got.sample_rows, got.is_decode) == ([0, 2], False)
    assert decode(encode(Kind.STEP, CacheMoves([(8, 0)], [], []), None), copy) == (Kind.STEP, ([[8, 0]], [], []), None)
    assert decode(encode(Kind.SHUTDOWN), copy) == (Kind.SHUTDOWN, None, None)


def test_step_messages_carry_block_table_changes_only():
    """Steps built by rank 0's StepInputBuilder: the other ranks' copy rebuilds every step's block
    tables from the writes alone (new blocks, a copy-on-write rewrite, a finished sequence's row
    reused by a new one), and a step whose tables did not change sends no table entry."""
    builder = StepInputBuilder(block_size=4, max_blocks_per_seq=8)
    copy = MirrorCopy(builder.mirror.table.shape[1], rows=1)
    # Per step: (seq id, tokens so far, tokens computed before the step, table) per row, rewritten, dropped.
    steps = [
        ([(1, 6, 0, [10, 11]), (2, 3, 0, [20])], set(), []),  # prefill
        ([(1, 7, 6, [10, 11]), (2, 4, 3, [20])], set(), []),  # decode, no new block
        ([(1, 8, 7, [10, 11]), (2, 5, 4, [20, 21])], set(), []),  # seq 2 takes a block
        ([(1, 9, 8, [10, 11, 12]), (2, 6, 5, [20, 23])], {2}, []),  # seq 1 a block; copy-on-write in seq 2
        ([(1, 10, 9, [10, 11, 12])], set(), [2]),  # seq 2 finished
        ([(1, 11, 10, [10, 11, 12]), (3, 5, 0, [30, 31])], set(), []),  # seq 3 reuses seq 2's row
    ]
    written = []
    for rows, rewritten, dropped in steps:
        seqs = [SimpleNamespace(seq_id=i, token_ids=list(range(n)), num_computed_tokens=done)
                for i, n, done, _ in rows]
        new_tokens = [n - done for _, n, done, _ in rows]
        out = SimpleNamespace(seqs=seqs, block_tables=[t for *_, t in rows], rewritten_seq_ids=rewritten,
                              dropped_seq_ids=dropped, is_decode_only=all(k == 1 for k in new_tokens),
                              num_new_tokens=new_tokens, num_batched_tokens=sum(new_tokens))
        inputs = builder.build(out)
        _, _, got = decode(encode(Kind.STEP, CacheMoves([], [], []), inputs, builder.mirror), copy)
        np.testing.assert_array_equal(got.block_tables, inputs.block_tables)
        assert inputs.block_tables.shape[1] == 16  # padded so attention keeps one compiled variant
        written.append(sum(end - start for _, start, end in builder.mirror.writes))
    assert written == [3, 0, 1, 3, 0, 2]  # entries sent: seq 2's whole rewritten row, seq 3's new row




@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_device_group_of_one_carries_the_collectives():
    """The plumbing on one GPU: the world group, then an NCCL device group that all-reduces, gathers and
    broadcasts, and a clean tear-down."""
    join_world(open_store(Rendezvous(0, 1, "127.0.0.1", 0)), 0, 1)
    try:
        state = init_tensor_parallel(torch.device("cuda"), timedelta(seconds=60))
        x = torch.arange(4.0, device="cuda")
        dist.all_reduce(x, group=state.device_group)
        dist.broadcast(x, src=0, group=state.device_group)
        shards = [torch.empty_like(x)]
        dist.all_gather(shards, x, group=state.device_group)
        assert shards[0].tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        shutdown_tensor_parallel()
    assert not dist.is_initialized()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_engine_through_the_tensor_parallel_executor_matches_the_in_process_one(llama, monkeypatch):
    """TensorParallelExecutor at world size 1 (NCCL device group, the rank's runner capturing CUDA graphs,
    control messages and keepalives to nobody) gives the in-process engine's greedy tokens."""
    options = {**ENGINE, "device": "cuda", "dtype": "bfloat16", "num_gpu_blocks": 64}
    expected = token_ids(LLM(str(llama), **options).generate(PROMPTS, GREEDY, use_tqdm=False))
    monkeypatch.setattr(llm_engine, "Worker", TensorParallelExecutor)
    llm = LLM(str(llama), **options)
    try:
        assert isinstance(llm.engine.executor, TensorParallelExecutor)
        assert llm.engine.executor.runner.graphs is not None
        assert token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == expected
    finally:
        llm.shutdown()
    assert not dist.is_initialized()


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize(("family", "overrides"),
                         [("llama3", {}), ("qwen3", {}), ("qwen2", {"num_key_value_heads": 1})])
def test_two_gpus_give_the_one_gpu_greedy_tokens_in_fp32(tmp_path, family, overrides):
    """NCCL across two GPUs, each rank capturing decode graphs with the model's all-reduces and the LM
    head's gather inside: the tokens of one GPU, prefix-cache hit included (Llama-3 RoPE scaling, QK
    norms, and one KV head replicated on both ranks). The CPU tests above cover every family."""
    path = make_checkpoint(tmp_path, family, **overrides)
    expected, _ = run(path, 1, device="cuda")
    got, cached = run(path, 2, device="cuda")
    assert got == expected
    assert cached == [40]


@pytest.mark.gpu
@two_gpus
def test_two_gpus_in_bf16_give_the_same_tokens_from_graphs_and_eager(llama):
    options = {**ENGINE, "dtype": "bfloat16", "device": "cuda", "num_gpu_blocks": 64, "tensor_parallel_size": 2}
    results = []
    for eager in (True, False):
        llm = LLM(str(llama), enforce_eager=eager, **options)
        try:
            assert (llm.engine.executor.runner.graphs is None) == eager
            results.append(token_ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False)))
        finally:
            llm.shutdown()
    assert results[0] == results[1]


@pytest.mark.gpu
@two_gpus
def test_two_gpus_a_killed_rank_fails_the_engine_within_seconds(llama):
    """NCCL's tear-down is collective: with rank 1 killed mid-generation, rank 0 aborts its communicators
    instead of waiting for a dead peer, and the process can start another engine."""
    _fails_within_seconds_when_rank_one_is_killed(llama, device="cuda", dtype="bfloat16")


@pytest.mark.gpu
@two_gpus
def test_two_gpus_shut_down_cleanly_twice_in_one_process(llama):
    """The orderly path: every rank destroys its NCCL communicators together, the spawned rank exits by
    itself (exit code 0, not killed after the grace period), and a second engine starts in this process."""
    for _ in range(2):
        started = time.monotonic()
        llm, rank1 = _start(llama, device="cuda", dtype="bfloat16")
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        llm.shutdown()
        assert rank1.returncode == 0
        assert not dist.is_initialized()
        assert time.monotonic() - started < 60
