"""bench/overload.py's summary: adaptive over fixed goodput, paired by repeat."""

from __future__ import annotations

import math

from bench.overload import median_row, print_ratios


def cell(goodput: float) -> dict:
    return {"offered": 100.0, "goodput": goodput, "other": {}}


def ratio_lines(out: str) -> dict[str, str]:
    """'against' column -> the row, for the ratio table's rows."""
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 2x |")]
    return {r[2]: " | ".join(r[3:]) for r in rows}


def test_ratios_pair_repeats_and_take_each_repeats_best_fixed(capsys):
    cells = {
        ("run-to-the-end, fixed", 25.0, 2.0): [cell(100), cell(200), cell(90)],
        ("stage-level, fixed", 25.0, 2.0): [cell(150), cell(100), cell(100)],
        ("stage-level, adaptive", 25.0, 2.0): [cell(300), cell(300), cell(300)],
    }
    print_ratios(cells, [2.0], [25.0])
    rows = ratio_lines(capsys.readouterr().out)
    # best fixed per repeat: 150, 200, 100 -> ratios 2.00, 1.50, 3.00, median 2.00 (the ratio
    # of the medians would be 300 / 150 = 2.00 too, but from other repeats' figures)
    assert rows["best fixed"] == "2.00x | 2.00, 1.50, 3.00 |"
    assert rows["run-to-the-end, fixed"] == "3.00x | 3.00, 1.50, 3.33 |"
    assert rows["stage-level, fixed"] == "3.00x | 2.00, 3.00, 3.00 |"


def test_queue_sizes_run_as_configurations_of_their_own(capsys):
    cells = {
        ("stage-level, fixed", 25.0, 2.0): [cell(100), cell(100)],
        ("stage-level, fixed", 50.0, 2.0): [cell(200), cell(50)],
        ("stage-level, adaptive", 25.0, 2.0): [cell(300), cell(300)],
    }
    print_ratios(cells, [2.0], [25.0, 50.0])
    rows = ratio_lines(capsys.readouterr().out)
    assert set(rows) == {"stage-level, fixed, queue 25 ms", "stage-level, fixed, queue 50 ms",
                         "best fixed"}
    assert rows["best fixed"] == "2.25x | 1.50, 3.00 |"


def test_no_ratio_table_without_both_kinds(capsys):
    print_ratios({("stage-level, fixed", 25.0, 2.0): [cell(100)]}, [2.0], [25.0])
    assert capsys.readouterr().out == ""


def test_median_row_keeps_each_repeat_and_tolerates_older_cells():
    runs = [{**cell(g), "throughput": g, "p50": 1.0, "p99": 2.0, "accuracy": 0.9,
             "mean_exit_block": 1.5, "429": 3, "503": 0, "no_connection": 0, "client_cpu": 0.2,
             "client_lag_p99": 1.0} for g in (100, 300, 200)]
    runs[0]["server_cpu"] = 0.9  # cells without the CPU figures (as older results) still sum up
    row = median_row(runs)
    assert row["goodput"] == 200
    assert [r["goodput"] for r in row["repeats"]] == [100, 300, 200]
    assert math.isnan(row["server_cpu"]) and math.isnan(row["repeats"][1]["server_cpu"])
