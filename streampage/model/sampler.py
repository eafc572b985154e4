"""Token selection for a batch of rows, on the device the logits live on.

The pipeline follows vLLM: raw logits -> penalties -> banned tokens -> (greedy rows: argmax) ->
temperature -> min-p -> top-k -> top-p -> an exponential race. Log-probabilities handed back are
always those of the raw logits (`log_softmax` before penalties and temperature).

On CUDA, a batch whose rows are all greedy or temperature-only (`fusable`) skips the pipeline: one
Triton kernel (`streampage.kernels.sample_tokens`) reads the logits once and returns each row's token
and raw log-probability, where the pipeline makes about ten passes over them.

Everything runs vectorised over rows; Python loops touch only seeded rows and the output lists, and
the results come back to the host in one transfer per dtype at the end.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from streampage import kernels
from streampage.sampling_params import SamplingParams

# Columns of the per-row parameter table of `SamplingMetadata.build`: the first _NUM_COLUMNS go to the
# device in one copy, the rest are read on the host only.
_NUM_COLUMNS, _NUM_HOST_COLUMNS = 7, 9
_TEMPERATURE, _TOP_P, _TOP_K, _MIN_P, _PRESENCE, _FREQUENCY, _REPETITION, _LOGPROBS, _BEAM_WIDTH = range(
    _NUM_HOST_COLUMNS
)


@dataclass
class SamplingMetadata:
    """What the sampler needs for one step; row r describes logits row r.

    The per-row tensors are float32 views of one device table (top_k holds whole numbers, 0 = off).
    The flags and row lists say which stages some row needs, so the sampler skips the others: an
    all-greedy batch without penalties or bans is a bare argmax, and only top-k/top-p sort.
    """

    temperature: torch.Tensor  # 0 = greedy
    top_p: torch.Tensor
    top_k: torch.Tensor
    min_p: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor
    repetition_penalty: torch.Tensor
    prompt_token_ids: Sequence[Sequence[int]]  # read only for penalty_rows
    output_token_ids: Sequence[Sequence[int]]  # read only for penalty_rows
    banned_token_ids: Sequence[Sequence[int]]  # read only for banned_rows
    generators: dict[int, torch.Generator]  # row -> the generator of a seeded request
    num_samples: list[int]  # tokens to draw from each row (n > 1 at a parallel request's first step)
    num_logprobs: list[int]  # top-N raw log-probabilities wanted per row; 0 = none
    all_greedy: bool
    all_random: bool
    use_min_p: bool  # some sampled row has min_p > 0
    max_top_k: int  # the largest top_k of a sampled row; 0 = no row limits top-k
    use_top_p: bool  # some sampled row has top_p < 1
    penalty_rows: list[int]  # rows with a non-neutral presence, frequency or repetition penalty
    banned_rows: list[int]  # rows with a non-empty banned_token_ids list

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        *,
        device: torch.device | str,
        prompt_token_ids: Sequence[Sequence[int]] = (),
        output_token_ids: Sequence[Sequence[int]] = (),
        banned_token_ids: Sequence[Sequence[int]] = (),
        generators: dict[int, torch.Generator] | None = None,
        num_samples: Sequence[int] | None = None,
        num_logprobs: Sequence[int] | None = None,
        param_rows: Sequence[bytes] | None = None,
    ) -> SamplingMetadata:
        """One row per entry of `params`, in O(rows) with one host-to-device copy. `param_rows`, when
        given, are `param_row(p)` for each entry, kept by a caller that builds for the same requests
        step after step (packing a row is most of the cost of a build).

        Token lists are needed only for rows that use penalties (prompt and output) or bans; empty
        sequences stand for "no row needs them". Beam-search rows become greedy rows that ask for
        2 * beam_width top log-probabilities (or `num_logprobs[r]` when given): the engine ranks
        beams from those.
        """
        num_rows = len(params)
        rows = param_rows if param_rows is not None else [param_row(p) for p in params]
        table = np.frombuffer(b"".join(rows), dtype=np.float32).reshape(num_rows, _NUM_HOST_COLUMNS).copy()
        beam = table[:, _BEAM_WIDTH] > 1
        table[beam, _TEMPERATURE] = 0.0
        greedy = table[:, _TEMPERATURE] == 0
        sampled = ~greedy  # truncation cannot change an argmax, so greedy rows never need it
        penalised = (table[:, _PRESENCE] != 0) | (table[:, _FREQUENCY] != 0) | (table[:, _REPETITION] != 1)
        penalty_rows = np.flatnonzero(penalised).tolist()
        _check_lengths(num_rows, penalty_rows, prompt_token_ids, output_token_ids, banned_token_ids)
        if num_logprobs is None:
            num_logprobs = np.maximum(table[:, _LOGPROBS], np.where(beam, 2 * table[:, _BEAM_WIDTH], 0))
        num_logprobs = np.asarray(num_logprobs, dtype=np.int64)
        columns = _to_device(np.ascontiguousarray(table[:, :_NUM_COLUMNS]), torch.device(device)).unbind(dim=1)
        return cls(
            temperature=columns[_TEMPERATURE],
            top_p=columns[_TOP_P],
            top_k=columns[_TOP_K],
            min_p=columns[_MIN_P],
            presence_penalty=columns[_PRESENCE],
            frequency_penalty=columns[_FREQUENCY],
            repetition_penalty=columns[_REPETITION],
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids,
            banned_token_ids=banned_token_ids,
            generators=dict(generators or {}),
            num_samples=list(num_samples) if num_samples is not None else [1] * num_rows,
            num_logprobs=num_logprobs.astype(np.int64).tolist(),
            all_greedy=bool(greedy.all()),
            all_random=num_rows > 0 and not greedy.any(),  # an empty batch is all greedy
            use_min_p=bool((table[sampled, _MIN_P] > 0).any()),
            max_top_k=int(table[sampled, _TOP_K].max(initial=0)),
            use_top_p=bool((table[sampled, _TOP_P] < 1).any()),
            penalty_rows=penalty_rows,
            banned_rows=[row for row, ids in enumerate(banned_token_ids) if ids],
        )

    @property
    def num_rows(self) -> int:
        return len(self.num_samples)


def param_row(p: SamplingParams) -> bytes:
    """A request's row of `SamplingMetadata.build`'s parameter table (columns _TEMPERATURE...), packed
    as native float32."""
    return struct.pack(f"={_NUM_HOST_COLUMNS}f", p.temperature, p.top_p, p.top_k, p.min_p, p.presence_penalty,
                       p.frequency_penalty, p.repetition_penalty, p.logprobs or 0, p.beam_width)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host -> device without waiting for the device: built while the forward pass still runs, a
    copy from pageable memory would block until that pass is done."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _check_lengths(
    num_rows: int,
    penalty_rows: list[int],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    banned_token_ids: Sequence[Sequence[int]],
) -> None:
    if penalty_rows and (len(prompt_token_ids) != num_rows or len(output_token_ids) != num_rows):
        raise ValueError(
            f"penalties need prompt_token_ids and output_token_ids for all {num_rows} rows, got "
            f"{len(prompt_token_ids)} and {len(output_token_ids)}"
        )
    if banned_token_ids and len(banned_token_ids) != num_rows:
        raise ValueError(f"banned_token_ids has {len(banned_token_ids)} rows, expected {num_rows}")


class TopLogprobs(NamedTuple):
    """The N most likely tokens of one row, most likely first, with their raw log-probabilities."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass
