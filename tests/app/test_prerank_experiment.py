"""The pre-ranking experiment's table: means with 95% t-intervals over seeds."""

from __future__ import annotations

import pytest

from freshtower.app.prerank_experiment import PrerankExperimentResult, interval


def test_interval_is_the_mean_and_the_t_half_width():
    assert interval([0.5]) == "0.5000"
    # mean 0.5, sample sd 0.1, n = 3: 4.30 * 0.1 / sqrt(3) = 0.2483
    assert interval([0.4, 0.5, 0.6]) == "0.5000 ± 0.2483"
    assert interval([float("nan")]) == "n/a"


def test_the_table_has_a_row_per_arm():
    result = PrerankExperimentResult(10, 100, [0, 1])
    row = {"ranker_top10_in_top100": 0.9, "ndcg@100": 0.8, "click_auc": 0.7}
    result.per_seed["a"] = [row, row]
    lines = result.table()
    assert lines[0] == "| arm | ranker_top10_in_top100 | ndcg@100 | click_auc |"
    assert lines[2] == "| a | 0.9000 ± 0.0000 | 0.8000 ± 0.0000 | 0.7000 ± 0.0000 |"


def test_the_retrieval_table_has_the_paired_difference_per_seed():
    result = PrerankExperimentResult(10, 100, [0, 1, 2])
    result.retrieval["clicks"] = [{"clicks": 9, "recall@50": r} for r in (0.1, 0.2, 0.3)]
    result.retrieval["distilled"] = [{"clicks": 9, "recall@50": r} for r in (0.2, 0.3, 0.4)]
    lines = result.retrieval_table()
    assert lines[0] == "| arm | next-hour recall@50 |"
    assert lines[2] == "| clicks | 0.2000 ± 0.2483 |"
    # every seed gains exactly 0.1: the paired interval has no width, the unpaired ones do
    assert lines[4] == "| paired difference (distilled - clicks) | 0.1000 ± 0.0000 |"
    assert PrerankExperimentResult(10, 100, [0]).retrieval_table() == []


assert pytest
