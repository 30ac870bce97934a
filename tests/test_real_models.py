"""The real packaged models: SmolLM2-135M (GGUF, Llama) and all-MiniLM-L6-v2 (sentence-transformers BERT)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from effir_export.accounting import account
from effir_export.models.encoder import Encoder
from effir_export.paths import DATA_DIR

pytestmark = pytest.mark.integration


def test_smollm2_facts(smollm2):
    acc = account(smollm2.model)
    assert (acc.model_type, acc.num_layers, acc.hidden_size) == ("llama", 30, 576)
    assert {l.intermediate_size for l in acc.layers} == {1536}
    assert acc.parameters == pytest.approx(134.5e6, rel=0.002)
    assert smollm2.embedding.pooling == "last" and smollm2.embedding.append_eos
    assert smollm2.tokenizer.eos_token == "<|im_end|>"  # the model's EOS, not the one the GGUF metadata names


def test_smollm2_batch_equals_each_text_alone(smollm2):
    enc = Encoder(smollm2.model, smollm2.tokenizer, batch_size=4)
    texts = ["who is robert gray", "The Columbia River was given the name it bears today in May 1792.",
             "a", "Captain Robert Gray entered the mouth of the Columbia River and explored 20 miles up the river."]
    batched = enc.encode(texts)
    alone = np.stack([enc.encode([t])[0] for t in texts])
    assert np.abs(batched - alone).max() <= 1e-5


def test_minilm_uses_its_sentence_transformers_settings(minilm):
    acc = account(minilm.model)
    assert (acc.model_type, acc.num_layers, acc.hidden_size) == ("bert", 6, 384)
    s = minilm.embedding
    assert (s.pooling, s.normalize, s.max_length, s.append_eos) == ("mean", True, 256, False)


def test_minilm_ranks_the_relevant_passage_first(minilm):
    lines = (DATA_DIR / "msmarco_subset_pairs" / "pairs.jsonl").read_text().splitlines()
    pairs = [json.loads(line) for line in lines[:: len(lines) // 12][:12]]
    enc = Encoder(minilm.model, minilm.tokenizer)
    q = enc.encode_queries([p["query"] for p in pairs])
    pos = enc.encode_documents([p["positive"] for p in pairs])
    neg = enc.encode_documents([p["negative"] for p in pairs])
    wins = ((q * pos).sum(1) > (q * neg).sum(1)).sum()
    assert wins >= 11, f"relevant passage ranked first for only {wins}/12 queries"


def test_cli_info_on_the_aliases():
    from click.testing import CliRunner

    from effir_export.cli import main

    out = CliRunner().invoke(main, ["info", "smollm2-135m", "--json"])
    assert out.exit_code == 0, out.output
    facts = json.loads(out.output)
    assert facts["num_layers"] == 30 and facts["hidden_size"] == 576
    out = CliRunner().invoke(main, ["info", "minilm-l6"])
    assert out.exit_code == 0 and "bert" in out.output
