"""bench/serve_load.py's /proc CPU reader, which overload.py and profile_serve.py share."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.serve_load import stat_cpu_seconds


def test_reads_utime_plus_stime_after_a_command_name_with_spaces_and_parentheses(tmp_path):
    tick = os.sysconf("SC_CLK_TCK")
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    stat = tmp_path / "stat"
    stat.write_text(f"42 (py (worker) 1) S 1 42 42 0 -1 4194304 10 0 0 0 {3 * tick} {tick} 0 0\n")
    assert stat_cpu_seconds(stat) == 4.0


def test_own_process_cpu_grows_with_work():
    own = Path(f"/proc/{os.getpid()}/stat")
    before = stat_cpu_seconds(own)
    end = time.process_time() + 0.05
    while time.process_time() < end:  # burn a little CPU
        pass
    assert stat_cpu_seconds(own) > before
