"""Engine features through `LLM` on a tiny checkpoint: memory pressure, prefix caching, sharing, seeds,
stop conditions, logprobs, validation - and every block back in the pool afterwards."""

from __future__ import annotations

import pytest
import torch
from checkpoints import load_reference_model, make_checkpoint

from streampage import LLM, SamplingParams
from streampage.engine.llm_engine import LLMEngine
from streampage.outputs import RequestRejected
from streampage.sampling_params import InvalidParameterError

PROMPTS = [[5, 17, 99, 3, 250, 41, 8, 77, 12], [300, 12, 44], list(range(20, 45)), [7] * 13, [101, 102] * 6]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3")


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), dtype="float32", block_size=8, num_gpu_blocks=128, num_cpu_blocks=64)


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def assert_pool_empty(engine: LLMEngine) -> None:
    assert not engine.has_unfinished_requests()
    assert engine.kv.num_free_blocks == engine.kv.num_total_blocks
    assert engine.kv.cpu.num_free == engine.kv.cpu.num_blocks
    engine.check_invariants()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_memory_pressure_gives_identical_outputs(checkpoint, mode):
    settings = {"dtype": "float32", "block_size": 8, "num_cpu_blocks": 64, "enable_prefix_caching": False,
                "watermark": 0.0, "preemption_mode": mode}
    roomy = LLM(str(checkpoint), num_gpu_blocks=128, **settings)
    relaxed = token_ids(roomy.generate(PROMPTS, greedy(24, ignore_eos=True), use_tqdm=False))
    assert roomy.engine.scheduler.num_preemptions == 0
    tight = LLM(str(checkpoint), num_gpu_blocks=14, **settings)
    pressured = token_ids(tight.generate(PROMPTS, greedy(24, ignore_eos=True), use_tqdm=False))
    assert tight.engine.scheduler.num_preemptions > 0
    assert pressured == relaxed
    assert_pool_empty(tight.engine)


def test_parallel_sampling_under_swap_pressure_finishes_and_frees(checkpoint):
    tight = LLM(str(checkpoint), dtype="float32", block_size=8, num_gpu_blocks=20, num_cpu_blocks=64,
                watermark=0.0)
    outputs = tight.generate(PROMPTS[:3], SamplingParams(max_tokens=20, n=3, seed=3, ignore_eos=True),
                             use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert all(len(o.outputs) == 3 and all(len(c.token_ids) == 20 for c in o.outputs) for o in outputs)
    assert_pool_empty(tight.engine)


def test_prefix_cache_hits_give_identical_outputs_and_report_cached_tokens(checkpoint):
    llm = LLM(str(checkpoint), dtype="float32", block_size=8, num_gpu_blocks=128)
    first = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    second = llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert token_ids(first) == token_ids(second)
    assert [o.num_cached_tokens for o in first] == [0] * len(PROMPTS)
    # Full blocks before the last prompt token are served from the cache.
    assert [o.num_cached_tokens for o in second] == [(len(p) - 1) // 8 * 8 for p in PROMPTS]
    assert_pool_empty(llm.engine)


def test_seeded_sampling_reproduces_across_runs_and_batches(llm):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    alone = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(max_tokens=12, temperature=0.8, seed=9), SamplingParams(max_tokens=5), params]
    batched = llm.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0]], others, use_tqdm=False)[2].outputs[0].token_ids
    assert alone == again == batched
    different = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=12, top_p=0.9, seed=99), use_tqdm=False)
    assert different[0].outputs[0].token_ids != alone


def test_parallel_sampling_shares_prompt_blocks(llm):
    engine = llm.engine
    engine.add_request("n4", list(range(10, 30)), SamplingParams(max_tokens=4, n=4, seed=0))
    engine.step()  # prefill and the first draw: four choices on one prompt
    group = engine.scheduler.groups["n4"]
    tables = [engine.kv.block_tables[s.seq_id] for s in group.seqs]
    assert len(tables) == 4 and all(t == tables[0] for t in tables)
    assert all(engine.kv.gpu.ref_counts[b] == 4 for b in tables[0])
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_empty(engine)


