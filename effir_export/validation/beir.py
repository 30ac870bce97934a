"""BEIR-layout data (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), deterministic slices, exact
inner-product search chunked over the corpus, and nDCG@10 / recall@100 / MRR@10 with pytrec_eval
under BEIR's conventions."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytrec_eval

from ..errors import DatasetError
from ..hashing import hash_files
from ..models.embedding import Document
from .config import SliceConfig

TOP_K = 100


@dataclass(frozen=True)
class BeirData:
    """A BEIR set (or a slice of one): texts in file order, graded qrels of judged queries only."""

    path: Path
    corpus_ids: list[str]
    corpus_texts: list[Document]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    fingerprint: str
    slice: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"path": str(self.path), "fingerprint": self.fingerprint, "queries": len(self.query_ids),
                "documents": len(self.corpus_ids), "judgments": sum(len(d) for d in self.qrels.values()),
                "slice": self.slice or None}


def load_beir(folder: str | Path, split: str = "test") -> BeirData:
    """Read a BEIR folder; only judged queries are kept (as BEIR does). Documents keep title and text
    apart (:class:`Document`); each model's embedding settings compose them. Fails clearly on missing
    files, bad lines and dangling judgments."""
    folder = Path(folder)
    files = {"corpus": folder / "corpus.jsonl", "queries": folder / "queries.jsonl",
             "qrels": folder / "qrels" / f"{split}.tsv"}
    if not folder.is_dir():
        raise DatasetError(f"BEIR folder '{folder}' not found; pass a folder with corpus.jsonl, queries.jsonl, qrels/")
    for role, path in files.items():
        if not path.is_file():
            raise DatasetError(f"BEIR folder '{folder}' has no {path.relative_to(folder)}; a BEIR folder needs "
                               f"corpus.jsonl, queries.jsonl and qrels/{split}.tsv")
    corpus = {row["_id"]: Document(str(row.get("title") or ""), row["text"]) for row in _jsonl(files["corpus"])}
    queries = {row["_id"]: row["text"] for row in _jsonl(files["queries"])}
    if empty := [q for q, text in queries.items() if not text.strip()]:
        raise DatasetError(f"{files['queries']}: {len(empty)} quer(ies) have empty text (first: '{empty[0]}'); "
                           "fill them in or remove them and their qrels")
    qrels = _read_qrels(files["qrels"])
    missing_docs = sorted({d for docs in qrels.values() for d in docs if d not in corpus})
    if missing_docs:
        raise DatasetError(f"{files['qrels']}: {len(missing_docs)} judged document(s) are not in corpus.jsonl "
                           f"(first: '{missing_docs[0]}'); fix the qrels or restore the corpus")
    missing_queries = sorted(q for q in qrels if q not in queries)
    if missing_queries:
        raise DatasetError(f"{files['qrels']}: {len(missing_queries)} judged query id(s) are not in queries.jsonl "
                           f"(first: '{missing_queries[0]}'); add them to queries.jsonl or fix the qrels")
    judged = [q for q in queries if q in qrels]
    if not judged:
        raise DatasetError(f"{files['qrels']}: no query in queries.jsonl has a judgment")
    return BeirData(folder, list(corpus), list(corpus.values()), judged, [queries[q] for q in judged],
                    {q: qrels[q] for q in judged}, hash_files(list(files.values())))


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if "_id" not in row or not isinstance(row.get("text"), str):
                raise DatasetError(f"{path}:{number}: a BEIR row needs '_id' and 'text'")
            row["_id"] = str(row["_id"])
            rows.append(row)
    return rows


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t"), 1):
            if not row or (number == 1 and len(row) == 3 and not _is_int(row[2])):
                continue  # blank line or the optional header
            if len(row) != 3 or not _is_int(row[2]):
                raise DatasetError(f"{path}:{number}: expected 'query-id<TAB>corpus-id<TAB>score', got {row!r}")
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def slice_beir(data: BeirData, config: SliceConfig | None) -> BeirData:
    """The first ``queries`` judged queries, all their judged documents (``judged: relevant``: their
    relevant ones, then their judged non-relevant ones), then other documents, each group ordered by
    sha256(seed:id), up to ``documents`` in all; corpus order is kept. Identical inputs give identical
    slices on every machine (no RNG stream involved)."""
    if config is None or (config.queries is None and config.documents is None):
        return data
    query_ids = data.query_ids[: config.queries] if config.queries else data.query_ids
    qrels = {q: data.qrels[q] for q in query_ids}
    judged = {d for docs in qrels.values() for d in docs}
    budget = config.documents if config.documents is not None else len(data.corpus_ids)
    def by_hash(ids) -> list[str]:
        return sorted(ids, key=lambda d: hashlib.sha256(f"{config.seed}:{d}".encode()).hexdigest())

    others = by_hash(d for d in data.corpus_ids if d not in judged)
    if config.judged == "relevant":
        must = {d for docs in qrels.values() for d, score in docs.items() if score > 0}
        others = by_hash(judged - must) + others
    else:
        must = judged
    keep = must | set(others[: max(0, budget - len(must))])
    rows = [(d, t) for d, t in zip(data.corpus_ids, data.corpus_texts) if d in keep]
    ids_hash = hashlib.sha256(json.dumps([query_ids, [d for d, _ in rows]]).encode()).hexdigest()[:16]
    info = {**config.model_dump(), "selected_queries": len(query_ids), "selected_documents": len(rows),
            "judged_documents": len(judged), "ids_sha256_16": ids_hash}
    texts = dict(zip(data.query_ids, data.query_texts))
    return replace(data, corpus_ids=[d for d, _ in rows], corpus_texts=[t for _, t in rows], query_ids=query_ids,
                   query_texts=[texts[q] for q in query_ids], qrels=qrels,
                   fingerprint=hashlib.sha256(f"{data.fingerprint}:{ids_hash}".encode()).hexdigest()[:16], slice=info)


def search(query_embeddings: np.ndarray, corpus_embeddings: np.ndarray, query_ids: list[str],
           corpus_ids: list[str], top_k: int = TOP_K, chunk: int = 8192) -> dict[str, dict[str, float]]:
    """Exact top-k by cosine (rows normalised here), one corpus chunk at a time, so memory stays
    queries x chunk. A document whose id equals the query id is never returned (BEIR). Ties are broken
    as trec_eval ranks them (higher document id first), so truncation at k is deterministic."""
    queries = _normalise(query_embeddings)
    tie_rank = np.empty(len(corpus_ids), dtype=np.int64)  # 0 = the id trec_eval ranks first among equals
    tie_rank[np.argsort(np.array(corpus_ids, dtype=object))[::-1]] = np.arange(len(corpus_ids))
    position = {d: i for i, d in enumerate(corpus_ids)}
    self_hit = np.array([position.get(q, -1) for q in query_ids])
    best_scores = np.zeros((len(query_ids), 0), dtype=np.float32)
    best_index = np.zeros((len(query_ids), 0), dtype=np.int64)
    for start in range(0, len(corpus_ids), chunk):
        docs = _normalise(corpus_embeddings[start:start + chunk])
        chunk_scores = queries @ docs.T
        rows = np.nonzero((self_hit >= start) & (self_hit < start + len(docs)))[0]
        chunk_scores[rows, self_hit[rows] - start] = -np.inf
        scores = np.concatenate([best_scores, chunk_scores], axis=1)
        index = np.concatenate([best_index, np.tile(np.arange(start, start + len(docs)), (len(query_ids), 1))], axis=1)
        picked = np.stack([_top_k(scores[r], tie_rank[index[r]], top_k) for r in range(len(query_ids))])
        best_scores = np.take_along_axis(scores, picked, axis=1)
        best_index = np.take_along_axis(index, picked, axis=1)
    return {q: {corpus_ids[i]: float(s) for i, s in zip(best_index[r], best_scores[r]) if np.isfinite(s)}
            for r, q in enumerate(query_ids)}


def _top_k(scores: np.ndarray, tie_rank: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores, ordered by score then ``tie_rank`` (ties at the cut included)."""
    k = min(k, len(scores))
    candidates = np.arange(len(scores))
    if len(scores) > k:
        threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
        candidates = np.nonzero(scores >= threshold)[0]
    return candidates[np.lexsort((tie_rank[candidates], -scores[candidates]))][:k]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> dict:
    """nDCG@10, recall@100 and MRR@10 with pytrec_eval (graded relevance; relevant = score >= 1),
    averaged over the queries that have judgments, plus the per-query values."""
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: (-kv[1], _desc(kv[0])))[:10]) for q, docs in run.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    rows = {q: {"ndcg_at_10": v["ndcg_cut_10"], "recall_at_100": v["recall_100"],
                "mrr_at_10": mrr[q]["recip_rank"]} for q, v in per_query.items()}
    means = {m: float(np.mean([r[m] for r in rows.values()])) if rows else 0.0
             for m in ("ndcg_at_10", "recall_at_100", "mrr_at_10")}
    return {**means, "queries": len(rows), "per_query": rows}


class _desc(str):
    """Sort key that orders strings descending (trec_eval puts the higher document id first on ties)."""

    def __lt__(self, other: str) -> bool:
        return str.__gt__(self, other)
