"""Contrastive training data: query / positive / negatives, from JSONL or a BEIR folder.

JSONL (one object per line): ``query`` plus ``positive`` (or ``pos``) and optionally ``negative`` /
``negatives`` / ``neg``; each of those may be a string or a list of strings (a list of positives gives
one pair per positive). A BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``)
gives one pair per judged document with score >= 1; judged documents with score <= 0 of the same
query are its hard negatives.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import EffirError


class PairsError(EffirError):
    """Training pairs are missing, empty or malformed."""


@dataclass(frozen=True)
class TrainingPair:
    """One query with a relevant passage and zero or more (hard) negative passages."""

    query: str
    positive: str
    negatives: tuple[str, ...] = ()


def read_pairs(path: str | Path, split: str = "train", limit: int | None = None) -> list[TrainingPair]:
    """Pairs from a JSONL file or a BEIR folder (its ``split`` qrels), in file order, at most ``limit``."""
    path = Path(path)
    if path.is_dir():
        pairs = _beir_pairs(path, split)
    elif path.is_file():
        pairs = _jsonl_pairs(path)
    else:
        raise PairsError(f"training data '{path}' not found; pass a JSONL file of query/positive/negative "
                         f"or a BEIR folder with qrels/{split}.tsv")
    if not pairs:
        raise PairsError(f"training data '{path}' holds no pairs; each needs a query and a positive passage")
    return pairs[:limit] if limit else pairs


def _texts(value, where: str, key: str) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise PairsError(f"{where}: '{key}' must be a string or a list of strings")
    return [v for v in values if v.strip()]


def _first_key(row: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in row), None)


def _jsonl_pairs(path: Path) -> list[TrainingPair]:
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PairsError(f"{where}: not valid JSON ({exc.msg}); write one object per line") from None
            positive_key = _first_key(row, ("positive", "pos"))
            if not isinstance(row, dict) or not isinstance(row.get("query"), str) or positive_key is None:
                raise PairsError(f"{where}: a training row needs 'query' and 'positive' (or 'pos')")
            negative_key = _first_key(row, ("negatives", "negative", "neg"))
            negatives = tuple(_texts(row[negative_key], where, negative_key)) if negative_key else ()
            for positive in _texts(row[positive_key], where, positive_key):
                pairs.append(TrainingPair(row["query"], positive, negatives))
    return pairs


def _beir_pairs(folder: Path, split: str) -> list[TrainingPair]:
    from ..validation.beir import DatasetError, load_beir

    try:
        data = load_beir(folder, split)
    except DatasetError as exc:
        raise PairsError(str(exc)) from None
    docs = dict(zip(data.corpus_ids, data.corpus_texts))
    pairs = []
    for query_id, query in zip(data.query_ids, data.query_texts):
        judged = data.qrels[query_id]
        negatives = tuple(docs[d] for d, score in judged.items() if score <= 0)
        pairs.extend(TrainingPair(query, docs[d], negatives) for d, score in judged.items() if score >= 1)
    return pairs
