"""Paired nDCG@10 statistics: known answers on constructed per-query scores (bootstrap CI, sign-flip
p-value), the CI-bound gate on constructed results, and per-query deltas in a real report.json."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import yaml

from test_validation_run import config, workspace  # noqa: F401  (the tiny models and BEIR set)

from effir_export.validation import run_validation
from effir_export.validation.gates import Gate, evaluate_gates, load_gates
from effir_export.validation.stats import StatsError, paired_difference


def scores(values) -> dict[str, float]:
    return {f"q{i}": float(v) for i, v in enumerate(values)}


def test_identical_runs_differ_by_nothing():
    reference = scores(np.linspace(0.0, 1.0, 30))
    result = paired_difference(reference, reference)
    assert (result.mean, result.ci_low, result.ci_high, result.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert result.per_query == {q: 0.0 for q in reference} and result.queries == 30


@pytest.mark.parametrize("queries", [12, 40])
def test_a_constant_shift_is_the_interval_and_is_significant(queries):
    reference = scores(np.arange(queries) % 5 / 8)  # binary fractions: the means are exact
    candidate = {q: v + 0.25 for q, v in reference.items()}
    result = paired_difference(candidate, reference)
    assert result.mean == result.ci_low == result.ci_high == 0.25 and result.ci_method == "constant"
    if queries == 12:  # exact: only the all-plus and all-minus sign patterns are as extreme, 2 of 2^12
        assert result.p_exact and result.p_value == pytest.approx(2 / 2 ** 12)
    else:  # 10,000 random sign patterns, none as extreme: (0 + 1) / 10,001 per side
        assert not result.p_exact and result.p_value == pytest.approx(2 / 10_001)
    lower = paired_difference(reference, candidate)  # the sign follows candidate - reference
    assert lower.mean == lower.ci_low == lower.ci_high == -0.25


def test_five_queries_sign_flip_p_value_by_hand():
    # deltas 1, 2, 3, 4, -1 (in eighths), sum 9; of the 32 sign patterns of |d| = 1, 2, 3, 4, 1 a sum
    # >= 9 needs the negatives to total <= 1: none flipped, or one of the two 1s: 3 patterns; by
    # symmetry 3 more with sum <= -9, so p = 6 / 32
    reference = scores([0.5] * 5)
    candidate = scores(0.5 + np.array([1, 2, 3, 4, -1]) / 8)
    result = paired_difference(candidate, reference)
    assert result.p_exact and result.p_value == pytest.approx(6 / 32)
    assert result.mean == pytest.approx(9 / 40)
    extreme = sum(abs(sum(s * d for s, d in zip(signs, [1, 2, 3, 4, 1]))) >= 9
                  for signs in itertools.product([1, -1], repeat=5))
    assert extreme == 6
    assert -1 / 8 <= result.ci_low < result.mean < result.ci_high <= 4 / 8  # inside the range of the deltas


def test_the_interval_matches_the_normal_theory_width_on_many_queries_and_is_reproducible():
    rng = np.random.default_rng(7)
    reference = scores(rng.uniform(0.2, 0.8, 400))
    noise = rng.normal(-0.02, 0.1, 400)
    candidate = {q: v + e for (q, v), e in zip(reference.items(), noise)}
    result = paired_difference(candidate, reference)
    half_width = 1.96 * noise.std(ddof=1) / np.sqrt(400)
    assert result.mean == pytest.approx(noise.mean())
    assert result.ci_low == pytest.approx(noise.mean() - half_width, abs=0.15 * half_width)
    assert result.ci_high == pytest.approx(noise.mean() + half_width, abs=0.15 * half_width)
    assert result.ci_method == "BCa" and not result.p_exact and result.p_value < 0.001
    assert paired_difference(candidate, reference) == result  # fixed seed: the same report every run
    other_seed = paired_difference(candidate, reference, seed=1)
    assert other_seed.ci_low != result.ci_low and other_seed.ci_low == pytest.approx(result.ci_low, abs=0.003)


def test_unpaired_scores_are_refused():
    with pytest.raises(StatsError, match="scored different queries .*first 'q2'"):
        paired_difference(scores([0.1, 0.2, 0.3]), scores([0.1, 0.2]))
    with pytest.raises(StatsError, match="no per-query scores"):
        paired_difference({}, {})


def _result(name: str, candidate: dict, reference: dict) -> dict:
    delta = paired_difference(candidate, reference) if candidate is not reference else None
    return {"name": name, "retrieval": {"ndcg_at_10": float(np.mean(list(candidate.values())))},
            "ndcg_at_10_delta": delta and delta.model_dump()}


def test_the_ci_gate_fails_a_small_slice_that_the_point_gate_lets_through(tmp_path):
    pattern = np.array([-0.10, 0.08, -0.05, 0.06, -0.04])  # a mean drop of 1 point
    few_ref = scores([0.5] * 5)
    many_ref = scores([0.5] * 200)
    few = _result("few", scores(0.5 + pattern), few_ref)
    many = _result("many", scores(0.5 + np.tile(pattern, 40)), many_ref)
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump({"gates": [
        {"metric": "max_ndcg_at_10_drop_points", "threshold": 3.0},
        {"metric": "max_ndcg_at_10_drop_upper_points", "threshold": 3.0}]}))
    point, upper = load_gates(tmp_path / "gates.yaml")
    for result, reference in ((few, few_ref), (many, many_ref)):
        ref = _result("reference", reference, reference)
        (point_result,) = evaluate_gates([point], [result], ref)
        (upper_result,) = evaluate_gates([upper], [result], ref)
        assert point_result.passed and point_result.value == pytest.approx(1.0)
        assert upper_result.value == pytest.approx(-100 * result["ndcg_at_10_delta"]["ci_low"])
        assert upper_result.comparison == "<=" and upper_result.value > point_result.value
    assert not evaluate_gates([upper], [few], _result("reference", few_ref, few_ref))[0].passed   # 5 queries: too wide
    assert evaluate_gates([upper], [many], _result("reference", many_ref, many_ref))[0].passed    # 200: bounded
    guard_ref = Gate(metric="max_ndcg_at_10_drop_upper_points", threshold=3.0, backends=["reference"])
    (unmeasured,) = evaluate_gates([guard_ref], [few], _result("reference", few_ref, few_ref))
    assert unmeasured.value is None and not unmeasured.passed  # the reference has no difference to itself


def test_report_json_carries_each_backends_per_query_deltas(workspace, tmp_path):  # noqa: F811
    gates = tmp_path / "gates.yaml"
    gates.write_text(yaml.safe_dump({"gates": [{"metric": "max_ndcg_at_10_drop_upper_points", "threshold": 100.0}]}))
    report = run_validation(config(workspace, latency=None, memory=None, gates=str(gates), out=str(tmp_path / "out")))
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    reference = data["reference"]["retrieval"]["per_query"]
    assert data["reference"]["ndcg_at_10_delta"] is None
    for backend, gate in zip(data["backends"], report.gates):
        delta = backend["ndcg_at_10_delta"]
        expected = {q: backend["retrieval"]["per_query"][q]["ndcg_at_10"] - reference[q]["ndcg_at_10"] for q in reference}
        assert delta["per_query"] == pytest.approx(expected) and len(expected) == 6
        assert delta["mean"] == pytest.approx(backend["retrieval"]["ndcg_at_10"] - data["reference"]["retrieval"]["ndcg_at_10"])
        assert delta["ci_low"] <= delta["mean"] <= delta["ci_high"] and delta["p_exact"] and 0 < delta["p_value"] <= 1
        assert gate.backend == backend["name"] and gate.value == pytest.approx(-100 * delta["ci_low"]) and gate.passed
    markdown = (tmp_path / "out" / "report.md").read_text()
    slim = report.backends[0].ndcg_at_10_delta
    assert "| Δ nDCG@10 pts [95 % CI] | p |" in markdown
    assert f"| {100 * slim.mean:+.2f} [{100 * slim.ci_low:+.2f}, {100 * slim.ci_high:+.2f}] | {slim.p_value:.3g} |" in markdown
