"""Text -> embedding: pooling, prompts, EOS, padding invariance, ordering."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TEXTS, tiny_loaded
from effir_export.models.embedding import EmbeddingConfig, pad_batch, pool, tokenize_texts
from effir_export.models.encoder import Encoder


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_batch_equals_each_text_alone(family, pooling):
    loaded = tiny_loaded(family, pooling=pooling)
    enc = Encoder(loaded.model, loaded.tokenizer, batch_size=3)
    batched = enc.encode(TEXTS)
    alone = np.stack([enc.encode([t])[0] for t in TEXTS])
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_pool_matches_hand_computation():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]], [[0.0, 2.0], [7.0, 7.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.allclose(pool(hidden, mask, "mean", False), torch.tensor([[2.0, 2.0], [0.0, 2.0]]))
    assert torch.allclose(pool(hidden, mask, "last", False), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert torch.allclose(pool(hidden, mask, "cls", False), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(pool(hidden, mask, "last", True)[0], torch.tensor([0.6, 0.8]))
    left = torch.tensor([[0, 1, 1], [0, 0, 1]])  # left padding: the last position is the last real token
    assert torch.allclose(pool(hidden, left, "last", False), torch.tensor([[9.0, 9.0], [7.0, 7.0]]))


def test_prompts_apply_to_their_side_only_and_eos_is_appended():
    loaded = tiny_loaded("llama")
    settings = EmbeddingConfig(pooling="last", query_prompt="Q: ", document_prompt="", append_eos=True, max_length=8)
    tok = loaded.tokenizer
    q = tokenize_texts(tok, ["abcdefghijkl"], settings, "query")[0]
    d = tokenize_texts(tok, ["abc"], settings, "document")[0]
    assert tok.convert_ids_to_tokens(q[:3]) == ["Q", ":", " "]
    assert len(q) == 8 and q[-1] == tok.eos_token_id  # truncated to max_length with room for EOS
    assert d == tok(["abc"])["input_ids"][0] + [tok.eos_token_id]
    enc = Encoder(loaded.model, tok, settings)
    assert not np.allclose(enc.encode_queries(["abc"]), enc.encode_documents(["abc"]))


def test_pad_batch_right_pads():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == np.int64


def test_results_come_back_in_input_order():
    loaded = tiny_loaded("bert")
    enc = Encoder(loaded.model, loaded.tokenizer, batch_size=2)
    forward = enc.encode(TEXTS)
    backward = enc.encode(TEXTS[::-1])
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-6)
    assert enc.encode([]).shape == (0, 32)
