"""bench/peers.py's cifar-cnn ceilings: one of them at the server's own batch size."""

from __future__ import annotations

from bench.peers import CIFAR_CEILINGS, SERVED_CALLS, same_batch_ceiling


def test_the_servers_mean_batch_is_rounded_and_run_as_the_server_runs_its_calls():
    assert same_batch_ceiling(20.6, CIFAR_CEILINGS) == (21, SERVED_CALLS, False)
    assert same_batch_ceiling(18.4, CIFAR_CEILINGS) == (18, SERVED_CALLS, False)


def test_no_second_ceiling_when_the_list_has_that_batch_already():
    assert (32, SERVED_CALLS, False) in CIFAR_CEILINGS
    assert same_batch_ceiling(31.8, CIFAR_CEILINGS) is None


def test_a_server_that_never_batched_still_gets_one_row():
    assert same_batch_ceiling(0.0, CIFAR_CEILINGS) == (1, SERVED_CALLS, False)
