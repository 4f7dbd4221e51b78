"""bench/peers.py's core accounting: which thread of the server, the load generator, or nobody
used the machine's cores while a load run went on."""

from __future__ import annotations

import os
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
if sys.argv[1] == "thread":
    threading.Thread(target=spin, daemon=True).start()
    print("ready", flush=True)
    time.sleep(20)
else:
    print("ready", flush=True)
    spin()
"""


@pytest.fixture(params=["main", "thread"])
def spinner(request):
    """A process that keeps one core busy on its main thread or on a second thread."""
    proc = subprocess.Popen([sys.executable, "-c", SPINNER, request.param], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield request.param, proc.pid
    proc.kill()
    proc.wait()


def test_the_busy_thread_is_charged_to_the_loop_or_to_the_other_threads(spinner):
    where, pid = spinner
    _, cores = with_core_use(pid, lambda: time.sleep(0.5))
    busy, quiet = (cores.loop, cores.threads) if where == "main" else (cores.threads, cores.loop)
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
