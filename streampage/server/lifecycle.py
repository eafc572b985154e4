"""From listening to exit: load, report ready, serve, then drain on SIGTERM or fail on engine death.

    listen (/healthz 200, /readyz 503) -> load the model (STATUS= lines) -> READY=1, /readyz 200
      -> SIGTERM/SIGINT: STOPPING=1, drain up to --drain-timeout, close 1001, exit 0
      -> the engine dies: fail live requests, /readyz 503, close 1011, exit 1 (systemd restarts us)

The watchdog is fed only while the engine makes progress or is idle and healthy, so a wedged step
loop gets the process restarted.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from streampage.config import EngineConfig
from streampage.server.config import ServerConfig
from streampage.server.context import EngineClient, ServingContext
from streampage.server.sd_notify import Notifier
from streampage.server.stream_server import StreamServer

logger = logging.getLogger("streampage.server")

StatusCallback = Callable[[str], None]
EngineStarter = Callable[[StatusCallback], Awaitable[EngineClient]]

EXIT_OK = 0
EXIT_ENGINE_FAILED = 1


async def run_server(config: ServerConfig, *, engine: EngineClient | None = None,
                     start_engine: EngineStarter | None = None,
                     on_listening: Callable[[StreamServer], None] | None = None,
                     handle_signals: bool = True, notifier: Notifier | None = None) -> int:
    """Run one server to its end and return the exit code. Give a ready `engine` (tests) or a
    `start_engine` coroutine (the CLI); an engine started here is shut down here."""
    assert (engine is None) != (start_engine is None), "give exactly one of engine, start_engine"
    notifier = notifier or Notifier.from_environment()
    server = StreamServer(config)
    await server.listen()
    if on_listening is not None:
        on_listening(server)
    if handle_signals:
        _install_signal_handlers(server)
    try:
        if engine is None:
            assert start_engine is not None
            engine = await _load(server, start_engine, notifier)
            if engine is None:
                return EXIT_OK if server.stop_requested.is_set() else EXIT_ENGINE_FAILED
            try:
                return await _serve(server, engine, notifier)
            finally:
                await _shutdown(engine)
        return await _serve(server, engine, notifier)
    finally:
        if handle_signals:
            _remove_signal_handlers()


async def _load(server: StreamServer, start_engine: EngineStarter, notifier: Notifier) -> EngineClient | None:
    """Start the engine unless a stop request comes first; None when it failed or was stopped."""

    def on_status(line: str) -> None:
        server.ctx.loading_status = line
        notifier.status(line)

    on_status("loading the model")
    loading = asyncio.ensure_future(start_engine(on_status))
    stop = asyncio.ensure_future(server.stop_requested.wait())
    await asyncio.wait([loading, stop], return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not loading.done():
        loading.cancel()
        notifier.stopping("stopped while loading")
        await asyncio.gather(loading, return_exceptions=True)
        await server.close()
        return None
    if loading.exception() is not None:
        logger.error("the engine failed to start", exc_info=loading.exception())
        notifier.status(f"failed to start: {loading.exception()}")
        await server.close()
        return None
    return loading.result()


async def _serve(server: StreamServer, engine: EngineClient, notifier: Notifier) -> int:
    server.attach(engine)
    notifier.ready(f"serving {engine.model_name} on port {server.port}")
    logger.info("ready: serving %s", engine.model_name)
    watchdog = _start_watchdog(notifier, server.ctx)
    death = asyncio.ensure_future(engine.wait_until_dead())
    stop = asyncio.ensure_future(server.stop_requested.wait())
    try:
        await asyncio.wait([death, stop], return_when=asyncio.FIRST_COMPLETED)
        if death.done():
            logger.error("the engine failed: %s; failing live requests and exiting", death.result())
            notifier.status(f"engine failed: {death.result()}")
            await server.fail()
            return EXIT_ENGINE_FAILED
        notifier.stopping(f"draining (up to {server.config.drain_timeout:g}s)")
        logger.info("stopping: draining up to %gs", server.config.drain_timeout)
        await server.drain(server.config.drain_timeout)
        return EXIT_ENGINE_FAILED if engine.errored else EXIT_OK
    finally:
        for task in (death, stop, watchdog):
            if task is not None:
                task.cancel()


async def _shutdown(engine: EngineClient) -> None:
    try:
        await engine.shutdown()
    except Exception:  # the exit code already says how serving ended
        logger.exception("engine shutdown failed")


def _start_watchdog(notifier: Notifier, ctx: ServingContext) -> asyncio.Task[None] | None:
    interval = notifier.watchdog_interval
    if interval is None:
        return None
    return asyncio.create_task(feed_watchdog(notifier, ctx, interval))


async def feed_watchdog(notifier: Notifier, ctx: ServingContext, interval: float) -> None:
    """Send WATCHDOG=1 every `interval` seconds while the engine steps, or has nothing to do."""
    last_steps = -1
    while True:
        await asyncio.sleep(interval)
        engine = ctx.engine
        if engine is None or engine.errored:
            continue
        stats = engine.stats
        idle = stats.num_running + stats.num_waiting + stats.num_swapped == 0
        if idle or stats.steps_total != last_steps:
            notifier.watchdog()
        last_steps = stats.steps_total


def _install_signal_handlers(server: StreamServer) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)


def real_engine_starter(model: str | None, options: dict[str, Any]) -> EngineStarter:
    """Start streampage's AsyncEngine on `model`, or on the built-in demo checkpoint when None."""

    async def start(on_status: StatusCallback) -> EngineClient:
        # Imported here: the engine pulls in torch, which tests of the server never need.
        from streampage.engine.async_engine import AsyncEngine

        path = model
        if path is None:
            from streampage.model.demo import ensure_demo_model

            on_status("preparing the built-in demo model")
            path = str(await asyncio.to_thread(ensure_demo_model))
            logger.warning("no MODEL given: serving the built-in demo checkpoint at %s. Its weights are "
                           "random, so its text is noise; pass a checkpoint directory for real use.", path)
        config = EngineConfig.create(model=path, **options)
        return await AsyncEngine.start(config, on_status=on_status)

    return start


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets logs every connection and HTTP GET at INFO (the page polls /v1/stats), and handshake
    # headers, which may carry the API key, at DEBUG: INFO at most, and only when debugging.
    logging.getLogger("websockets").setLevel(logging.INFO if level == "debug" else logging.WARNING)
