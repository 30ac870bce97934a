"""Relaxed L0 and the Lagrangian controller; the width stage reaches its target on a tiny model."""
from __future__ import annotations

import torch

from conftest import tiny_loaded
from effir_export.compress.sparsity import (HardConcreteRelaxation, LagrangianController, SigmoidRelaxation,
                                            SparsityConfig, sparsity)
from effir_export.compress.width import WidthConfig, run_width_stage
from effir_export.models.format import load_effir_model, save_model
from effir_export.paths import DATA_DIR
from effir_export.recipe import Recipe

PAIRS = DATA_DIR / "msmarco_subset_pairs" / "pairs.jsonl"


def test_hard_concrete_starts_open_and_samples_in_unit_interval():
    relaxation = HardConcreteRelaxation()
    z = torch.full((1000,), relaxation.init_value)
    assert torch.equal(relaxation.gate(z, None), torch.ones(1000))
    assert relaxation.open_probability(z).min() > 0.98
    torch.manual_seed(0)
    sampled = relaxation.gate(torch.zeros(1000), relaxation.noise(z))
    assert sampled.min() >= 0 and sampled.max() <= 1
    assert 0.1 < (sampled == 0).float().mean() < 0.5 and (sampled == 1).float().mean() > 0.1


def test_sparsity_value_is_the_closed_share_and_its_gradient_the_relaxed_one():
    relaxation = SigmoidRelaxation(0.1)
    z = torch.tensor([1.0, 0.05, -0.02, -0.5], requires_grad=True)
    value = sparsity([relaxation.open_probability(z)], [relaxation.gate(z, None) <= 0], "overall")
    assert value.item() == 0.5  # two of four gates are exactly zero
    value.sum().backward()
    soft = z.detach().clone().requires_grad_(True)
    (1 - relaxation.open_probability(soft).mean()).backward()
    assert torch.allclose(z.grad, soft.grad)
    per_layer = sparsity([torch.ones(2), torch.zeros(3)], [torch.tensor([False, False]), torch.tensor([True] * 3)],
                         "per_layer")
    assert per_layer.tolist() == [0.0, 1.0]


def test_multipliers_climb_while_the_gates_descend():
    controller = LagrangianController(1, linear=True)
    z = torch.ones(4, requires_grad=True)
    optimizer = torch.optim.SGD([z, *controller.parameters()], lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        current = 1 - torch.sigmoid(z).mean().unsqueeze(0)
        controller(current, target=0.9).backward()
        optimizer.step()
    assert controller.lambda_1.item() < 0 and controller.lambda_2.item() > 0  # ascent on the gap (s - t < 0)
    assert (z < 1).all()  # the gates are pushed towards closing
    assert not LagrangianController(1).lambda_1.requires_grad


def test_target_ramps_up_over_the_warmup():
    config = SparsityConfig(target=0.3, warmup=0.5)
    assert [round(config.target_at(s, 10), 3) for s in (0, 2, 4, 9)] == [0.06, 0.18, 0.3, 0.3]
    assert SparsityConfig(target=0.3, warmup=0).target_at(0, 10) == 0.3


def test_width_stage_reaches_the_target_and_cuts_exactly(tmp_path):
    loaded = tiny_loaded("llama")
    target = 0.25
    config = WidthConfig(data=str(PAIRS), max_pairs=64, steps=60, batch_size=4, max_length=16, learning_rate=1e-3,
                         lora=None, probe=4, sparsity=SparsityConfig(target=target, scope="overall"))
    recipe = Recipe(name="tiny", model={"source": "tiny"})
    widths = [loaded.model.adapter.mlp_width(layer) for layer in loaded.model.layers]
    out = run_width_stage(loaded, config, recipe, tmp_path / "work", progress=False)
    report = out.report
    assert abs(report["closed_by_training"] - target) <= 0.01, report
    total = sum(widths)
    assert sum(report["mlp_widths"]) == total - round(target * total)
    assert [out.loaded.model.adapter.mlp_width(layer) for layer in out.loaded.model.layers] == report["mlp_widths"]
    assert report["parameters"]["after"] < report["parameters"]["before"]
    assert report["training"]["loss_last"] < report["training"]["loss_first"]
    assert 0 < report["probe_cosine"]["mean"] <= 1
    save_model(out.loaded.model, out.loaded.tokenizer, tmp_path / "model")
    assert [s.intermediate_size for s in load_effir_model(tmp_path / "model").current_layer_specs()] == report["mlp_widths"]
