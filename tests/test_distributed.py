"""Data parallelism on torch.distributed, 2 CPU processes (gloo on loopback) against 1: the same trained
weights and losses, the same sublayer scores, the same validation figures, and only rank 0 writes; and
the torchrun entry point from the command line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import tiny_loaded
from test_validation_metrics import write_beir

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = "\n".join(f"passage {i} on dense retrieval and pruning {'x ' * i}" for i in range(12))
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pairs(ragged: bool = False):
    """Twelve pairs with a hard negative each (``ragged``: every third pair has none)."""
    from effir_export.compress.pairs import TrainingPair

    return [TrainingPair(f"query {i} {WORDS[i % 12]}", f"passage {i} about {WORDS[(i + 3) % 12]}",
                         () if ragged and i % 3 == 0 else (f"other {WORDS[(i + 5) % 12]}",)) for i in range(12)]


def _train(accumulation: int, checkpoint_dir: Path, batch_size: int = 2, gather: bool = False,
           strategy: str = "ddp", lora: bool = True):
    from effir_export.compress.train import ContrastiveTrainer, DistributedSettings, LoraSettings, TrainConfig

    loaded = tiny_loaded("llama", seed=0)
    config = TrainConfig(data="-", steps=3, batch_size=batch_size, accumulation=accumulation, max_length=16,
                         learning_rate=5e-3, lora=LoraSettings(rank=4, alpha=8) if lora else None,
                         checkpoint_every=1, gather_negatives=gather,
                         distributed=DistributedSettings(strategy=strategy))
    trainer = ContrastiveTrainer(loaded.model, loaded.tokenizer, loaded.embedding, config, _pairs(ragged=gather),
                                 checkpoint_dir)
    result = trainer.train(progress=False)
    return {k: v.detach().clone() for k, v in trainer.finish().state_dict().items()}, result.losses, result.summary()


def _score(folder: Path):
    from effir_export.compress.score import ScoreConfig, score_sublayers

    return score_sublayers(tiny_loaded("llama", seed=0), ScoreConfig(samples=12, max_length=24, batch_size=3),
                           folder / "calibration.txt", progress=False)


def _validate(folder: Path, cache: Path):
    from effir_export.validation import ValidateConfig, run_validation

    slim = str(folder / "slim")
    return run_validation(ValidateConfig(reference=f"full=torch:{folder / 'full'}", backends=[f"slim=torch:{slim}"],
                                         data=str(folder / "beir"), latency=None, memory=None, asymmetric=True,
                                         cache_dir=str(cache), out=str(folder / f"report-{cache.name}")))


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from effir_export import distributed

    assert distributed.init_from_env() and distributed.world_size() == world
    folder = Path(folder)
    try:
        state, losses, _ = _train(1, folder / "checkpoints-2")
        gathered, gathered_losses, _ = _train(1, folder / "checkpoints-gather-2", gather=True)
        sharded, sharded_losses, sharded_summary = _train(1, folder / "checkpoints-fsdp-2", strategy="fsdp")
        resumed, _, resumed_summary = _train(1, folder / "checkpoints-fsdp-2", strategy="fsdp")  # from step 2
        full, full_losses, _ = _train(1, folder / "checkpoints-fsdp-full-2", strategy="fsdp", lora=False)
        scores = _score(folder)
        report = _validate(folder, folder / "cache-2")
        if rank == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "rank0.safetensors"))
            save_file({k: v.contiguous() for k, v in gathered.items()}, str(folder / "rank0-gathered.safetensors"))
            save_file({k: v.contiguous() for k, v in sharded.items()}, str(folder / "rank0-fsdp.safetensors"))
            save_file({k: v.contiguous() for k, v in resumed.items()}, str(folder / "rank0-fsdp-resumed.safetensors"))
            save_file({k: v.contiguous() for k, v in full.items()}, str(folder / "rank0-fsdp-full.safetensors"))
            (folder / "rank0.json").write_text(json.dumps({
                "losses": losses, "gathered_losses": gathered_losses, "sharded_losses": sharded_losses,
                "sharded_summary": sharded_summary, "resumed_summary": resumed_summary, "full_losses": full_losses,
                "scores": scores.model_dump(), "report": report.model_dump()}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The three jobs run by 2 spawned ranks (their outputs, from rank 0) and the data they used."""
    from effir_export.models.format import save_model

    folder = tmp_path_factory.mktemp("ranks")
    (folder / "calibration.txt").write_text(CALIBRATION)
    full = tiny_loaded("llama", seed=0)
    save_model(full.model, full.tokenizer, folder / "full")
    slim = tiny_loaded("llama", seed=0)
    for layer in list(slim.model.layers)[:1]:
        slim.model.adapter.remove_mlp(layer)
    save_model(slim.model, slim.tokenizer, folder / "slim")
    corpus = {f"d{i}": ("", " ".join(WORDS[(i + k) % 12] for k in range(2 + i % 7))) for i in range(23)}
    write_beir(folder / "beir", corpus, {f"q{i}": WORDS[i] for i in range(5)},
               {f"q{i}": {f"d{i}": 1, f"d{i + 10}": 2} for i in range(5)})
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    return folder, json.loads((folder / "rank0.json").read_text()), load_file(str(folder / "rank0.safetensors"))


