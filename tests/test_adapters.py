"""The adapter's view of tiny random models of every supported family."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_CONFIGS, char_tokenizer, tiny_backbone, tiny_loaded
from effir_export.errors import UnsupportedArchitectureError
from effir_export.models.adapters import adapter_for_model_type, supported_model_types


def _inputs():
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return ids, mask


def test_adapter_sees_layers_sublayers_and_projections(family):
    cfg = TINY_CONFIGS[family]
    loaded = tiny_loaded(family)
    adapter = loaded.model.adapter
    assert adapter is adapter_for_model_type(cfg["model_type"])
    layers = adapter.layers(loaded.model.backbone)
    assert len(layers) == cfg["num_hidden_layers"] == adapter.num_layers(loaded.model.backbone.config)
    for layer in layers:
        assert adapter.has_attention(layer) and adapter.has_mlp(layer)
        assert adapter.mlp_width(layer) == cfg["intermediate_size"]
        ins = adapter.mlp_input_projections(layer)
        assert len(ins) == (2 if adapter.is_decoder else 1)  # SwiGLU gate+up vs GELU up
        for proj in ins:
            assert (proj.in_features, proj.out_features) == (cfg["hidden_size"], cfg["intermediate_size"])
        out = adapter.mlp_output_projection(layer)
        assert (out.in_features, out.out_features) == (cfg["intermediate_size"], cfg["hidden_size"])
        assert adapter.attention_output_projection(layer).out_features == cfg["hidden_size"]


def test_skippable_layers_compute_exactly_what_the_original_layers_compute(family):
    backbone = tiny_backbone(family)
    reference = copy.deepcopy(backbone)
    adapter = adapter_for_model_type(backbone.config.model_type)
    adapter.prepare(backbone)
    ids, mask = _inputs()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)


def test_removed_sublayers_hold_no_weights_and_the_residual_passes_through(family):
    loaded = tiny_loaded(family)
    model, adapter = loaded.model, loaded.model.adapter
    before = sum(p.numel() for p in model.parameters())
    layer = model.layers[1]
    mlp_params = sum(p.numel() for m in adapter.mlp_modules(layer) for p in m.parameters())
    adapter.remove_mlp(layer)
    assert not adapter.has_mlp(layer) and adapter.mlp_width(layer) == 0
    assert sum(p.numel() for p in model.parameters()) == before - mlp_params
    adapter.remove_attention(layer)
    assert not adapter.has_attention(layer)
    seen = []
    for l in model.layers:
        l.effir_observer = lambda i, kind, x_in, x_out: seen.append((i, kind))
    ids, mask = _inputs()
    with torch.no_grad():
        model(ids, mask)
    assert (1, "mlp") not in seen and (1, "attention") not in seen
    assert (0, "attention") in seen and (2, "mlp") in seen


def test_resize_mlp_keeps_the_selected_neurons(family):
    loaded = tiny_loaded(family)
    adapter = loaded.model.adapter
    layer = loaded.model.layers[0]
    down_before = adapter.mlp_output_projection(layer).weight.detach().clone()
    keep = torch.tensor([7, 1, 3])
    adapter.resize_mlp(layer, keep)
    assert adapter.mlp_width(layer) == 3
    assert torch.equal(adapter.mlp_output_projection(layer).weight, down_before[:, [1, 3, 7]])


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*supports.*llama"):
        adapter_for_model_type("gpt2")
    assert {"llama", "mistral", "qwen2", "qwen3", "bert"} <= set(supported_model_types())


def test_char_tokenizer_is_deterministic():
    tok = char_tokenizer()
    assert tok(["ab"])["input_ids"] == [[14, 15]]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_gemma3_masks_equal_transformers_own(bidirectional):
    """The traceable masks give the backbone exactly the output of transformers' own mask builder,
    sliding window and padding included (window 4 < sequence 6, so the window matters)."""
    from effir_export.models.adapters.gemma3 import Gemma3FamilyAdapter

    cfg = dict(TINY_CONFIGS["gemma3"], use_bidirectional_attention=bidirectional)
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg, pad_token_id=0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    backbone = AutoModel.from_config(config).eval()
    ids, mask = _inputs()
    masks = Gemma3FamilyAdapter().attention_mask(backbone.config, mask, torch.float32)
    with torch.no_grad():
        want = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        got = backbone(input_ids=ids, attention_mask=masks).last_hidden_state
    valid = mask.bool()
    assert torch.allclose(want[valid], got[valid], atol=1e-5)
    window = masks["sliding_attention"][0, 0]
    assert (window == 0).sum() < (masks["full_attention"][0, 0] == 0).sum()  # the window hides some keys


def test_gemma3_config_round_trips_its_sliding_window():
    from transformers import AutoConfig

    from effir_export.models.adapters.gemma3 import Gemma3FamilyAdapter

    cfg = dict(TINY_CONFIGS["gemma3"], sliding_window=512)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    assert config.sliding_window == 257  # transformers: exclusive half-window for bidirectional attention
    stored = Gemma3FamilyAdapter().storable_config(config)
    rebuilt = AutoConfig.for_model(stored.pop("model_type"), **stored)
    assert rebuilt.sliding_window == config.sliding_window
