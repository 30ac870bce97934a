"""The GPTQ checkpoint layout without GPTQModel: packing, unpacking, dequantising, config checks and
the clean failures of `export gptq`."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from conftest import tiny_loaded
from effir_export.cli import main
from effir_export.errors import EffirError, StructureError
from effir_export.export.gptq import GptqConfig, GptqError, check_quantizable, resolve_group_size, resolve_runner
from effir_export.export.gptq_loader import GptqWeight, load_gptq_model, pack_int32, unpack_int32


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    torch.manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (64, 24))
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 24)
    assert torch.equal(unpack_int32(packed, bits), codes)


def test_pack_layout_is_gptq_low_bits_first():
    codes = torch.arange(8).view(8, 1)  # rows 0..7 of one column -> one word, row 0 in the lowest nibble
    assert pack_int32(codes, 4).item() == 0x76543210
    assert pack_int32(torch.full((8, 1), 15), 4).item() == -1  # 0xFFFFFFFF as int32


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(StructureError, match="outside"):
        pack_int32(torch.full((8, 1), 16), 4)
    with pytest.raises(StructureError, match="3-bit"):
        pack_int32(torch.zeros(8, 1, dtype=torch.long), 3)


def random_weight(out=16, inp=64, group=16, bits=4, seed=0) -> GptqWeight:
    g = torch.Generator().manual_seed(seed)
    groups = inp // group
    return GptqWeight(codes=torch.randint(0, 2 ** bits, (out, inp), generator=g),
                      zeros=torch.randint(1, 2 ** bits, (groups, out), generator=g),
                      scales=(torch.rand(groups, out, generator=g) * 0.01 + 1e-3).half(),
                      g_idx=torch.arange(inp) // group, bits=bits)


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_weight_pack_unpack_roundtrip_and_shapes(fmt):
    w = random_weight()
    tensors = w.pack(fmt)
    assert tensors["qweight"].shape == (64 * 4 // 32, 16) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (4, 16 * 4 // 32) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].dtype == torch.float16 and tensors["g_idx"].dtype == torch.int32
    back = GptqWeight.from_packed(**tensors, bits=4, checkpoint_format=fmt)
    assert torch.equal(back.codes, w.codes) and torch.equal(back.zeros, w.zeros)


def test_v1_format_stores_zero_minus_one():
    w = random_weight()
    v1 = GptqWeight.from_packed(**w.pack("gptq_v2"), bits=4, checkpoint_format="gptq")
    assert torch.equal(v1.zeros, (w.zeros + 1) % 16)


def test_dequantize_lies_on_each_groups_grid():
    w = random_weight()
    dense = w.dequantize()
    scales = w.scales.float()[w.g_idx].t()
    steps = dense / scales + w.zeros[w.g_idx].t()
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.round().min() >= 0 and steps.round().max() <= 15
    assert torch.allclose(dense[3, 20], w.scales[1, 3].float() * (w.codes[3, 20] - w.zeros[1, 3]))


def test_act_order_weight_cannot_feed_blockwise_kernel():
    w = random_weight()
    w.g_idx = w.g_idx[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(StructureError, match="desc_act"):
        w.as_quantized_weight()


def test_group_size_must_divide_every_input_width():
    loaded = tiny_loaded("llama")  # hidden 32, MLP 48
    check_quantizable(loaded.model, GptqConfig(group_size=16))
    with pytest.raises(GptqError, match=r"group_size 32 does not divide the input width\(s\) \[48\]"):
        check_quantizable(loaded.model, GptqConfig(group_size=32))


@pytest.mark.parametrize("hidden,mlp,expected", [(32, 48, 16), (256, 384, 128), (576, 1536, 64), (576, 1024, 64),
                                                 (960, 2560, 64), (2048, 8192, 128)])
def test_without_a_group_size_the_largest_power_of_two_dividing_every_width_is_picked(hidden, mlp, expected, caplog):
    loaded = tiny_loaded("llama", config=dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1))
    with caplog.at_level("INFO", logger="effir_export.export.gptq"):
        config, choice = resolve_group_size(loaded.model, GptqConfig())
    assert config.group_size == expected and all(w % expected == 0 for w in (hidden, mlp))
    assert any(w % (2 * expected) for w in (hidden, mlp)) or expected == 128  # the largest such power of two
    assert choice == (f"group size {expected}: the largest power of two <= 128 dividing every input width "
                      f"({', '.join(map(str, sorted({hidden, mlp})))})") and choice in caplog.text
    check_quantizable(loaded.model, config)  # the picked size passes the explicit check


def test_a_given_group_size_is_kept_and_checked_as_before():
    loaded = tiny_loaded("llama", config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=1))
    assert resolve_group_size(loaded.model, GptqConfig(group_size=32)) == (GptqConfig(group_size=32), "group size 32: given")
    assert resolve_group_size(loaded.model, GptqConfig(group_size=-1))[0].group_size == -1
    with pytest.raises(GptqError, match=r"group_size 128 does not divide the input width\(s\) \[576\]; pick a divisor of \[576, 1536\]"):
        check_quantizable(loaded.model, GptqConfig(group_size=128))


def test_no_automatic_group_size_when_no_power_of_two_from_16_divides_every_width():
    loaded = tiny_loaded("llama", config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=1))
    with pytest.raises(GptqError, match=r"no power of two from 16 to 128 divides every input width \[40, 56\]; "
                                        r"pass --group-size -1"):
        resolve_group_size(loaded.model, GptqConfig())


@pytest.mark.integration
def test_smollm2_default_group_size_is_64(smollm2):
    config, choice = resolve_group_size(smollm2.model, GptqConfig())
    assert config.group_size == 64 and choice.endswith("(576, 1536)")


def test_encoder_families_are_refused():
    with pytest.raises(GptqError, match="decoder"):
        check_quantizable(tiny_loaded("bert").model, GptqConfig(group_size=16))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        GptqConfig(bits=5)
    with pytest.raises(ValueError):
        GptqConfig(damp_percent=0)
    with pytest.raises(ValueError, match="group_size"):
        GptqConfig(group_size=0)
    with pytest.raises(ValueError):
        GptqConfig(bits=3)


def test_missing_gptq_environment_names_the_install_step(tmp_path):
    with pytest.raises(GptqError, match=r"install\.sh gptq"):
        resolve_runner(str(tmp_path / "no-such-python"))


def test_cli_fails_cleanly_without_gptqmodel(tmp_path):
    model_dir = tmp_path / "model"
    loaded = tiny_loaded("llama")
    from effir_export.models.format import save_model

    save_model(loaded.model, loaded.tokenizer, model_dir)
    calibration = tmp_path / "calib.txt"
    calibration.write_text("one passage\nanother passage\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "gptq", str(model_dir), "--calibration", str(calibration),
                                       "--out", str(out), "--group-size", "16", "--python", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert "install.sh gptq" in result.output
    assert not out.exists() and not list(tmp_path.glob(".gptq-stage-*"))


def test_cli_requires_calibration(tmp_path):
    result = CliRunner().invoke(main, ["export", "gptq", "smollm2-135m", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--calibration" in result.output


def test_loader_refuses_a_plain_effir_folder(tmp_path):
    loaded = tiny_loaded("llama")
    from effir_export.models.format import save_model

    save_model(loaded.model, loaded.tokenizer, tmp_path / "plain")
    with pytest.raises(EffirError, match="not a GPTQ effir folder"):
        load_gptq_model(tmp_path / "plain")
