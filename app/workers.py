"""hff-serve in several processes on one port (HFF_WORKERS > 1): a supervisor and its workers.

One process's Python is the bound of a small model's requests/s: the event loop parses, routes,
batches and answers every request on one core (README, "Request path"). With HFF_WORKERS=N the
`hff-serve` process becomes a supervisor that starts N workers; each is the single-process server
(uvicorn, the hot path, its own batcher and onnxruntime session) listening on the same address
with SO_REUSEPORT, so the kernel spreads the connections over them. Each worker batches the
requests of its own connections; app.peers makes /metrics, readiness and model control answer
for all of them.

The supervisor:
- reserves the port (bound, never listening, so a port of 0 becomes one port for every worker);
- forwards SIGTERM and SIGINT to every worker as SIGTERM: each drains as one process does
  (README, "Operations"), and the supervisor exits 0 once all have exited 0;
- when a worker exits by itself (its model failed, or it was killed), stops the others and
  exits non-zero: the service runs whole or not at all, and its orchestrator restarts it.

Workers run in their own session (a terminal's Ctrl-C reaches the supervisor, which drains
them) and get SIGTERM when the supervisor dies (PR_SET_PDEATHSIG), so none is left behind.
Each worker's admission bounds, connection limit and queues are its own; its onnxruntime threads
default to the cores divided among the workers.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path
from shutil import rmtree

from app.settings import Settings

log = logging.getLogger("app.workers")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 5.0  # after the workers' own shutdown timeout, before they are killed
WATCH_EVERY_S = 1.0  # how often the supervisor looks at the clock while it waits


def bind_reuseport(host: str, port: int, reuse_port: bool = True) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT: every worker binds its own, and the
    kernel spreads the connections among those that listen."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def claim_port(host: str, port: int) -> socket.socket:
    """The port for the workers, held by a SO_REUSEPORT socket that never listens. Bound once
    without SO_REUSEPORT first: that bind fails when anything holds the port, so a second
    hff-serve started on it by mistake is refused instead of silently sharing its connections
    (the kernel would spread them over both services' sockets)."""
    with bind_reuseport(host, port, reuse_port=False) as exclusive:
        port = exclusive.getsockname()[1]  # port 0: the one the kernel chose
    return bind_reuseport(host, port)


def supervise(settings: Settings) -> int:
    """Run settings.WORKERS workers until SIGTERM/SIGINT (exit 0 when every worker drained) or
    until one of them exits by itself (exit 1, or 2 when its settings or model were refused)."""
    try:
        reserved = claim_port(settings.HOST, settings.PORT)
    except OSError as e:
        print(f"hff-serve: error: cannot listen on {settings.HOST} port {settings.PORT}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 1
    port = reserved.getsockname()[1]
    settings = settings.model_copy(update={"PORT": port})
    try:  # 0700: the workers' control sockets
        run_dir = Path(tempfile.mkdtemp(prefix="hff-serve-"))
    except OSError as e:
        reserved.close()
        print(f"hff-serve: error: the workers need a writable temporary directory for their "
              f"control sockets (TMPDIR): {e}", file=sys.stderr)
        return 1
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads forked
    workers = [spawn.Process(target=worker_main, args=(settings, i, run_dir, os.getpid()),
                             name=f"hff-worker-{i}") for i in range(settings.WORKERS)]
    stopping: list[int] = []  # the signal that asked for the stop

    def stop(sig: int, frame: object) -> None:
        if not stopping:
            log.info("supervisor: %s, draining %d workers", signal.Signals(sig).name,
                     len(workers))
        stopping.append(sig)
        for w in workers:
            if w.pid is not None and w.exitcode is None:
                os.kill(w.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for w in workers:
            w.start()
            if stopping:
                os.kill(w.pid, signal.SIGTERM)  # type: ignore[arg-type]
        log.info("supervisor: %d workers on %s port %d", len(workers), settings.HOST, port)
        code = watch(workers, stopping, settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        reserved.close()
        rmtree(run_dir, ignore_errors=True)
    return code


def watch(workers: list, stopping: list[int], settings: Settings) -> int:
    """Wait for the workers; the first to exit unasked stops the rest, and what has not exited
    by the shutdown timeout (and a grace) after the stop began is killed. The exit status."""
    running = {w.sentinel: w for w in workers}
    code = 0
    deadline: float | None = None  # set once stopping: the signal handler may set it any time
    while running:
        if stopping and deadline is None:
            deadline = time.monotonic() + settings.SHUTDOWN_TIMEOUT_S + STOP_GRACE_S
        if deadline is not None and time.monotonic() > deadline:
            for w in running.values():
                log.error("supervisor: worker %s did not exit; killing it", w.name)
                w.kill()
            deadline = float("inf")  # killed once; SIGKILL cannot be ignored
        for sentinel in wait(list(running), timeout=WATCH_EVERY_S):
            w = running.pop(sentinel)
            w.join()
            if w.exitcode != 0 and code == 0:
                code = 2 if w.exitcode == 2 else 1
            if not stopping:
                log.error("supervisor: worker %s exited with status %s; stopping the others",
                          w.name, w.exitcode)
                code = code or 1
                stopping.append(signal.SIGTERM)
                for other in running.values():
                    os.kill(other.pid, signal.SIGTERM)
    return code


def worker_main(settings: Settings, index: int, run_dir: Path, supervisor: int) -> None:
    """One worker: the single-process server on its own SO_REUSEPORT socket."""
    os.setsid()  # a terminal's Ctrl-C reaches only the supervisor, which drains us
    with_parent_death_signal(supervisor)
    from app.main import configure_logging, create_app, run_server
    from app.peers import WorkerPeers
    from app.runtime import available_cores

    if settings.THREADS == 0:  # the cores shared out among the workers
        settings = settings.model_copy(
            update={"THREADS": max(1, available_cores() // settings.WORKERS)})
    configure_logging(settings, worker=index)
    try:
        app = create_app(settings)
    except Exception as e:  # the supervisor checked the settings; the model may still refuse
        log.error("worker %d: %s", index, e)
        sys.exit(2)
    app.state.peers = WorkerPeers(run_dir, index, settings.WORKERS, app.state.repository)
    sock = bind_reuseport(settings.HOST, settings.PORT)
    sys.exit(run_server(app, settings, sockets=[sock]))


def with_parent_death_signal(supervisor: int) -> None:
    """SIGTERM this process when the supervisor dies (Linux), and exit now if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor still stops us on its way out
        pass
    if os.getppid() != supervisor:
        sys.exit(1)