def test_stop_strings_are_cut_from_the_text(llm):
    full = llm.generate([PROMPTS[0]], greedy(20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = full.text[6:9]
    assert stop and full.text.index(stop) >= 1
    cut = llm.generate([PROMPTS[0]], greedy(20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.text == full.text[: full.text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = llm.generate([PROMPTS[0]], greedy(20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]
    assert_pool_empty(llm.engine)


def test_stop_token_ids_and_min_tokens(llm):
    full = llm.generate([PROMPTS[1]], greedy(16, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    stop_token = full[3]
    first = full.index(stop_token)
    stopped = llm.generate([PROMPTS[1]], greedy(16, ignore_eos=True, stop_token_ids=[stop_token]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.token_ids == full[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_token)
    late = llm.generate([PROMPTS[1]], greedy(16, ignore_eos=True, stop_token_ids=[stop_token], min_tokens=first + 2),
                        use_tqdm=False)[0].outputs[0]
    assert stop_token not in late.token_ids[: first + 2]  # banned until min_tokens outputs exist
    assert len(late.token_ids) >= first + 2


def test_logprobs_are_the_models_raw_log_probabilities(checkpoint, llm):
    out = llm.generate([PROMPTS[0]], greedy(5, logprobs=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    reference = load_reference_model(checkpoint)
    ids = torch.tensor([PROMPTS[0] + out.token_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(ids).logits[0].float(), dim=-1)
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = logprobs[len(PROMPTS[0]) - 1 + step]
        top = torch.topk(row, 3)
        assert set(entry) == set(top.indices.tolist()) | {token}
        for t, lp in entry.items():
            assert lp == pytest.approx(row[t].item(), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs,
                                                                          strict=True)), abs=1e-4)


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "hello there"}]
    out = llm.chat(messages, greedy(4), use_tqdm=False)[0]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("n", 0),
    ("logprobs", 99), ("presence_penalty", 3.0), ("repetition_penalty", 0.0), ("beam_width", 0),
    ("seed", -1), ("stop", [""]), ("min_tokens", 99),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    assert field in str(err.value)


def test_impossible_requests_are_refused_and_nothing_leaks(llm):
    limit = llm.engine.max_model_len
    with pytest.raises(RequestRejected) as err:
        llm.generate([[5] * limit], greedy(), use_tqdm=False)
    assert err.value.code == "prompt_too_long" and str(limit) in str(err.value)
    with pytest.raises(RequestRejected) as err:
        llm.generate([[5] * 10], greedy(limit), use_tqdm=False)
    assert err.value.param == "max_tokens"
    with pytest.raises(RequestRejected) as err:
        llm.generate([[10_000]], greedy(), use_tqdm=False)
    assert err.value.param == "prompt_token_ids"
    assert_pool_empty(llm.engine)


def test_async_scheduling_gives_the_same_outputs_as_synchronous_steps(checkpoint):
    """Scheduling step t+1 before step t's tokens are read must not change any output: placeholders,
    rows of sequences that ended meanwhile, and the synchronous fallbacks (n > 1, beams, penalties)."""
    full = LLM(str(checkpoint), dtype="float32", block_size=8, num_gpu_blocks=128, async_scheduling=False)
    ends = full.generate([PROMPTS[1]], greedy(16, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    params = [greedy(20, ignore_eos=True), greedy(16, stop_token_ids=[ends[5]]),
              SamplingParams(max_tokens=12, n=3, seed=5), SamplingParams(max_tokens=10, beam_width=3, temperature=0),
              SamplingParams(max_tokens=14, repetition_penalty=1.3, seed=2), greedy(9, min_tokens=7)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]

    def run(async_scheduling: bool) -> list:
        llm = LLM(str(checkpoint), dtype="float32", block_size=8, num_gpu_blocks=40, watermark=0.0,
                  async_scheduling=async_scheduling, max_num_batched_tokens=24, max_num_seqs=8)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert_pool_empty(llm.engine)
        return [[(c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]

    assert run(True) == run(False)


def test_warm_up_leaves_no_trace(checkpoint):
    """The start-up warm-up (run on CUDA by `LLMEngine.from_config`, here by hand): tiny greedy and
    sampled batches that leave no blocks, no prefix-cache entries and zero counters, and change no
    later output."""
    fresh = LLM(str(checkpoint), dtype="float32", block_size=8, num_gpu_blocks=128, num_cpu_blocks=64)
    expected = token_ids(fresh.generate(PROMPTS, greedy(8), use_tqdm=False))
    warmed = LLM(str(checkpoint), dtype="float32", block_size=8, num_gpu_blocks=128, num_cpu_blocks=64)
    engine = warmed.engine
    launch, rows = engine.executor.launch, []
    engine.executor.launch = lambda out: rows.append(len(out.seqs)) or launch(out)
    engine.warm_up()
    engine.executor.launch = launch
    assert max(rows) == 17 and 1 in rows  # a batch of one, then one past 16 sequences
    assert_pool_empty(engine)
    stats = engine.stats()
    assert stats.kv_blocks_cached == 0
    assert (stats.steps_total, stats.prompt_tokens_total, stats.generation_tokens_total) == (0, 0, 0)
    assert stats.num_preemptions_total == 0
    assert token_ids(warmed.generate(PROMPTS, greedy(8), use_tqdm=False)) == expected


def test_the_runner_forgets_finished_requests(llm):
    """Each request's sampling row and random generator are kept while it runs and dropped once it
    finishes, even when its last step was the last of a run (no step followed to carry the news):
    after a second batch, only that batch's requests remain."""
    runner = llm.engine.executor.runner
    seeded = [SamplingParams(max_tokens=3, temperature=0.8, seed=i, ignore_eos=True) for i in range(len(PROMPTS))]
    llm.generate(PROMPTS, seeded, use_tqdm=False)
    assert len(runner._requests) == len(runner.generators) == len(PROMPTS)
    llm.generate(PROMPTS[:2], SamplingParams(max_tokens=3, temperature=0.8, ignore_eos=True), use_tqdm=False)
    assert len(runner._requests) == 2 and not runner.generators
