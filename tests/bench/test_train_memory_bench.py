"""bench/train_memory.py's malloc cells: glibc or jemalloc, each optionally with its settings."""

from __future__ import annotations

import argparse

import pytest

from bench.train_memory import allocator_env, parse_malloc, variant
from training import allocator


def test_a_malloc_spec_is_a_name_and_optional_settings():
    assert parse_malloc("glibc") == ("glibc", "")
    assert parse_malloc("jemalloc:dirty_decay_ms:-1,oversize_threshold:0") == (
        "jemalloc", "dirty_decay_ms:-1,oversize_threshold:0")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_malloc("tcmalloc")


def test_glibc_cells_get_their_tunables_and_nothing_preloaded(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:0")
    env = allocator_env("glibc:glibc.malloc.mmap_threshold=4194304")
    assert "LD_PRELOAD" not in env and "MALLOC_CONF" not in env
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.mmap_threshold=4194304"
    assert "GLIBC_TUNABLES" not in allocator_env("glibc")


def test_jemalloc_cells_run_as_hff_train_does_unless_settings_are_given(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "libjemalloc.so.2")
    monkeypatch.setenv("MALLOC_CONF", "from-the-shell")  # never leaks into a cell
    assert allocator_env("jemalloc")["MALLOC_CONF"] == allocator.DEFAULT_MALLOC_CONF
    env = allocator_env("jemalloc:dirty_decay_ms:10000,oversize_threshold:8388608")
    assert env["MALLOC_CONF"] == "dirty_decay_ms:10000,oversize_threshold:8388608"
    assert env["LD_PRELOAD"].startswith("libjemalloc.so.2")


def test_a_row_label_names_the_objective_and_hffs_micro_batches():
    assert variant("hff") == ("hff", 1)
    assert variant("hff/4") == ("hff", 4)
    assert variant("backprop") == ("backprop", 1)
