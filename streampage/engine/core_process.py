"""The engine core in its own process: the step loop, fed by and reporting to the front end.

Messages are pickled tuples over one duplex pipe, batched per step (never per token):

    front -> core   ("add", request_id, prompt_token_ids, params, arrival_time)
                    ("abort", [request_id, ...])
                    ("shutdown",)
    core -> front   ("status", text)                                   while loading
                    ("ready", CoreInfo)                                 loaded, serving
                    ("accepted", [(request_id, cached_tokens), ...])    after ingesting adds
                    ("rejected", request_id, code, message, param)
                    ("step", encoded deltas, EngineStats)               after every step
                    ("idle", EngineStats)                               a heartbeat while idle
                    ("error", text)                                     the core is dying

The loop ingests every pending message between steps, so aborts free their blocks before the next
step. While idle it blocks on the pipe (with a heartbeat timeout) instead of spinning.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from streampage.config import EngineConfig
from streampage.engine.limits import RequestLimits
from streampage.engine.llm_engine import LLMEngine, RequestDelta, SeqDelta
from streampage.outputs import RequestRejected

HEARTBEAT_S = 1.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreInfo:
    """What the front end learns once the model is loaded."""

    model_dir: str
    limits: RequestLimits  # the pool's sizes included: what a request may ask for


def start_core(config: EngineConfig, main_module: str = __name__,
               main_args: Sequence[str] = ()) -> tuple[subprocess.Popen, Connection]:
    """Start the core in a fresh interpreter over an inherited socket pair.

    A fresh interpreter rather than multiprocessing's spawn: spawn re-imports the caller's __main__,
    which breaks scripts without a main guard, and fork does not survive CUDA or threads.
    `main_module`'s `main()` runs there with the socket's descriptor then `main_args` in sys.argv
    (benchmarks substitute a core with a simulated model)."""
    front_sock, core_sock = socket.socketpair()
    process = subprocess.Popen(
        # -c, not -m: classes pickled by the core must name this module, not __main__
        [sys.executable, "-c", f"from {main_module} import main; main()", str(core_sock.fileno()), *main_args],
        pass_fds=(core_sock.fileno(),),
    )
    core_sock.close()
    conn = Connection(front_sock.detach())
    conn.send(config)
    return process, conn


def main() -> None:
    conn = Connection(int(sys.argv[1]))
    run_core(conn.recv(), conn)


def load_engine(config: EngineConfig) -> tuple[LLMEngine, str]:
    """The engine over the loaded model, and the checkpoint directory (the front end's tokenizer)."""
    engine, info = LLMEngine.from_config(config)
    return engine, info.model_dir


def run_core(config: EngineConfig, conn: Connection,
             load: Callable[[EngineConfig], tuple[LLMEngine, str]] = load_engine) -> None:
    """The core process's main: load, then step until told to stop or the front end goes away."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s core %(levelname)s %(message)s")
    try:
        conn.send(("status", "loading the model"))
        engine, model_dir = load(config)  # loaders freeze what they built (freeze_long_lived_objects)
        try:
            conn.send(("ready", CoreInfo(model_dir, engine.limits)))
            _serve(engine, conn)
        finally:
            engine.shutdown()  # tensor-parallel ranks exit with the core
    except (EOFError, BrokenPipeError):
        return  # the front end is gone: nobody is left to serve
    except BaseException:
        text = traceback.format_exc()
        log.error("engine core failed:\n%s", text)
        with contextlib.suppress(OSError):
            conn.send(("error", text))
        raise SystemExit(1) from None


def _serve(engine: LLMEngine, conn: Connection) -> None:
    while True:
        busy = engine.has_unfinished_requests()
        if not busy and not conn.poll(HEARTBEAT_S):
            engine.check_health()  # a tensor-parallel rank that dies while idle fails the core now
            conn.send(("idle", engine.stats()))
            continue
        accepted: list[tuple[str, int]] = []
        while conn.poll(0):
            if not _handle(engine, conn.recv(), conn, accepted):
                return
        if accepted:
            conn.send(("accepted", accepted))
        if engine.has_unfinished_requests():
            deltas = engine.step()
            conn.send(("step", encode_deltas(deltas), engine.stats()))


def encode_deltas(deltas: list[RequestDelta]) -> list[tuple]:
    """Plain tuples for the pipe, in the dataclasses' field order: pickling slotted dataclasses costs
    several times more per step (tests/test_async_engine.py checks every field survives)."""
    return [(d.request_id,
             [(s.index, s.token_ids, s.logprobs, s.cumulative_logprob, s.finish_reason, s.stop_reason)
              for s in d.seqs],
             d.finished, d.num_cached_tokens, d.first_scheduled_time, d.first_token_time) for d in deltas]


def decode_deltas(encoded: list[tuple]) -> list[RequestDelta]:
    return [RequestDelta(request_id, [SeqDelta(*seq) for seq in seqs], finished, cached, scheduled, first_token)
            for request_id, seqs, finished, cached, scheduled, first_token in encoded]


def _handle(engine: LLMEngine, message: tuple[Any, ...], conn: Connection, accepted: list[tuple[str, int]]) -> bool:
    kind = message[0]
    if kind == "add":
        _, request_id, prompt_token_ids, params, arrival_time = message
        try:
            engine.add_request(request_id, prompt_token_ids, params, arrival_time)
        except RequestRejected as exc:
            conn.send(("rejected", request_id, exc.code, str(exc), exc.param))
            return True
        group = engine.scheduler.groups[request_id]
        accepted.append((request_id, engine.kv.find_prefix(group.seqs[0]).num_blocks * engine.kv.block_size))
    elif kind == "abort":
        for request_id in message[1]:
            engine.abort_request(request_id)
    elif kind == "shutdown":
        return False
    else:
        raise ValueError(f"unknown message {kind!r} from the front end")
    return True
