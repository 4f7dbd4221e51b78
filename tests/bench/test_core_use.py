"""bench/peers.py's core accounting: which thread of the server, the load generator, or nobody
used the machine's cores while a load run went on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from bench.peers import with_core_use

SPINNER = """
import sys, threading, time
def spin():
    end = time.monotonic() + 20
    while time.monotonic() < end:
        pass
if sys.argv[1] == "child":  # a supervisor whose worker process spins (HFF_WORKERS)
    import subprocess
    subprocess.Popen([sys.executable, "-c", "import time; end = time.monotonic() + 20; "
                      "any(time.monotonic() > end for _ in iter(int, 1))"])
    print("ready", flush=True)
    time.sleep(20)
elif sys.argv[1] == "thread":
    threading.Thread(target=spin, daemon=True).start()
    print("ready", flush=True)
    time.sleep(20)
else:
    print("ready", flush=True)
    spin()
"""


@pytest.fixture(params=["main", "thread", "child"])
def spinner(request):
    """A process that keeps one core busy on its main thread, on a second thread, or on its
    child process's main thread."""
    proc = subprocess.Popen([sys.executable, "-c", SPINNER, request.param], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # its group: the child too
    assert proc.stdout.readline().strip() == "ready"
    yield request.param, proc.pid
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_the_busy_thread_is_charged_to_the_loop_or_to_the_other_threads(spinner):
    # a worker process's main thread runs its event loop: charged to the loop too
    where, pid = spinner
    _, cores = with_core_use(pid, lambda: time.sleep(0.5))
    busy, quiet = (cores.threads, cores.loop) if where == "thread" else (cores.loop, cores.threads)
    assert busy > quiet


def test_the_shares_add_up_to_the_machines_cores_and_the_generators_own_cpu_counts(spinner):
    _, pid = spinner

    def generate_load():  # the bench's own CPU stands in for the load generator
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
        return {"throughput": 1.0}

    result, cores = with_core_use(pid, generate_load)
    assert result == {"throughput": 1.0}
    assert cores.load > 0
    assert sum(cores) == pytest.approx(os.cpu_count(), abs=0.1)
