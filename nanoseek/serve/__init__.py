"""OpenAI-compatible HTTP server over nanoseek's engine, with Prometheus metrics and a chat
page (docs/serve.md).

    engine = Engine.load("runs/small", max_batch=8)
    serve(engine, ServerSettings(model_name="small"), port=8000)

Needs the `serve` extra (FastAPI, uvicorn).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from nanoseek.serve.app import ServerSettings, create_app

GRACEFUL_SHUTDOWN_S = 5  # Ctrl-C / SIGTERM: running requests get this long to finish


def serve(
    engine: Any,
    settings: ServerSettings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
) -> None:
    """Serve until Ctrl-C or SIGTERM; then requests still running are aborted and the
    engine's thread ends."""
    import uvicorn

    config = uvicorn.Config(
        create_app(engine, settings),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: exit 0 then, not "killed"
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


__all__ = ["ServerSettings", "create_app", "serve"]
