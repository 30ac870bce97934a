"""GPTQ export through GPTQModel (in .venv-gptq) on a tiny rewritten Llama: layout, grid, quality
against round-to-nearest, round trip, reload. Skipped where the GPTQ environment is absent."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import TEXTS, tiny_loaded
from effir_export.cli import main
from effir_export.export.gptq import gptq_available
from effir_export.export.gptq_loader import GptqLinear, GptqWeight, gptq_weights, load_gptq_model
from effir_export.models.embedding import pad_batch, tokenize_texts
from effir_export.models.encoder import Encoder
from effir_export.models.format import save_model

pytestmark = pytest.mark.skipif(not gptq_available(), reason="GPTQModel environment absent: run `./install.sh gptq`")

GROUP = 16
CALIBRATION = [f"passage {i}: the {w} of topic {i % 7} is described in {i * 3} words here." for i, w in
               enumerate(["history", "price", "meaning", "capital", "population", "origin", "author", "size"] * 8)]


def rewritten():
    """Tiny Llama with layer 1's MLP dropped and layer 2's MLP narrowed to 32 neurons."""
    loaded = tiny_loaded("llama", seed=3)
    adapter = loaded.model.adapter
    adapter.remove_mlp(loaded.model.layers[1])
    adapter.resize_mlp(loaded.model.layers[2], torch.tensor([i for i in range(48) if i % 3 != 1]))
    loaded.model.sync_config()
    return loaded


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    loaded = rewritten()
    save_model(loaded.model, loaded.tokenizer, root / "model")
    (root / "calib.txt").write_text("\n".join(CALIBRATION))
    result = CliRunner().invoke(main, ["export", "gptq", str(root / "model"), "--calibration", str(root / "calib.txt"),
                                       "--out", str(root / "gptq"), "--group-size", str(GROUP), "--samples", "64"])
    assert result.exit_code == 0, result.output
    return loaded, root / "gptq"


def test_checkpoint_has_the_standard_gptq_layout(exported):
    loaded, folder = exported
    qcfg = json.loads((folder / "quantize_config.json").read_text())
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == (4, GROUP, True, False)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["bits"] == 4
    if importlib.util.find_spec("gptqmodel") is None:  # the worker ran in .venv-gptq: its log is kept
        assert "gptq" in (folder / "gptqmodel.log").read_text().lower()
    state = load_file(str(folder / "model.safetensors"))
    for name, module in loaded.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            inp, out = module.in_features, module.out_features
            assert state[f"{name}.qweight"].dtype == torch.int32 and state[f"{name}.qweight"].shape == (inp // 8, out)
            assert state[f"{name}.qzeros"].dtype == torch.int32 and state[f"{name}.qzeros"].shape == (inp // GROUP, out // 8)
            assert state[f"{name}.scales"].dtype == torch.float16 and state[f"{name}.scales"].shape == (inp // GROUP, out)
            assert torch.equal(state[f"{name}.g_idx"], (torch.arange(inp) // GROUP).int())
            assert f"{name}.weight" not in state
    assert not any(".layers.1.mlp." in k for k in state)
    assert not any(k.startswith("lm_head") for k in state)


def test_dequantised_weights_lie_on_their_groups_4bit_grid(exported):
    _, folder = exported
    for weight in gptq_weights(load_gptq_model(folder)).values():
        assert weight.codes.min() >= 0 and weight.codes.max() <= 15
        assert torch.all(weight.zeros == 8)  # symmetric: the mid code
        steps = weight.dequantize() / weight.scales.float()[weight.g_idx].t() + 8
        assert torch.allclose(steps, steps.round(), atol=1e-3)


def linear_inputs(loaded) -> dict[str, torch.Tensor]:
    """Calibration inputs of every linear layer of the fp32 model."""
    ids = tokenize_texts(loaded.tokenizer, CALIBRATION, loaded.embedding, "document")
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, _out, name=name: inputs.setdefault(name, []).append(args[0]))
             for name, m in loaded.model.named_modules() if isinstance(m, torch.nn.Linear)]
    input_ids, mask = pad_batch(ids, loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        loaded.model(torch.from_numpy(input_ids), torch.from_numpy(mask))
    for hook in hooks:
        hook.remove()
    keep = torch.from_numpy(mask).bool()
    return {name: torch.cat(x)[keep] for name, x in inputs.items()}


def test_layer_output_error_is_lower_than_round_to_nearest(exported):
    from effir_export.quant.gptq import rtn_quantize

    loaded, folder = exported
    weights = gptq_weights(load_gptq_model(folder))
    wins = 0
    for name, x in linear_inputs(loaded).items():
        w = loaded.model.get_submodule(name).weight.detach()
        exact = x @ w.t()
        gptq_err = (x @ weights[name].dequantize().t() - exact).norm()
        rtn_err = (x @ rtn_quantize(w, 4, GROUP, symmetric=True).dequantize().t() - exact).norm()
        wins += int(gptq_err < rtn_err)
    assert wins == len(weights), f"GPTQ beat round-to-nearest on {wins} of {len(weights)} layers"


def test_packed_checkpoint_round_trips(exported, tmp_path):
    _, folder = exported
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight"))
    unpacked = {n: GptqWeight.from_packed(state[f"{n}.qweight"], state[f"{n}.qzeros"], state[f"{n}.scales"],
                                          state[f"{n}.g_idx"], bits=4) for n in names}
    repacked = {f"{n}.{k}": v for n, w in unpacked.items() for k, v in w.pack().items()}
    assert all(torch.equal(repacked[k], state[k]) for k in repacked)
    save_file(repacked, str(tmp_path / "again.safetensors"))
    again = load_file(str(tmp_path / "again.safetensors"))
    for n, w in unpacked.items():
        back = GptqWeight.from_packed(again[f"{n}.qweight"], again[f"{n}.qzeros"], again[f"{n}.scales"],
                                      again[f"{n}.g_idx"], bits=4)
        assert torch.equal(back.codes, w.codes) and torch.equal(back.zeros, w.zeros)
        q = back.as_quantized_weight()
        assert torch.equal(q.dequantize(), w.dequantize())


def test_reloaded_model_keeps_structure_and_embeddings(exported):
    loaded, folder = exported
    model = load_gptq_model(folder)
    assert model.current_layer_specs() == loaded.model.current_layer_specs()
    assert isinstance(model.layers[2].mlp.down_proj, GptqLinear) and model.layers[2].mlp.down_proj.in_features == 32
    reference = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS)
    quantised = Encoder(model, loaded.tokenizer).encode(TEXTS)
    cosine = (reference * quantised).sum(1)
    assert cosine.min() > 0.99, cosine


def test_validation_backends_run_the_checkpoint_in_fp32_and_bf16(exported):
    from effir_export.validation.backends import build_backend

    loaded, folder = exported
    reference = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS)
    for kind, floor in (("gptq", 0.99), ("gptq-bf16", 0.98)):
        backend = build_backend(f"{kind}:{folder}")
        assert backend.extra["dtype"] == ("float32" if kind == "gptq" else "bfloat16")
        assert (reference * backend.encoder.encode(TEXTS)).sum(1).min() > floor


def test_checkpoint_feeds_a_matmulnbits_onnx_graph(exported, tmp_path):
    import onnx
    import onnxruntime as ort

    from effir_export.export.gptq_onnx import gptq_to_matmulnbits
    from effir_export.export.onnx import OnnxExportConfig, export_onnx

    loaded, folder = exported
    export_onnx(loaded, OnnxExportConfig(), tmp_path / "fp32")
    proto = gptq_to_matmulnbits(onnx.load(str(tmp_path / "fp32" / "model.onnx")), loaded, folder)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == len(gptq_weights(load_gptq_model(folder))) and "MatMul" in ops  # attention
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ids, mask = pad_batch(tokenize_texts(loaded.tokenizer, TEXTS, loaded.embedding, "document"),
                          loaded.tokenizer.pad_token_id)
    onnx_emb = session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    torch_emb = Encoder(load_gptq_model(folder), loaded.tokenizer).encode(TEXTS, kind="document")
    fp32_emb = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS, kind="document")
    same_weights = (onnx_emb * torch_emb).sum(1)
    assert same_weights.min() > 0.9999, same_weights  # only the bf16 embedding table differs
    assert (onnx_emb * fp32_emb).sum(1).min() < same_weights.min()


def test_without_a_group_size_the_export_picks_and_records_one(tmp_path):
    """Input widths 32 (hidden, attention) and 48 (layer 0's MLP): 16 divides both, 32 does not divide 48."""
    loaded = tiny_loaded("llama", seed=3)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n".join(CALIBRATION))
    result = CliRunner().invoke(main, ["export", "gptq", str(tmp_path / "model"), "--calibration",
                                       str(tmp_path / "calib.txt"), "--out", str(tmp_path / "gptq"), "--samples", "16"])
    assert result.exit_code == 0, result.output
    assert "(group 16)" in result.output
    report = json.loads((tmp_path / "gptq" / "gptq_report.json").read_text())
    assert report["group_size"] == "group size 16: the largest power of two <= 128 dividing every input width (32, 48)"
    assert report["config"]["group_size"] == 16
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())["group_size"] == 16


