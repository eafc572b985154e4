"""Engine configuration: one flat, validated, frozen dataclass per concern.

`EngineConfig.create(model=..., **options)` is the one place user options land; each option belongs to
exactly one of the concern dataclasses below, so `LLM(...)`, `streampage serve` and the environment file
all share the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

PreemptionMode = Literal["auto", "recompute", "swap"]
SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64)
SUPPORTED_DTYPES = ("auto", "float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """An engine option is invalid; the message names the option and its limit."""


@dataclass(frozen=True)
class ModelConfig:
    model: str = ""  # local checkpoint directory; "" = the built-in demo model
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.90
    num_gpu_blocks: int | None = None  # fixes the pool size instead of profiling (tests, benches)
    swap_space_gb: float = 4.0  # pinned CPU memory for swapped-out blocks, per rank
    num_cpu_blocks: int | None = None  # fixes the swap pool size instead of deriving it from swap_space_gb
    enable_prefix_caching: bool = True
    watermark: float = 0.01  # share of the pool kept free when admitting, to avoid instant preemption

    def __post_init__(self) -> None:
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ConfigError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks < 1:
            raise ConfigError(f"num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if self.num_cpu_blocks is not None and self.num_cpu_blocks < 0:
            raise ConfigError(f"num_cpu_blocks must be >= 0, got {self.num_cpu_blocks}")
        if self.swap_space_gb < 0:
            raise ConfigError(f"swap_space_gb must be >= 0, got {self.swap_space_gb}")
        if not 0.0 <= self.watermark < 0.5:
            raise ConfigError(f"watermark must be in [0, 0.5), got {self.watermark}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running sequences per step
    max_num_batched_tokens: int = 8192  # tokens per step (decode tokens + prefill chunks)
    preemption_mode: PreemptionMode = "auto"  # auto: recompute single-sequence groups, swap the others
    enable_chunked_prefill: bool = True
    # Schedule and launch step t+1 before reading step t's tokens, so host work (scheduling, input
    # preparation, output processing) hides behind the device. On the H200 it took the nano-vllm
    # workload from 16.8k to 21.0k output tok/s. A sequence that ends by EOS or a stop token wastes
    # one row of the step after; steps whose tokens decide the next batch are finished at once.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode each step"
            )
        if self.preemption_mode not in ("auto", "recompute", "swap"):
            raise ConfigError(f"preemption_mode must be auto, recompute or swap, got {self.preemption_mode!r}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # Longest wait for another rank within a step (a collective or a control message) before the engine
    # fails; a rank that exits is noticed at once. Start-up has its own, longer limit.
    distributed_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_timeout_s <= 0:
            raise ConfigError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")


# Above a few thousand tokens a mixed step's device time dwarfs its launches: graphs would only cost memory.
MAX_MIXED_GRAPH_TOKENS = 4096
# Projections of a decoder layer that `decode_gemv` can route to the GEMV, and its shorthands.
GEMV_PROJECTIONS = ("qkv", "o", "gate_up", "down")
DECODE_GEMV_SHORTHANDS = {"off": (), "all": GEMV_PROJECTIONS, "row-parallel": ("o", "down")}


def gemv_projections(decode_gemv: str) -> frozenset[str]:
    """The projections a `decode_gemv` value names: a shorthand (off, all, row-parallel) or a comma
    list of GEMV_PROJECTIONS. Raises ConfigError naming the choices."""
    if decode_gemv in DECODE_GEMV_SHORTHANDS:
        return frozenset(DECODE_GEMV_SHORTHANDS[decode_gemv])
    names = [name.strip() for name in decode_gemv.split(",")]
    unknown = [name for name in names if name not in GEMV_PROJECTIONS]
    if unknown:  # "" splits into [""], which is unknown too
        raise ConfigError(
            f"decode_gemv must be one of {', '.join(DECODE_GEMV_SHORTHANDS)} or a comma list of "
            f"{', '.join(GEMV_PROJECTIONS)}, got {decode_gemv!r}"
        )
    return frozenset(names)


@dataclass(frozen=True)
class RunnerConfig:
    enforce_eager: bool = False  # no CUDA graphs
    max_graph_batch_size: int | None = None  # None: max_num_seqs
    # Decode kernels on CUDA (docs/kernels.md): programmatic dependent launch of the Triton kernels
    # (Hopper+: each starts under the previous one's tail; on by default since it measured faster on
    # the H200), and which projections of 1-8 rows take the Triton split-K GEMV instead of cuBLAS:
    # "off", "all", "row-parallel" (the O and down projections, where cuBLAS at one row leaves the
    # most bandwidth unused) or a comma list of projections, e.g. "qkv,o". Off: on the H200 (sessions
    # 6-7) the routings that include O or down took the 1B's batch-1 step 2-4% faster, none the 8B's.
    programmatic_launch: bool = True
    decode_gemv: str = "off"
    # Decode graphs launch attention over the rows longest first, so that in a batch of mixed context
    # lengths a few long sequences do not run alone at the end (on the H200: attention over 128-256
    # rows of 100-2,048 tokens at 94-103% of the copy bandwidth instead of 84-94%).
    decode_longest_first: bool = True
    # Mixed steps (prompt chunks beside decode rows) of at most this many tokens replay CUDA graphs
    # (`runner/mixed_graphs.py`) instead of launching every kernel from Python; 0 = eager. Off: on the
    # H200 (session 6) the nano-vllm workload ran as fast eager once no kernel compiled mid-run.
    mixed_graph_max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_graph_batch_size is not None and self.max_graph_batch_size < 1:
            raise ConfigError(f"max_graph_batch_size must be >= 1, got {self.max_graph_batch_size}")
        gemv_projections(self.decode_gemv)  # raises for a name it does not know
        if not 0 <= self.mixed_graph_max_tokens <= MAX_MIXED_GRAPH_TOKENS:
            raise ConfigError(f"mixed_graph_max_tokens must be in [0, {MAX_MIXED_GRAPH_TOKENS}], "
                              f"got {self.mixed_graph_max_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)

    @classmethod
    def create(cls, **options: Any) -> EngineConfig:
        """Sort flat options (`block_size=32, max_num_seqs=8, ...`) into their concerns."""
        parts: dict[str, dict[str, Any]] = {f.name: {} for f in fields(cls)}
        owners = {name: part for part in parts for name in option_names(part)}
        for name, value in options.items():
            if name not in owners:
                raise ConfigError(f"unknown engine option {name!r}; known: {', '.join(sorted(owners))}")
            parts[owners[name]][name] = value
        concern_types = {f.name: f.default_factory for f in fields(cls)}  # type: ignore[misc]
        return cls(**{part: concern_types[part](**values) for part, values in parts.items()})

    def with_max_model_len(self, max_model_len: int) -> EngineConfig:
        return replace(self, model=replace(self.model, max_model_len=max_model_len))


def option_names(concern: str) -> list[str]:
    """The flat option names owned by one concern of EngineConfig."""
    concern_type = {f.name: f.default_factory for f in fields(EngineConfig)}[concern]  # type: ignore[misc]
    return [f.name for f in fields(concern_type)]
