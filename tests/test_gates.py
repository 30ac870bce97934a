"""MLP gates: open gates change nothing, folding zero gates is exact, the cut hits the target exactly."""
from __future__ import annotations

import pytest
import torch

from conftest import TEXTS, tiny_loaded
from effir_export.compress.gates import MlpGates
from effir_export.compress.sparsity import SparsityConfig, make_relaxation
from effir_export.models.embedding import pad_batch, tokenize_texts
from effir_export.models.format import load_effir_model, save_model


def embed(loaded) -> torch.Tensor:
    ids, mask = pad_batch(tokenize_texts(loaded.tokenizer, TEXTS, loaded.embedding, "document"),
                          loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        return loaded.model.embed(torch.from_numpy(ids), torch.from_numpy(mask))


@pytest.mark.parametrize("relaxation", ["sigmoid", "hard_concrete"])
def test_open_gates_equal_the_ungated_model(family, relaxation):
    loaded = tiny_loaded(family)
    loaded.model.adapter.remove_mlp(loaded.model.layers[1])
    before = embed(loaded)
    gates = MlpGates(loaded.model, make_relaxation(SparsityConfig(relaxation=relaxation))).eval()
    gates.attach(loaded.model)
    assert gates.layer_indices == [0, 2]
    assert torch.equal(embed(loaded), before)


def test_gates_change_the_output_and_detach_restores_it():
    loaded = tiny_loaded("llama")
    before = embed(loaded)
    gates = MlpGates(loaded.model, make_relaxation(SparsityConfig())).eval()
    gates.attach(loaded.model)
    with torch.no_grad():
        gates.z[0][:10] = -1.0
    assert (embed(loaded) - before).abs().max() > 1e-3
    gates.detach()
    assert torch.equal(embed(loaded), before)


def test_folding_zero_gates_gives_the_gated_embeddings_with_smaller_matrices(family, tmp_path):
    loaded = tiny_loaded(family)
    gates = MlpGates(loaded.model, make_relaxation(SparsityConfig())).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for z in gates.z:
            z.copy_(torch.rand(z.shape, generator=generator) * 2 - 0.6)  # ~30 % <= 0, the rest scaled
    gates.attach(loaded.model)
    gated = embed(loaded)
    keep = gates.zero_gate_keep()
    widths = [len(k) for k in keep]
    assert all(0 < w < z.numel() for w, z in zip(widths, gates.z))
    gates.fold(loaded.model, keep)
    assert (embed(loaded) - gated).abs().max() <= 1e-5
    assert [loaded.model.adapter.mlp_width(layer) for layer in loaded.model.layers] == widths
    assert [s["intermediate_size"] for s in loaded.model.config.layers] == widths
    assert not any("z" in name.split(".") for name in loaded.model.state_dict())
    save_model(loaded.model, loaded.tokenizer, tmp_path / "folded")
    reloaded = load_effir_model(tmp_path / "folded")
    assert reloaded.current_layer_specs() == loaded.model.current_layer_specs()
    loaded.model = reloaded
    assert (embed(loaded) - gated).abs().max() <= 1e-5


@pytest.mark.parametrize("scope", ["overall", "per_layer"])
def test_the_cut_removes_exactly_the_target_share(scope):
    loaded = tiny_loaded("llama")
    gates = MlpGates(loaded.model, make_relaxation(SparsityConfig()))
    with torch.no_grad():
        for z in gates.z:
            z.copy_(torch.randn(z.shape, generator=torch.Generator().manual_seed(z.numel())))
    keep = gates.select_keep(0.3, scope)
    sizes = gates.sizes
    if scope == "per_layer":
        assert [len(k) for k in keep] == [n - round(0.3 * n) for n in sizes]
    else:
        assert sum(len(k) for k in keep) == sum(sizes) - round(0.3 * sum(sizes))
        kept_scores = torch.cat([z.detach()[k] for z, k in zip(gates.z, keep)])
        all_scores = torch.cat([z.detach() for z in gates.z])
        removed = all_scores.numel() - kept_scores.numel()
        assert kept_scores.min() >= all_scores.sort().values[removed - 1]  # the lowest went
    assert all(torch.equal(k, k.sort().values) for k in keep)


@pytest.mark.parametrize("scope", ["overall", "per_layer"])
def test_the_cut_can_round_every_width_to_a_block_multiple(scope):
    loaded = tiny_loaded("llama")
    gates = MlpGates(loaded.model, make_relaxation(SparsityConfig()))
    with torch.no_grad():
        for z in gates.z:
            z.copy_(torch.randn(z.shape, generator=torch.Generator().manual_seed(z.numel() + 1)))
    sizes, block = gates.sizes, 8
    assert all(n % block == 0 for n in sizes)
    keep = gates.select_keep(0.3, scope, multiple_of=block)
    widths = [len(k) for k in keep]
    assert all(w % block == 0 and 0 < w <= n for w, n in zip(widths, sizes))
    exact = [n - round(0.3 * n) for n in sizes] if scope == "per_layer" else [sum(sizes) - round(0.3 * sum(sizes))]
    assert abs(sum(widths) - sum(exact)) <= block / 2 * (len(sizes) if scope == "per_layer" else 1)
    for z, k in zip(gates.z, keep):  # each MLP keeps its highest-scored neurons
        dropped = torch.ones(z.numel(), dtype=torch.bool)
        dropped[k] = False
        if dropped.any():
            assert z.detach()[k].min() >= z.detach()[dropped].max()


def test_rounding_keeps_at_least_one_block_and_the_total():
    from effir_export.compress.gates import _round_counts

    assert _round_counts([1, 60, 100], [64, 64, 128], 16) == [16, 48, 96]  # 161 asked: 160 is the nearest whole-block total
    assert _round_counts([1033, 1033, 1100], [1536, 1536, 1536], 64) == [1024, 1024, 1088]
    assert sum(_round_counts([1033, 1060, 1070], [1536] * 3, 64)) == 3136  # 3163 asked: 3136 is the nearest whole-block total