class SamplerOutput:
    token_ids: list[list[int]]  # num_samples[r] tokens per row
    logprobs: list[list[float]]  # raw log-probability of each sampled token
    top_logprobs: list[TopLogprobs | None]  # per row; None where num_logprobs[r] == 0


@dataclass
class DeviceSample:
    """A step's draws: `tokens` [draws] stays on the device to feed the next step directly; `ints`
    (tokens, then every row's top-k ids) and `floats` (the draws' raw log-probabilities, then the
    top-k values) are already on their way to the host.

    The host copies are queued right behind the sampling kernels, into pinned memory, with an event
    after them. A copy queued later, when the host asks for the results, would sit behind whatever
    the host has queued since (with async scheduling: the whole next step), and `to_host` would wait
    for that too."""

    tokens: torch.Tensor
    ints: torch.Tensor
    floats: torch.Tensor
    k: int
    metadata: SamplingMetadata
    copied: torch.cuda.Event | None = None

    @classmethod
    def start_copy(cls, tokens: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor, k: int,
                   metadata: SamplingMetadata) -> DeviceSample:
        if not ints.is_cuda:
            return cls(tokens, ints, floats, k, metadata)
        host_ints = torch.empty(ints.shape, dtype=ints.dtype, pin_memory=True)
        host_floats = torch.empty(floats.shape, dtype=floats.dtype, pin_memory=True)
        host_ints.copy_(ints, non_blocking=True)
        host_floats.copy_(floats, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(tokens, host_ints, host_floats, k, metadata, copied)

    def to_host(self) -> SamplerOutput:
        if self.copied is not None:
            self.copied.synchronize()
        return _split_output(self.ints.tolist(), self.floats.tolist(), self.tokens.shape[0], self.k, self.metadata)


def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
    """Draw metadata.num_samples[r] tokens from each row r of `logits` [rows, vocab]."""
    return sample_on_device(logits, metadata).to_host()


def sample_on_device(logits: torch.Tensor, metadata: SamplingMetadata, *, fused: bool = True) -> DeviceSample:
    """`sample` without the host transfer: every kernel is queued and nothing waits. `fused=False`
    keeps `fusable` CUDA batches on the PyTorch pipeline (the reference of tests and benchmarks)."""
    if fused and logits.is_cuda and fusable(metadata):
        return sample_fused(logits, metadata)
    logits = logits.float()
    log_normalizer = torch.logsumexp(logits, dim=-1)  # raw log-probabilities are logits - this
    sample_rows = _sample_rows(metadata, logits.device)
    tokens = _select_tokens(logits, metadata, sample_rows)
    sampled_logprobs = logits[sample_rows, tokens] - log_normalizer[sample_rows]
    k = min(max(metadata.num_logprobs, default=0), logits.shape[-1])
    ints, floats = tokens, sampled_logprobs
    if k:
        top = logits.topk(k, dim=-1)
        ints = torch.cat([tokens, top.indices.flatten()])
        floats = torch.cat([sampled_logprobs, (top.values - log_normalizer.unsqueeze(1)).flatten()])
    return DeviceSample.start_copy(tokens, ints, floats, k, metadata)


def fusable(metadata: SamplingMetadata) -> bool:
    """Whether every row is greedy or temperature-only with one draw and no top log-probabilities:
    what `sample_fused` covers. Truncation flags count sampled rows only (greedy rows ignore it)."""
    return (
        metadata.num_rows > 0
        and not (metadata.penalty_rows or metadata.banned_rows or metadata.generators)
        and not (metadata.use_min_p or metadata.max_top_k or metadata.use_top_p)
        and max(metadata.num_samples) == 1
        and max(metadata.num_logprobs) == 0
    )


def sample_fused(logits: torch.Tensor, metadata: SamplingMetadata) -> DeviceSample:
    """The `fusable` case in one read of the logits (`streampage.kernels.sample_tokens`): greedy rows
    take the argmax, the others a Gumbel-max draw from softmax(logits / T), each with its raw
    log-probability. The noise's seed is drawn on the device from the default generator, so steps
    differ, torch.manual_seed governs them, and nothing here reads a host value per step."""
    if metadata.all_greedy:
        tokens, logprobs = kernels.sample_tokens(logits, None, None)
    else:
        seed = torch.empty(1, dtype=torch.int64, device=logits.device).random_()
        tokens, logprobs = kernels.sample_tokens(logits, metadata.temperature, seed)
    return DeviceSample.start_copy(tokens, tokens, logprobs, 0, metadata)


def _sample_rows(metadata: SamplingMetadata, device: torch.device) -> torch.Tensor:
    """The logits row of every draw: row r repeated num_samples[r] times."""
    rows = torch.arange(metadata.num_rows, device=device)
    if max(metadata.num_samples, default=1) == 1:
        return rows
    counts = torch.tensor(metadata.num_samples, device=device)
    return torch.repeat_interleave(rows, counts)


def _select_tokens(logits: torch.Tensor, metadata: SamplingMetadata, sample_rows: torch.Tensor) -> torch.Tensor:
    """One token per draw, [sum(num_samples)]. Leaves `logits` untouched."""
    modifies = metadata.penalty_rows or metadata.banned_rows or not metadata.all_greedy
    x = logits.clone(memory_format=torch.contiguous_format) if modifies else logits
    apply_penalties(x, metadata)
    apply_banned_tokens(x, metadata)
    greedy = None if metadata.all_random else x.argmax(dim=-1)[sample_rows]
    if metadata.all_greedy:
        return greedy
    temperature = metadata.temperature
    x.div_(torch.where(temperature == 0, 1.0, temperature).unsqueeze(1))
    if metadata.use_min_p:
        apply_min_p(x, metadata.min_p)
    if metadata.max_top_k or metadata.use_top_p:
        apply_top_k_top_p(
            x,
            metadata.top_k.long() if metadata.max_top_k else None,
            metadata.top_p if metadata.use_top_p else None,
            metadata.max_top_k,
        )
    drawn = _exponential_race(x, metadata, sample_rows)
    if greedy is None:
        return drawn
    return torch.where((temperature == 0)[sample_rows], greedy, drawn)


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """In place on the contiguous `logits`, for metadata.penalty_rows: the repetition penalty over
    prompt and output tokens (positive logits divided, negative multiplied), then OpenAI's frequency
    (times the count) and presence (once) penalties over output tokens."""
    rows = metadata.penalty_rows
    if not rows:
        return
    vocab_size = logits.shape[-1]
    flat = logits.view(-1)
    output_keys = _flat_keys(rows, metadata.output_token_ids, vocab_size, logits.device)
    prompt_keys = _flat_keys(rows, metadata.prompt_token_ids, vocab_size, logits.device)
    seen = torch.cat([prompt_keys, output_keys])
    # Repeated keys read the same value and write the same result, so no deduplication is needed.
    penalty = metadata.repetition_penalty[seen // vocab_size]
    values = flat[seen]
    flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    # Every copy of a key gets its full count (found by binary search in the sorted keys), so the
    # duplicate writes again agree and the result is deterministic without atomic adds.
    output_keys = output_keys.sort().values
    counts = torch.searchsorted(output_keys, output_keys, right=True) - torch.searchsorted(output_keys, output_keys)
    owner = output_keys // vocab_size
    flat[output_keys] = (
        flat[output_keys] - metadata.frequency_penalty[owner] * counts - metadata.presence_penalty[owner]
    )


def apply_banned_tokens(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """In place on the contiguous `logits`: banned tokens of each row get -inf. Ids outside the
    vocabulary can never be sampled, so they are ignored."""
    if not metadata.banned_rows:
        return
    vocab_size = logits.shape[-1]
    keys = [
        row * vocab_size + token
        for row in metadata.banned_rows
        for token in metadata.banned_token_ids[row]
        if 0 <= token < vocab_size
    ]
    logits.view(-1)[torch.tensor(keys, dtype=torch.int64, device=logits.device)] = float("-inf")


def _flat_keys(
    rows: Sequence[int], token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Positions in logits.view(-1) of every listed token of `rows` (repeats kept)."""
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists[r] for r in rows)), dtype=torch.int64)
    lengths = torch.tensor([len(token_lists[r]) for r in rows], dtype=torch.int64)
    owners = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    return (owners * vocab_size + tokens).to(device)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """In place: drop tokens whose probability is below min_p times the row's top probability.

    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p), so no softmax is needed; a row
    with min_p == 0 has threshold -inf and keeps everything."""
    threshold = logits.amax(dim=-1) + torch.log(min_p)
    logits.masked_fill_(logits < threshold.unsqueeze(1), float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int | None = None,
) -> None:
    """In place: keep each row's top_k largest logits (0 = all), then the smallest set of those whose
    probability mass reaches top_p (the top token always stays). Each row keeps every logit at or above
    a cutoff value, so tokens tied with the last kept one stay too. `max_top_k` (top_k.max(), known on
    the host) spares a device sync when only top-k is active."""
    if top_p is None:
        cutoff = _top_k_cutoff(logits, top_k, max_top_k if max_top_k is not None else int(top_k.max()))
    else:
        cutoff = _top_p_cutoff(logits, top_k, top_p)
    logits.masked_fill_(logits < cutoff.unsqueeze(1), float("-inf"))


def _top_k_cutoff(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """The k-th largest logit per row (-inf where k == 0), from one topk of the largest k: no sort."""
    largest = logits.topk(max(1, min(max_top_k, logits.shape[-1])), dim=-1).values
    # Greedy rows may ask for more than max_top_k (it counts sampled rows only); their argmax is
    # already taken and survives any k >= 1.
    k = top_k.clamp(max=largest.shape[-1])
    kth = largest.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(k > 0, kth, float("-inf"))


def _top_p_cutoff(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest kept logit per row after top-k then top-p, from one ascending sort."""
    vocab_size = logits.shape[-1]
    ascending = logits.sort(dim=-1).values
    first_kept = torch.zeros_like(top_p, dtype=torch.int64)
    if top_k is not None:
        first_kept = torch.where(top_k > 0, (vocab_size - top_k).clamp(min=0), 0)
        positions = torch.arange(vocab_size, device=logits.device)
        ascending_k = ascending.masked_fill(positions < first_kept.unsqueeze(1), float("-inf"))
    else:
        ascending_k = ascending
    # A token is dropped when the tokens above it already hold top_p of the mass, i.e. when the mass
    # at or below it is <= 1 - top_p. Cumulative mass only grows, so the dropped ones are a prefix.
    mass_at_or_below = ascending_k.softmax(dim=-1).cumsum(dim=-1)
    num_dropped = (mass_at_or_below <= (1 - top_p).unsqueeze(1)).sum(dim=-1)
    first_kept = torch.maximum(first_kept, num_dropped).clamp(max=vocab_size - 1)
    return ascending.gather(1, first_kept.unsqueeze(1)).squeeze(1)


def _exponential_race(logits: torch.Tensor, metadata: SamplingMetadata, sample_rows: torch.Tensor) -> torch.Tensor:
    """Sample by argmax(p / q) with q ~ Exp(1) per token: the winner is distributed as p.

    Weights need no normalisation (a row-wide factor does not move the argmax), so the row's max is
    subtracted and exponentiated in place. Seeded rows draw q from their own generator, sized only by
    their own row, so their tokens never depend on the rest of the batch."""
    weights = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    if weights.shape[0] != sample_rows.shape[0]:
        weights = weights[sample_rows]
    q = torch.empty_like(weights).exponential_()
    if metadata.generators:
        starts = list(itertools.accumulate(metadata.num_samples, initial=0))
        vocab_size = weights.shape[-1]
        for row, generator in metadata.generators.items():
            count = metadata.num_samples[row]
            own = torch.empty(count, vocab_size, device=weights.device).exponential_(generator=generator)
            q[starts[row] : starts[row] + count] = own
    # q == 0 would turn a zero weight into 0/0 = nan, which argmax ranks first.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return weights.div_(q).argmax(dim=-1)


def _split_output(
    int_list: list, float_list: list, num_draws: int, k: int, metadata: SamplingMetadata
) -> SamplerOutput:
    """Cut the host lists of `DeviceSample` into per-row tokens, log-probabilities and top-k."""
    starts = list(itertools.accumulate(metadata.num_samples, initial=0))
    spans = list(itertools.pairwise(starts))
    top_logprobs: list[TopLogprobs | None] = [
        TopLogprobs(
            int_list[num_draws + row * k : num_draws + row * k + min(n, k)],
            float_list[num_draws + row * k : num_draws + row * k + min(n, k)],
        )
        if n
        else None
        for row, n in enumerate(metadata.num_logprobs)
    ]
    return SamplerOutput(
        token_ids=[int_list[a:b] for a, b in spans],
        logprobs=[float_list[a:b] for a, b in spans],
        top_logprobs=top_logprobs,
    )
