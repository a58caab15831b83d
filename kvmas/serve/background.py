"""A server in a background thread of this process (the tests and ``kvmas bench serve`` use it).

>>> from kvmas.testing import tiny_model
>>> from kvmas.serve import ServeConfig, create_app
>>> import httpx
>>> with BackgroundServer(create_app(tiny_model(), ServeConfig())) as srv:
...     httpx.get(srv.url + "/health").json()["status"]
'ok'
"""

from __future__ import annotations

import threading
import time

import uvicorn

from kvmas.errors import KvmasError


class BackgroundServer:
    """uvicorn serving ``app`` on ``host``:``port`` (0: a free port) while inside the ``with`` block."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 30.0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.host, self.start_timeout = host, start_timeout
        self._thread = threading.Thread(target=self.server.run, name="kvmas-serve", daemon=True)
        self.port = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise KvmasError(f"the server did not start on {self.host}")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
