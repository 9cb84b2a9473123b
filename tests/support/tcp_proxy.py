"""A small toxiproxy-like TCP proxy for fault tests: cut, block and restore a link on demand,
without stopping the machine's shared Postgres or RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any


class TcpProxy:
    """Forwards 127.0.0.1:<port> to (host, port). Runs its own event loop in a thread, so it works
    the same for async tests and for real processes pointed at it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._links: set[asyncio.StreamWriter] = set()
        self._accepting = True
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.connections = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> TcpProxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._accepting:
            writer.close()
            return
        self._links.add(writer)
        await self._flowing.wait()  # a new connection hangs, unanswered, during a partition
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._links.discard(writer)
            writer.close()
            return
        self.connections += 1
        self._links.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    await self._flowing.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._links.discard(writer)
        self._links.discard(up_writer)

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(5)

    async def _cut(self) -> None:
        for w in list(self._links):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._links.clear()

    def cut(self) -> None:
        """Drop every open connection (peers see a reset), keep accepting new ones."""
        self._call(self._cut())

    def down(self) -> None:
        """Drop every connection and refuse new ones until `up()`: the service looks dead."""
        self._accepting = False
        self.cut()

    def up(self) -> None:
        self._accepting = True

    def blackhole(self) -> None:
        """A partition without resets: links stay open but no byte passes either way (no RST, no
        FIN), and new connections hang unanswered, until `flow()` delivers what was held."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def flow(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def url_for(self, url: str) -> str:
        """Rewrite a service URL's host:port to go through this proxy."""
        host, port = self.target
        return url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}", 1)

    def stop(self) -> None:
        self.down()

        async def close() -> None:
            if self._server is not None:
                self._server.close()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
