"""Paired comparison of per-query scores (a backend's nDCG@10 against the reference's on the same
queries): the mean difference, a paired bootstrap confidence interval over queries and a two-sided
paired randomization (sign-flip) test p-value, both from :mod:`scipy.stats` with a fixed seed, so the
same scores always give the same report."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from pydantic import BaseModel
from scipy import stats

from ..errors import EffirError

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
EXACT_MAX_QUERIES = 16  # up to 2^16 sign patterns are enumerated; beyond, RESAMPLES random ones
_BATCH = 256  # resamples per vectorised batch (memory: batch x queries)


class StatsError(EffirError):
    """Per-query scores that cannot be paired (different queries, or none)."""


class PairedDifference(BaseModel):
    """``candidate − reference`` over the same queries (positive: the candidate scores higher).

    ``mean`` is the mean per-query difference (= the difference of the means); ``ci_low``/``ci_high``
    the paired bootstrap interval at ``confidence`` (BCa over queries; exactly ``[mean, mean]`` when
    every query differs by the same amount); ``p_value`` the two-sided sign-flip test of "no
    difference" (``p_exact``: every one of the 2^n sign patterns enumerated, else ``resamples`` random
    ones); ``per_query`` each query's difference."""

    metric: str
    queries: int
    mean: float
    ci_low: float
    ci_high: float
    confidence: float
    ci_method: str
    p_value: float
    p_exact: bool
    resamples: int
    seed: int
    per_query: dict[str, float]


def _mean_difference(candidate: np.ndarray, reference: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(candidate - reference, axis=axis)


def paired_difference(candidate: Mapping[str, float], reference: Mapping[str, float], metric: str = "ndcg_at_10",
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED) -> PairedDifference:
    """Compare two runs' per-query scores (query id -> score; both must judge the same queries)."""
    if set(candidate) != set(reference):
        only = sorted(set(candidate) ^ set(reference))
        raise StatsError(f"{metric}: the runs scored different queries ({len(only)} in one only, first '{only[0]}'); "
                         "compare runs over the same judged queries")
    if not candidate:
        raise StatsError(f"{metric}: no per-query scores to compare; the data needs judged queries")
    ids = sorted(candidate)
    c = np.array([candidate[q] for q in ids], dtype=np.float64)
    r = np.array([reference[q] for q in ids], dtype=np.float64)
    deltas = c - r
    mean = float(np.mean(deltas))
    if np.all(deltas == deltas[0]):  # no spread: every resample has the same mean (BCa is undefined)
        low, high, method = mean, mean, "constant"
    else:
        ci = stats.bootstrap((c, r), _mean_difference, paired=True, vectorized=True, n_resamples=resamples,
                             batch=_BATCH, confidence_level=confidence, method="BCa",
                             rng=np.random.default_rng(seed)).confidence_interval
        low, high, method = float(ci.low), float(ci.high), "BCa"
    exact = len(ids) <= EXACT_MAX_QUERIES
    p_value = 1.0  # one query: its two sign patterns are mirror images, as extreme as each other
    if len(ids) > 1:
        p_value = float(stats.permutation_test((c, r), _mean_difference, permutation_type="samples", vectorized=True,
                                               n_resamples=np.inf if exact else resamples, batch=_BATCH,
                                               alternative="two-sided", rng=np.random.default_rng(seed)).pvalue)
    return PairedDifference(metric=metric, queries=len(ids), mean=mean, ci_low=low, ci_high=high,
                            confidence=confidence, ci_method=method, p_value=p_value, p_exact=exact,
                            resamples=resamples, seed=seed,
                            per_query={q: float(d) for q, d in zip(ids, deltas)})
