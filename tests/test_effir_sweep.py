"""bench/effir_sweep.py: its point syntax and its Pareto front (the sweep itself is a benchmark)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from effir_sweep import pareto, split_point  # noqa: E402


def test_points_name_a_depth_point_and_an_optional_width_cut():
    assert split_point("mlp-12/w30") == ("mlp-12", 0.3)
    assert split_point("attn-6+mlp-3") == ("attn-6+mlp-3", 0.0)
    with pytest.raises(SystemExit, match="/wP with P in 1..99"):
        split_point("mlp-12/30")


def test_the_pareto_front_keeps_points_no_other_beats_on_both_axes():
    def row(name, ms, ndcg):
        return {"point": name, "document_ms": ms, "symmetric": {"ndcg_at_10": ndcg}}

    rows = [row("full", 100, 0.8), row("a", 80, 0.7), row("b", 90, 0.6), row("c", 60, 0.5), row("d", 60, 0.4)]
    assert pareto(rows, "symmetric") == {"full", "a", "c"}  # b is slower and worse than a; d is worse than c
