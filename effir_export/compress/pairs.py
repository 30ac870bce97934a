"""Contrastive training data: query / positive / negatives, from JSONL, a BEIR folder or plain text.

JSONL (one object per line): ``query`` plus ``positive`` (or ``pos``) and optionally ``negative`` /
``negatives`` / ``neg``; each of those may be a string or a list of strings (a list of positives gives
one pair per positive). A BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``)
gives one pair per judged document with score >= 1; judged documents with score <= 0 of the same
query are its hard negatives. A plain-text file (``.txt``, one passage per line) gives self-supervised
pairs by the Inverse Cloze Task (Lee et al., 2019): the query is a random span of a passage and the
positive is the passage, with the span cut out 90 % of the time so matching is not mere copying.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import EffirError
from ..models.embedding import Text


class PairsError(EffirError):
    """Training pairs are missing, empty or malformed."""


@dataclass(frozen=True)
class TrainingPair:
    """One query with a relevant passage and zero or more (hard) negative passages."""

    query: str
    positive: Text  # a BEIR document keeps its title (Document)
    negatives: tuple[Text, ...] = ()


def read_pairs(path: str | Path, split: str = "train", limit: int | None = None, seed: int = 0) -> list[TrainingPair]:
    """Pairs from a JSONL file, a BEIR folder (its ``split`` qrels) or a ``.txt`` file of passages (Inverse
    Cloze Task pairs drawn with ``seed``), in file order, at most ``limit``."""
    path = Path(path)
    if path.is_dir():
        pairs = _beir_pairs(path, split)
    elif path.is_file() and path.suffix == ".txt":
        pairs = inverse_cloze_pairs(path.read_text(encoding="utf-8").splitlines(), seed)
    elif path.is_file():
        pairs = _jsonl_pairs(path)
    else:
        raise PairsError(f"training data '{path}' not found; pass a JSONL file of query/positive/negative, "
                         f"a BEIR folder with qrels/{split}.tsv or a .txt file of passages")
    if not pairs:
        raise PairsError(f"training data '{path}' holds no pairs; each needs a query and a positive passage")
    return pairs[:limit] if limit else pairs


def inverse_cloze_pairs(passages: list[str], seed: int = 0, span: tuple[int, int] = (4, 12),
                        remove: float = 0.9, min_words: int = 16) -> list[TrainingPair]:
    """One pair per passage of at least ``min_words`` words: a random span of ``span`` words is the query,
    the passage (without the span with probability ``remove``) the positive."""
    rng = random.Random(seed)
    pairs = []
    for passage in passages:
        words = passage.split()
        if len(words) < min_words:
            continue
        length = rng.randint(*span)
        start = rng.randint(0, len(words) - length)
        rest = words[:start] + words[start + length:] if rng.random() < remove else words
        pairs.append(TrainingPair(" ".join(words[start:start + length]), " ".join(rest)))
    return pairs


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
