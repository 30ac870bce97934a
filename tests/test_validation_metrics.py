"""BEIR loading/slicing, exact search and pytrec_eval metrics, fidelity, gates and backend specs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from effir_export.errors import DatasetError, EffirError
from effir_export.validation.backends import BackendError, BackendSpec, build_backend
from effir_export.validation.beir import evaluate, load_beir, search, slice_beir
from effir_export.validation.config import SliceConfig
from effir_export.validation.fidelity import fidelity
from effir_export.validation.gates import Gate, GateError, check_gates, evaluate_gates, load_gates


def write_beir(folder, corpus, queries, qrels, header=True):
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": t, "text": x}) + "\n"
                                                 for i, (t, x) in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": x}) + "\n" for i, x in queries.items()))
    rows = ["query-id\tcorpus-id\tscore"] if header else []
    rows += [f"{q}\t{d}\t{s}" for q, docs in qrels.items() for d, s in docs.items()]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


CORPUS = {f"d{i}": (f"title {i}", f"text of document {i}") for i in range(20)}
QUERIES = {"q1": "first", "q2": "second", "q3": "unjudged", "q4": "fourth"}
QRELS = {"q1": {"d1": 2, "d2": 1, "d3": 0}, "q2": {"d5": 1}, "q4": {"d7": 1, "d8": 2}}


def test_ndcg_mrr_recall_equal_the_textbook_values():
    qrels = {"q": {"d1": 2, "d2": 1, "d3": 0}}
    run = {"q": {"d3": 0.9, "d1": 0.8, "d4": 0.7, "d2": 0.6}}
    got = evaluate(qrels, run)
    dcg = 0 / math.log2(2) + 2 / math.log2(3) + 0 / math.log2(4) + 1 / math.log2(5)  # trec_eval: gain = grade
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert got["ndcg_at_10"] == pytest.approx(dcg / idcg, abs=1e-6)
    assert got["mrr_at_10"] == pytest.approx(0.5)
    assert got["recall_at_100"] == pytest.approx(1.0)
    assert got["per_query"]["q"]["ndcg_at_10"] == pytest.approx(0.643317, abs=1e-5)


def test_mrr_is_cut_at_10_and_ties_rank_the_higher_id_first():
    qrels = {"q": {"z": 1}}
    eleven = {f"n{i:02d}": 1.0 - i / 100 for i in range(10)} | {"z": 0.5}
    assert evaluate(qrels, {"q": eleven})["mrr_at_10"] == 0.0  # plain recip_rank would give 1/11
    tied = {"a": 1.0, "z": 1.0}
    assert evaluate(qrels, {"q": tied})["mrr_at_10"] == 1.0
    assert evaluate({"q": {"a": 1}}, {"q": tied})["mrr_at_10"] == 0.5


def test_search_is_exact_chunk_independent_and_skips_the_query_own_id():
    rng = np.random.default_rng(0)
    queries, corpus = rng.normal(size=(5, 8)), rng.normal(size=(300, 8))
    corpus[7] = corpus[8]  # an exact tie
    ids = [f"d{i:03d}" for i in range(300)]
    qids = ["q0", "d005", "q2", "q3", "q4"]  # the second query shares an id with a document
    small = search(queries, corpus, qids, ids, top_k=20, chunk=7)
    whole = search(queries, corpus, qids, ids, top_k=20, chunk=10_000)
    for q in qids:  # same documents in the same order; scores equal up to BLAS rounding (chunk shapes differ)
        assert list(small[q]) == list(whole[q])
        np.testing.assert_allclose(list(small[q].values()), list(whole[q].values()), rtol=0, atol=1e-6)
    normed = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    for row, q in enumerate(qids):
        scores = normed @ (queries[row] / np.linalg.norm(queries[row]))
        order = [i for i in np.argsort(-scores, kind="stable") if ids[i] != q][:20]
        assert set(small[q]) == {ids[i] for i in order}
    assert "d005" not in small["d005"]


def test_load_keeps_judged_queries_and_titles_and_header_is_optional(tmp_path):
    from effir_export.models.embedding import Document, EmbeddingConfig

    with_header = load_beir(write_beir(tmp_path / "a", CORPUS, QUERIES, QRELS))
    without = load_beir(write_beir(tmp_path / "b", CORPUS, QUERIES, QRELS, header=False))
    assert with_header.query_ids == ["q1", "q2", "q4"] == without.query_ids
    assert with_header.qrels == without.qrels == QRELS
    assert with_header.corpus_texts[3] == Document("title 3", "text of document 3")
    plain = EmbeddingConfig(document_prompt="passage: ")
    assert plain.render(with_header.corpus_texts[3], "document") == "passage: title 3 text of document 3"
    gemma = EmbeddingConfig(document_prompt="title: {title} | text: ")
    assert gemma.render(with_header.corpus_texts[3], "document") == "title: title 3 | text: text of document 3"
    assert gemma.render(Document("", "x"), "document") == gemma.render("x", "document") == "title: none | text: x"


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "qrels" / "test.tsv").unlink(), "has no qrels/test.tsv"),
    (lambda f: (f / "qrels" / "test.tsv").write_text("q1\tmissing-doc\t1\n"), "not in corpus.jsonl"),
    (lambda f: (f / "qrels" / "test.tsv").write_text("q9\td1\t1\n"), "not in queries.jsonl"),
    (lambda f: (f / "corpus.jsonl").write_text('{"_id": "d1", "text": "x"}\n{broken\n'), "corpus.jsonl:2: not valid JSON"),
    (lambda f: (f / "qrels" / "test.tsv").write_text("q1\td1\t1\nq2\td5\n"), "test.tsv:2: expected 'query-id<TAB>"),
])
def test_bad_beir_folders_fail_clearly(tmp_path, damage, message):
    folder = write_beir(tmp_path / "data", CORPUS, QUERIES, QRELS)
    damage(folder)
    with pytest.raises(DatasetError, match=message):
        load_beir(folder)


def test_slices_are_deterministic_keep_judged_documents_and_record_themselves(tmp_path):
    data = load_beir(write_beir(tmp_path / "data", CORPUS, QUERIES, QRELS))
    first = slice_beir(data, SliceConfig(queries=2, documents=8, seed=1))
    assert first.query_ids == ["q1", "q2"]
    assert {"d1", "d2", "d3", "d5"} <= set(first.corpus_ids) and len(first.corpus_ids) == 8
    assert first.corpus_ids == [d for d in data.corpus_ids if d in first.corpus_ids]  # corpus order kept
    assert slice_beir(data, SliceConfig(queries=2, documents=8, seed=1)).corpus_ids == first.corpus_ids
    other = slice_beir(data, SliceConfig(queries=2, documents=8, seed=2))
    assert other.corpus_ids != first.corpus_ids and other.fingerprint != first.fingerprint
    assert first.summary()["slice"]["judged_documents"] == 4 and first.fingerprint != data.fingerprint
    assert slice_beir(data, None) is data


def test_fidelity_statistics():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(200, 16))
    stats = fidelity(ref * 3.0, ref)
    assert stats.min == pytest.approx(1.0) and stats.texts == 200
    noisy = fidelity(ref + rng.normal(scale=0.5, size=ref.shape), ref)
    assert noisy.min <= noisy.p1 <= noisy.mean < 1.0
    with pytest.raises(EffirError, match="same width"):
        fidelity(ref[:, :8], ref)


RESULTS = [{"name": "good", "retrieval": {"ndcg_at_10": 0.50, "recall_at_100": 0.9}, "fidelity": {"min": 0.999},
            "disk_bytes": 50_000_000, "memory": None, "speedup": {"query": 1.5}},
           {"name": "bad", "retrieval": {"ndcg_at_10": 0.40, "recall_at_100": 0.8}, "fidelity": {"min": 0.7},
            "disk_bytes": 150_000_000, "memory": None, "speedup": None}]
REFERENCE = {"name": "ref", "retrieval": {"ndcg_at_10": 0.51, "recall_at_100": 0.9}, "fidelity": None,
             "disk_bytes": 100_000_000, "memory": None, "speedup": {"query": 1.0}}


def test_gates_compare_values_with_thresholds():
    gates = [Gate(metric="min_cosine", threshold=0.99), Gate(metric="max_ndcg_at_10_drop_points", threshold=2.0),
             Gate(metric="max_size_mb", threshold=100), Gate(metric="min_query_speedup", threshold=1.2)]
    out = {(g.metric, g.backend): g for g in evaluate_gates(gates, RESULTS, REFERENCE)}
    assert out["min_cosine", "good"].passed and not out["min_cosine", "bad"].passed
    assert out["max_ndcg_at_10_drop_points", "good"].value == pytest.approx(1.0)
    assert out["max_ndcg_at_10_drop_points", "bad"].value == pytest.approx(11.0)
    assert not out["max_ndcg_at_10_drop_points", "bad"].passed
    assert out["max_size_mb", "good"].passed and not out["max_size_mb", "bad"].passed
    assert out["min_query_speedup", "good"].passed
    assert out["min_query_speedup", "bad"].value is None and not out["min_query_speedup", "bad"].passed
    only_ref = evaluate_gates([Gate(metric="min_ndcg_at_10", threshold=0.5, backends=["ref"])], RESULTS, REFERENCE)
    assert [(g.backend, g.passed) for g in only_ref] == [("ref", True)]


def test_gate_files_fail_clearly(tmp_path):
    path = tmp_path / "gates.yaml"
    path.write_text("gates:\n  - {metric: min_cosine, threshold: 0.99}\n  - {metric: max_ndcg_at_10_drop_points, threshold: 1}\n")
    assert [g.metric for g in load_gates(path)] == ["min_cosine", "max_ndcg_at_10_drop_points"]
    path.write_text("gates:\n  - {metric: max_banana, threshold: 1}\n")
    with pytest.raises(GateError, match="unknown metric 'max_banana'; known: min_cosine"):
        load_gates(path)
    path.write_text("gates:\n  - {metric: min_cosine}\n")
    with pytest.raises(GateError, match="threshold"):
        load_gates(path)
    with pytest.raises(GateError, match="not found"):
        load_gates(tmp_path / "missing.yaml")
    with pytest.raises(GateError, match="unknown backend"):
        check_gates([Gate(metric="min_cosine", threshold=1, backends=["nope"])], ["ref", "a"], {"latency"})
    with pytest.raises(GateError, match="needs the latency measurement"):
        check_gates([Gate(metric="min_document_speedup", threshold=1)], ["ref", "a"], {"memory"})


def test_backend_specs_parse_and_fail_clearly(tmp_path):
    assert BackendSpec.parse("torch:minilm-l6") == BackendSpec("torch", "minilm-l6", "torch:minilm-l6")
    named = BackendSpec.parse("fp16=onnx:out/onnx-fp16")
    assert (named.name, named.kind, named.artifact) == ("fp16", "onnx", "out/onnx-fp16")
    assert BackendSpec.parse(str(named)) == named
    with pytest.raises(BackendError, match="is not \\[NAME=\\]KIND:ARTIFACT"):
        BackendSpec.parse("minilm-l6")
    with pytest.raises(BackendError, match="unknown backend kind 'jax'.*known kinds: gptq, gptq-bf16, onnx, openvino, tensorrt, torch"):
        build_backend("jax:model")
    with pytest.raises(BackendError, match="'\\{model\\}', a placeholder that `effir-export build` fills"):
        build_backend("compressed=torch:{model}")
    with pytest.raises(BackendError, match="no model.onnx"):
        build_backend(f"onnx:{tmp_path}")


def test_tensorrt_backend_fails_clearly_without_its_runtime(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(BackendError, match="tensorrt backend needs the 'tensorrt' Python package"):
        build_backend(f"tensorrt:{tmp_path}")


def test_gptq_backend_rejects_a_folder_that_is_not_a_gptq_checkpoint(tmp_path):
    pytest.importorskip("effir_export.export.gptq_loader")
    with pytest.raises(EffirError, match="no effir_files.json.*export gptq"):
        build_backend(f"gptq:{tmp_path}")


def test_relevant_slices_cap_documents_keep_relevant_ones_and_fill_with_hard_negatives_first(tmp_path):
    data = load_beir(write_beir(tmp_path / "data", CORPUS, QUERIES, QRELS))
    capped = slice_beir(data, SliceConfig(queries=2, documents=3, seed=0, judged="relevant"))
    assert set(capped.corpus_ids) == {"d1", "d2", "d5"}  # the relevant ones fill the cap; d3 (judged 0) is out
    filled = slice_beir(data, SliceConfig(queries=2, documents=5, seed=0, judged="relevant"))
    assert {"d1", "d2", "d5", "d3"} <= set(filled.corpus_ids) and len(filled.corpus_ids) == 5  # judged 0 before others
    keep_all = slice_beir(data, SliceConfig(queries=2, documents=3, seed=0))
    assert set(keep_all.corpus_ids) == {"d1", "d2", "d3", "d5"}  # judged: all keeps every judged one past the cap
    assert capped.fingerprint != keep_all.fingerprint and capped.summary()["slice"]["judged"] == "relevant"
