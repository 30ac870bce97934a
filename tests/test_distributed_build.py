"""``effir-export build`` with 2 ranks (gloo on loopback): under torchrun and through ``--nproc`` it trains,
scores and validates like one process with twice the accumulation, rank 0 alone writes, and rank 0's cache
decision holds on every rank; a rank killed mid-training fails the job in bounded time, leaves no stage
folder, and the rerun resumes to the output of an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_loaded
from test_distributed import CALIBRATION, WORDS, _free_port
from test_validation_metrics import write_beir

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parents[1]
BUILT = ["01-finetune", "02-depth", "03-onnx", "04-validation"]


def write_workspace(ws: Path) -> None:
    """A tiny model, training pairs, calibration text and BEIR folder."""
    from effir_export.models.format import save_model

    loaded = tiny_loaded("llama", seed=0)
    save_model(loaded.model, loaded.tokenizer, ws / "base")
    (ws / "calibration.txt").write_text(CALIBRATION)
    (ws / "pairs.jsonl").write_text("\n".join(json.dumps({
        "query": f"query {i} {WORDS[i % 12]}", "positive": f"passage {i} about {WORDS[(i + 3) % 12]}",
        "negative": f"other {WORDS[(i + 5) % 12]}"}) for i in range(12)))
    corpus = {f"d{i}": ("", " ".join(WORDS[(i + k) % 12] for k in range(2 + i % 7))) for i in range(23)}
    write_beir(ws / "beir", corpus, {f"q{i}": WORDS[i] for i in range(5)},
               {f"q{i}": {f"d{i}": 1, f"d{i + 10}": 2} for i in range(5)})


def write_recipe(ws: Path, name: str, accumulation: int = 1, steps: int = 3, extra: str = "") -> Path:
    """Fine-tune (checkpointed), depth, ONNX and validation on the workspace's tiny model."""
    path = ws / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        model: {{source: base}}
        embedding: {{max_length: 24}}
        finetune: {{data: pairs.jsonl, steps: {steps}, batch_size: 2, accumulation: {accumulation}, max_length: 16,
                   learning_rate: 5.0e-3, lora: {{rank: 4, alpha: 8}}, probe: 2, checkpoint_every: 1,
                   checkpoint_dir: checkpoints-{name}{extra}}}
        depth:
          score: {{calibration: calibration.txt, samples: 12, max_length: 24}}
          drop: {{mlp: 1}}
        onnx: {{opset: 18}}
        validate: {{reference: torch:base, data: beir, latency: null, memory: null}}
        """))
    return path


def environment(ws: Path) -> dict[str, str]:
    scratch = ws / "scratch"  # where the other ranks' throwaway folders go: must be empty afterwards
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "EFFIR_CACHE": str(ws / "cache"),
            "TMPDIR": str(scratch)}


def torchrun(ws: Path, recipe: Path, out: str, command: str = "build") -> list[str]:
    """2 ranks of ``effir_export build RECIPE`` (or ``compress --recipe RECIPE``) writing ``out``."""
    args = [str(recipe)] if command == "build" else ["--recipe", str(recipe)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "effir_export", command, *args, "--out", out]


def run(ws: Path, command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ws, env=environment(ws), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def own_scratch(ws: Path) -> list[str]:
    """Folders this package left in the scratch TMPDIR (torch's own caches aside)."""
    return [p.name for p in (ws / "scratch").iterdir() if ".tmp-" in p.name or p.name.startswith("effir")]


def ndcg(build: Path) -> dict[str, float]:
    report = json.loads((build / "04-validation" / "report.json").read_text())
    return {row["name"]: row["retrieval"]["ndcg_at_10"] for row in [report["reference"], *report["backends"]]}


@pytest.mark.slow  # three 2-rank launches and one single-process build: ~60 s on 2 cores
def test_a_two_rank_build_equals_one_process_with_twice_the_accumulation_and_rank_0_alone_writes(tmp_path):
    ws = tmp_path
    write_workspace(ws)
    run(ws, torchrun(ws, write_recipe(ws, "ranks"), "two"))
    run(ws, [sys.executable, "-m", "effir_export", "build", str(write_recipe(ws, "single", accumulation=2)),
             "--out", "one"])
    two, one = ws / "two", ws / "one"
    assert sorted(p.name for p in two.iterdir()) == [*BUILT, "build_summary.json", "build_summary.md"]
    assert not own_scratch(ws) and not list(ws.rglob(".*.tmp-*"))  # no rank's scratch or temp folder is left
    got, want = (load_file(str(b / "01-finetune" / "model.safetensors")) for b in (two, one))
    initial = tiny_loaded("llama", seed=0).model.state_dict()
    assert any(not torch.allclose(want[k], initial[k].to(want[k].dtype)) for k in want if k in initial)  # it trained
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5)
    depth = [json.loads((b / "02-depth" / "config.json").read_text())["layers"] for b in (two, one)]
    assert depth[0] == depth[1]  # the same sublayers dropped, from all-reduced scores
    assert ndcg(two) == pytest.approx(ndcg(one), abs=1e-6)
    assert set(ndcg(two)) == {"reference", "compressed", "compressed-bf16", "onnx"}

    rerun = run(ws, [sys.executable, "-m", "effir_export", "build", str(ws / "ranks.yaml"), "--out", "two",
                     "--nproc", "2", "--force", "depth"])
    lines = [line for line in rerun.stderr.splitlines() if line.startswith("[")]
    assert [line.split()[-1] for line in lines if "cached" in line] == ["(01-finetune)", "(03-onnx)", "(04-validation)"]
    assert sum("depth      built" in line for line in lines) == 1  # one rank reports; identical output keeps ONNX
    assert rerun.stdout.count("## build: ranks") == 1