def test_two_ranks_train_the_weights_one_process_trains_with_twice_the_accumulation(two_ranks):
    folder, outputs, state = two_ranks
    expected, losses, _ = _train(2, folder / "checkpoints-1")
    assert outputs["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    changed = [k for k in expected if not torch.equal(expected[k], tiny_loaded("llama", seed=0).model.state_dict()[k])]
    assert changed  # training moved the (merged) weights
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (folder / "checkpoints-2").iterdir()) == ["latest"]  # one writer, no temp left


def test_two_ranks_gathering_negatives_train_as_one_process_with_the_concatenated_batch(two_ranks):
    folder, outputs, _ = two_ranks
    expected, losses, _ = _train(1, folder / "checkpoints-gather-1", batch_size=4, gather=True)  # one process: no-op
    assert outputs["gathered_losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert outputs["gathered_losses"][0] != pytest.approx(outputs["losses"][0], rel=1e-3)  # not the local loss
    state = load_file(str(folder / "rank0-gathered.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5)


def test_two_ranks_sharding_with_fsdp_train_the_weights_one_process_trains_with_twice_the_accumulation(two_ranks):
    folder, outputs, replicated = two_ranks
    expected, losses, single = _train(2, folder / "checkpoints-1-fsdp")
    assert outputs["sharded_summary"]["distributed"] == {"ranks": 2, "sharded_fraction": 0.5}  # half on each rank
    assert single["distributed"] == {"ranks": 1, "sharded_fraction": 1.0}
    assert outputs["sharded_losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    state = load_file(str(folder / "rank0-fsdp.safetensors"))
    assert set(state) == set(expected)  # gathered whole, LoRA merged: the plain model's tensors
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5)
    assert outputs["resumed_summary"]["resumed_from"] == 2  # the sharded checkpoint, gathered by rank 0
    resumed = load_file(str(folder / "rank0-fsdp-resumed.safetensors"))
    for name, tensor in state.items():  # resharded weights and Adam moments continue the same run
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-7)


def test_two_ranks_sharding_a_full_fine_tune_train_the_weights_one_process_trains(two_ranks):
    folder, outputs, _ = two_ranks
    expected, losses, _ = _train(2, folder / "checkpoints-1-fsdp-full", lora=False)
    assert outputs["full_losses"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    state = load_file(str(folder / "rank0-fsdp-full.safetensors"))
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=1e-5)


def test_the_training_strategy_is_ddp_or_fsdp():
    from effir_export.compress.train import TrainConfig

    assert TrainConfig(data="-").distributed.strategy == "ddp"
    with pytest.raises(ValueError, match="strategy"):
        TrainConfig(data="-", distributed={"strategy": "zero3"})


def test_gathering_negatives_needs_an_info_nce_term():
    from effir_export.compress.train import TrainConfig

    with pytest.raises(ValueError, match="gather_negatives widens InfoNCE"):
        TrainConfig(data="-", objective="distill", gather_negatives=True)


def test_two_ranks_score_the_sublayers_one_process_scores(two_ranks):
    folder, outputs, _ = two_ranks
    expected = _score(folder).model_dump()
    got = outputs["scores"]
    assert got["layers"][0]["tokens"] == expected["layers"][0]["tokens"]
    for a, b in zip(got["layers"], expected["layers"]):
        assert a["attention"] == pytest.approx(b["attention"], rel=1e-5)
        assert a["mlp"] == pytest.approx(b["mlp"], rel=1e-5)


def test_two_ranks_validate_like_one_process_and_rank_0_writes_the_cache_and_report(two_ranks):
    folder, outputs, _ = two_ranks
    expected = _validate(folder, folder / "cache-1").model_dump()
    got = outputs["report"]
    for key in ("reference", "backends"):
        rows = [got[key]] if key == "reference" else got[key]
        for a, b in zip(rows, [expected[key]] if key == "reference" else expected[key]):
            assert a["retrieval"]["ndcg_at_10"] == pytest.approx(b["retrieval"]["ndcg_at_10"], abs=1e-9)
    assert got["backends"][0]["asymmetric"]["retrieval"]["ndcg_at_10"] == pytest.approx(
        expected["backends"][0]["asymmetric"]["retrieval"]["ndcg_at_10"], abs=1e-9)
    assert len(list((folder / "cache-2").glob("*.npz"))) == 2 and not list((folder / "cache-2").glob("*.tmp"))
    assert (folder / "report-cache-2" / "report.json").is_file()
    with np.load(next((folder / "cache-2").glob("*.npz"))) as stored:  # the gathered rows, in corpus order
        assert stored["corpus"].shape[0] == 23


@pytest.mark.integration  # two Python processes importing torch: ~30 s on 2 cores
def test_torchrun_runs_compress_with_two_ranks_from_the_command_line(tmp_path):
    from effir_export.models.format import save_model

    loaded = tiny_loaded("llama")
    save_model(loaded.model, loaded.tokenizer, tmp_path / "base")
    (tmp_path / "calibration.txt").write_text(CALIBRATION)
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps({"query": p.query, "positive": p.positive})
                                                    for p in _pairs()))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""\
        name: tiny-ranks
        model: {source: base}
        embedding: {max_length: 24}
        depth:
          score: {calibration: calibration.txt, samples: 12, max_length: 24}
          drop: {mlp: 1}
        width:
          data: pairs.jsonl
          steps: 3
          batch_size: 2
          max_length: 16
          lora: {rank: 4, alpha: 8}
          probe: 2
          sparsity: {target: 0.25}
        """))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "EFFIR_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "-m", "effir_export", "compress", "--recipe", str(recipe),
               "--out", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("stages: depth, width") == 1  # rank 0 alone reports
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert report["stages"]["width"]["removed_fraction"] == pytest.approx(0.25, abs=0.05)
    left = {p.name for p in tmp_path.iterdir()} - {"cache"}  # no rank's scratch or temp folder is left
    assert left == {"base", "calibration.txt", "out", "pairs.jsonl", "recipe.yaml"}


def test_the_shipped_7b_accelerate_config_shards_with_fsdp2_as_its_recipe_does():
    from accelerate.commands.config.config_args import load_config_from_file

    from effir_export.recipe import load_recipe

    config = load_config_from_file(str(REPO / "recipes" / "accelerate" / "mistral-7b-fsdp.yaml"))
    assert config.distributed_type == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    assert (config.num_processes, config.mixed_precision, config.use_cpu) == (8, "bf16", False)
    recipe = load_recipe(REPO / "recipes" / "mistral-7b-effir.yaml")
    assert recipe.model.dtype == "bfloat16"
    for section in (recipe.width, recipe.recovery):
        assert section.distributed.strategy == "fsdp" and section.precision == "bf16"


def test_an_accelerate_fsdp_launch_refuses_a_replicated_training_section(monkeypatch, tmp_path):
    from effir_export.compress.train import ContrastiveTrainer, TrainConfig
    from effir_export.errors import EffirError

    loaded = tiny_loaded("llama")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(EffirError, match=r"set distributed: \{strategy: fsdp\}"):
        ContrastiveTrainer(loaded.model, loaded.tokenizer, loaded.embedding, TrainConfig(data="-"), _pairs(), tmp_path)
    ContrastiveTrainer(loaded.model, loaded.tokenizer, loaded.embedding,  # one process: fsdp is a no-op
                       TrainConfig(data="-", distributed={"strategy": "fsdp"}), _pairs(), tmp_path)
