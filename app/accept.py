"""Accepting every pending connection in one loop turn, instead of uvloop's one a turn.

uvloop's server (libuv) accepts one connection each time the event loop turns. While the loop is
busy answering, a turn takes milliseconds, so when a client opens many connections at once the
last of them wait hundreds of turns in the kernel's accept queue with their first request already
sent: at 256 connections opened together by wrk, the first requests of about 160 of them were
answered 0.1-0.9 s after they were sent, while every request the server had parsed was answered
within 50 ms (docs/request-path.md, "Connections opened at once"). This listener takes over
uvloop's listening socket and accepts up to `ACCEPT_PER_TURN` connections whenever it is readable,
handing each to the loop's own transport (`connect_accepted_socket`), so the protocol, its
transport and everything after it stay exactly as before.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

ACCEPT_PER_TURN = 512  # bounds one turn's work when a flood of connections arrives
# out of descriptors or memory: the connections stay queued in the kernel; try again a second
# later, as asyncio's own server does
RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_RETRY_S = 1.0


class EagerListener:
    """A listening socket served by loop.add_reader: what uvicorn needs of an asyncio Server
    (`close`, `wait_closed`, `sockets`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol]):
        self.loop = loop
        self.sock = sock
        self.protocol_factory = protocol_factory
        self.sockets = [sock]
        self._handshakes: set[asyncio.Task] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    @classmethod
    def take_over(cls, server: asyncio.AbstractServer,
                  protocol_factory: Callable[[], asyncio.Protocol]) -> list[EagerListener]:
        """Listen on `server`'s sockets (duplicated, so the connections queued in the kernel
        stay queued) and close `server`, which stops its own accepting."""
        loop = asyncio.get_running_loop()
        socks = [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets]
        server.close()
        return [cls(loop, sock, protocol_factory) for sock in socks]

    def _accept(self) -> None:
        for _ in range(ACCEPT_PER_TURN):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as e:
                log.warning("accepting a connection failed: %s", e)
                if e.errno in RESOURCE_ERRORS:
                    # the socket stays readable while connections are queued: pause, not spin
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(ACCEPT_RETRY_S, self._resume)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvloop does
            task = self.loop.create_task(
                self.loop.connect_accepted_socket(self.protocol_factory, conn))
            self._handshakes.add(task)
            task.add_done_callback(self._started)

    def _resume(self) -> None:
        if self.sock.fileno() != -1:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _started(self, task: asyncio.Task) -> None:
        self._handshakes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a connection could not be set up: %s", task.exception())

    def close(self) -> None:
        if self.sock.fileno() != -1:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        if self._handshakes:
            await asyncio.gather(*self._handshakes, return_exceptions=True)