def rank_process(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> psutil.Process:
    """The worker process torchrun started for ``rank``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.05)
    raise AssertionError(f"torchrun started no rank {rank}")


def wait_for(path: Path, launcher: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert launcher.poll() is None, f"the build ended before {path.name} appeared: {launcher.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.005)


@pytest.mark.slow  # three 2-rank builds of a 40-step fine-tune: ~60 s on 2 cores
def test_a_rank_killed_mid_training_fails_the_job_in_bounded_time_and_the_rerun_resumes_to_the_same_output(tmp_path):
    ws = tmp_path
    write_workspace(ws)
    recipe = write_recipe(ws, "killed", steps=40)
    run(ws, torchrun(ws, recipe, "build"))
    (ws / "build").rename(ws / "reference")  # the killed build writes to the same path (paths are recorded)
    shutil.rmtree(ws / "checkpoints-killed")

    launcher = subprocess.Popen(torchrun(ws, recipe, "build"), cwd=ws, env=environment(ws), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        victim, survivor = rank_process(launcher, 1), rank_process(launcher, 0)
        wait_for(ws / "checkpoints-killed" / "latest", launcher)  # after the first checkpoint
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        code = launcher.wait(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert code != 0 and elapsed < 60, (code, elapsed)
    assert not survivor.is_running()  # rank 0 did not outlive the job
    assert not (ws / "build" / "01-finetune").exists()  # no partial stage folder (temp ones: the rerun clears them)

    run(ws, torchrun(ws, recipe, "build"))
    manifests = {b: {s: json.loads((ws / b / s / "manifest.json").read_text()) for s in BUILT}
                 for b in ("build", "reference")}
    assert manifests["build"]["01-finetune"]["report"]["training"]["resumed_from"] > 0
    for stage in BUILT[:2]:  # the models, hashed (the ONNX check and the validation report hold timings)
        assert manifests["build"][stage]["output_hash"] == manifests["reference"][stage]["output_hash"], stage
    assert (ws / "build" / "03-onnx" / "model.onnx").read_bytes() == (ws / "reference/03-onnx/model.onnx").read_bytes()
    assert ndcg(ws / "build") == ndcg(ws / "reference")
    assert not list(ws.rglob(".*.tmp-*")) and not own_scratch(ws)


def write_width_recipe(ws: Path, strategy: str) -> Path:
    """Depth, then the width stage (gates + LoRA, bf16 autocast, gradient checkpointing, a checkpoint) held as
    ``strategy`` says."""
    path = ws / f"width-{strategy}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: width-{strategy}
        model: {{source: base}}
        embedding: {{max_length: 24}}
        depth:
          score: {{calibration: calibration.txt, samples: 12, max_length: 24}}
          drop: {{mlp: 1}}
        width: {{data: pairs.jsonl, steps: 4, batch_size: 2, max_length: 16, lora: {{rank: 4, alpha: 8}}, probe: 2,
                precision: bf16, gradient_checkpointing: true, checkpoint_every: 2,
                checkpoint_dir: checkpoints-{strategy}, distributed: {{strategy: {strategy}}}, sparsity: {{target: 0.25}}}}
        """))
    return path


CPU_FSDP_ACCELERATE = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
mixed_precision: 'no'
num_machines: 1
num_processes: 2
machine_rank: 0
main_training_function: main
rdzv_backend: static
same_network: true
use_cpu: true
fsdp_config: {fsdp_version: 2}
"""


@pytest.mark.integration  # three 2-rank launches of a tiny compress: ~25 s on 2 cores
def test_accelerate_launch_with_fsdp_trains_the_width_stage_as_replicated_ranks_do(tmp_path):
    ws = tmp_path
    write_workspace(ws)
    (ws / "accelerate.yaml").write_text(CPU_FSDP_ACCELERATE)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ws / "accelerate.yaml"),
                  "--main_process_port", str(_free_port()), "-m", "effir_export", "compress", "--recipe"]
    run(ws, torchrun(ws, write_width_recipe(ws, "ddp"), "ddp", command="compress"))
    run(ws, [*accelerate, str(write_width_recipe(ws, "fsdp")), "--out", "fsdp"])
    reports = {name: json.loads((ws / name / "compress_report.json").read_text())["stages"]["width"]
               for name in ("ddp", "fsdp")}
    assert reports["fsdp"]["training"]["distributed"] == {"ranks": 2, "sharded_fraction": 0.5}
    assert reports["ddp"]["training"]["distributed"] == {"ranks": 2, "sharded_fraction": 1.0}
    assert reports["fsdp"]["mlp_widths"] == reports["ddp"]["mlp_widths"]  # the same neurons cut
    sharded, replicated = (load_file(str(ws / name / "model.safetensors")) for name in ("fsdp", "ddp"))
    assert set(sharded) == set(replicated)
    for name, tensor in replicated.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-5, atol=1e-6)

    refused = subprocess.run([*accelerate, str(ws / "width-ddp.yaml"), "--out", "refused"], cwd=ws,
                             env=environment(ws), capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "set distributed: {strategy: fsdp}" in refused.stderr
    assert not (ws / "refused").exists()


def test_nproc_inside_torchrun_is_refused_before_any_rank_starts(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from effir_export.cli import main

    write_workspace(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "outer")  # what torchrun sets in its workers
    result = CliRunner().invoke(main, ["build", str(write_recipe(tmp_path, "nested")), "--out",
                                       str(tmp_path / "out"), "--nproc", "2"])
    assert result.exit_code == 2 and "already runs under it; drop --nproc" in result.output
    assert not (tmp_path / "out").exists()