@pytest.mark.slow
def test_asymmetric_act_order_checkpoint_loads(tmp_path):
    from effir_export.errors import StructureError
    from effir_export.export.gptq import GptqConfig, export_gptq

    loaded = rewritten()
    (tmp_path / "calib.txt").write_text("\n".join(CALIBRATION))
    export_gptq(loaded, tmp_path / "calib.txt", tmp_path / "gptq",
                GptqConfig(group_size=GROUP, samples=64, sym=False, desc_act=True))
    model = load_gptq_model(tmp_path / "gptq")
    weights = gptq_weights(model)
    assert any(len(w.zeros.unique()) > 1 for w in weights.values())  # one zero point per group
    act_ordered = [w for w in weights.values() if not torch.equal(w.g_idx, torch.arange(w.g_idx.numel()) // GROUP)]
    assert act_ordered
    with pytest.raises(StructureError, match="desc_act"):
        act_ordered[0].as_quantized_weight()
    reference = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS)
    assert ((reference * Encoder(model, loaded.tokenizer).encode(TEXTS)).sum(1)).min() > 0.99


def test_gemma3_with_a_dense_head_quantises_and_keeps_its_head(tmp_path):
    """GPTQModel's gemma3_text definition on a rewritten tiny Gemma3 whose sentence-transformers Dense head stays
    float in the checkpoint: the reloaded model embeds close to the float model."""
    from test_sentence_transformers import write_st_folder

    from effir_export.models.sources import load_model

    loaded = load_model(write_st_folder(tmp_path / "st"))
    loaded.model.adapter.remove_mlp(loaded.model.layers[1])
    save_model(loaded.model, loaded.tokenizer, tmp_path / "model")
    (tmp_path / "calib.txt").write_text("\n".join(CALIBRATION))
    result = CliRunner().invoke(main, ["export", "gptq", str(tmp_path / "model"), "--calibration",
                                       str(tmp_path / "calib.txt"), "--out", str(tmp_path / "gptq"),
                                       "--group-size", str(GROUP), "--samples", "64"])
    assert result.exit_code == 0, result.output
    state = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    assert state["head.dense.0.weight"].dtype == torch.float32 and "head.dense.1.weight" in state
    quantised = load_gptq_model(tmp_path / "gptq")
    want = Encoder(loaded.model, loaded.tokenizer).encode(TEXTS)
    got = Encoder(quantised, loaded.tokenizer).encode(TEXTS)
    assert got.shape == want.shape == (len(TEXTS), 24)
    assert float((got * want).sum(1).min()) > 0.9
