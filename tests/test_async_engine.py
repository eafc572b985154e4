"""AsyncEngine: the engine core in its own process, streamed through asyncio (demo model, CPU)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from streampage import LLM, SamplingParams
from streampage.config import EngineConfig
from streampage.engine.async_engine import AsyncEngine
from streampage.outputs import EngineDeadError, RequestRejected

OPTIONS = {"num_gpu_blocks": 256, "block_size": 16, "dtype": "float32"}


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, request_id: str) -> list:
    return [output async for output in engine.generate(prompt, params, request_id)]


async def wait_for_free_pool(engine: AsyncEngine, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.stats.kv_blocks_used or engine.stats.num_running or engine.stats.num_waiting:
        assert time.monotonic() < deadline, f"blocks still held: {engine.stats}"
        await asyncio.sleep(0.05)


async def test_streams_equal_offline_generation_and_free_every_block():
    engine = await AsyncEngine.start(EngineConfig.create(**OPTIONS))
    try:
        prompts = [engine.encode_prompt(prompt=text) for text in ("Hello there", "Paged attention", "Streams")]
        greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        streams = await asyncio.gather(*[collect(engine, p, greedy, f"r{i}") for i, p in enumerate(prompts)])
        for outputs in streams:
            first, last = outputs[0], outputs[-1]
            assert not first.outputs and not first.finished  # accepted, nothing generated yet
            assert last.finished and last.outputs[-1].finish_reason == "length"
            assert not any(o.finished for o in outputs[:-1])
        texts = ["".join(c.text for o in outputs for c in o.outputs) for outputs in streams]
        tokens = [[t for o in outputs for c in o.outputs for t in c.token_ids] for outputs in streams]
        await wait_for_free_pool(engine)
    finally:
        await engine.shutdown()
    offline = LLM(None, **OPTIONS).generate(prompts, greedy, use_tqdm=False)
    assert tokens == [o.outputs[0].token_ids for o in offline]
    assert texts == [o.outputs[0].text for o in offline]


async def test_abort_ends_the_stream_and_frees_its_blocks():
    engine = await AsyncEngine.start(EngineConfig.create(**OPTIONS))
    try:
        prompt = engine.encode_prompt(prompt="a long story " * 20)
        outputs = []
        async for output in engine.generate(prompt, SamplingParams(max_tokens=2000, ignore_eos=True), "long"):
            outputs.append(output)
            if len(outputs) == 4:
                assert engine.stats.kv_blocks_used > 0
                await engine.abort("long")
                await engine.abort("long")  # idempotent
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "abort"
        await wait_for_free_pool(engine)
    finally:
        await engine.shutdown()


async def test_requests_that_can_never_run_are_refused_before_acceptance():
    engine = await AsyncEngine.start(EngineConfig.create(**OPTIONS, max_model_len=64))
    try:
        with pytest.raises(RequestRejected) as err:
            await collect(engine, [5] * 64, SamplingParams(), "too-long")
        assert err.value.code == "prompt_too_long"
        with pytest.raises(RequestRejected) as err:
            engine.encode_prompt(prompt="x", messages=[{"role": "user", "content": "y"}])
        assert err.value.param == "prompt"
        chat = engine.encode_prompt(messages=[{"role": "user", "content": "hi"}])
        assert chat == engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        assert engine.stats.num_waiting == 0
    finally:
        await engine.shutdown()


async def test_a_dead_core_fails_live_streams_at_once():
    engine = await AsyncEngine.start(EngineConfig.create(**OPTIONS))
    prompt = engine.encode_prompt(prompt="doomed")
    stream = engine.generate(prompt, SamplingParams(max_tokens=1000, ignore_eos=True), "doomed")
    await stream.__anext__()
    os.kill(engine._process.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError):
        async for _ in stream:
            pass
    assert time.monotonic() - start < 5
    assert engine.errored
    assert isinstance(await asyncio.wait_for(engine.wait_until_dead(), 1), EngineDeadError)
    with pytest.raises(EngineDeadError):
        await collect(engine, prompt, SamplingParams(), "after")
    await engine.shutdown()


def test_step_deltas_cross_the_pipe_with_every_field():
    """encode_deltas flattens deltas into tuples field by field (default pickling of the slotted
    dataclasses costs several times more per step): every field of both classes must survive, so a
    field added to either fails here until the encoding carries it."""
    import dataclasses
    import pickle

    from streampage.engine.core_process import decode_deltas, encode_deltas
    from streampage.engine.llm_engine import RequestDelta, SeqDelta

    seq = SeqDelta(index=2, token_ids=[5, 6], logprobs=[{5: -0.1}], cumulative_logprob=-0.7, finish_reason="stop",
                   stop_reason="###")
    delta = RequestDelta(request_id="r1", seqs=[seq], finished=True, num_cached_tokens=16,
                         first_scheduled_time=1.5, first_token_time=2.5)
    set_fields = {f.name for f in dataclasses.fields(SeqDelta)} | {f.name for f in dataclasses.fields(RequestDelta)}
    assert set_fields == {"index", "token_ids", "logprobs", "cumulative_logprob", "finish_reason", "stop_reason",
                          "request_id", "seqs", "finished", "num_cached_tokens", "first_scheduled_time",
                          "first_token_time"}, "a delta field changed: carry it in encode_deltas/decode_deltas"
    assert decode_deltas(pickle.loads(pickle.dumps(encode_deltas([delta])))) == [delta]
