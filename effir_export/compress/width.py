"""The width stage: gate every kept MLP's neurons, train the objective (InfoNCE, distillation from the
reference, or both) + Lagrangian-controlled relaxed L0 until the target share of neurons is closed, then
fold the gates and cut exactly the target share."""
from __future__ import annotations

from pathlib import Path

import torch

from ..accounting import account, compare_accounts
from ..models.sources import LoadedModel
from . import StageOutput
from .finetune import EmbeddingProbe, StageTraining
from .gates import MlpGates
from .sparsity import LagrangianController, SparsityConfig, make_relaxation, sparsity
from .train import TrainConfig, TrainingExtension


class WidthConfig(TrainConfig):
    """EffiR's fine-grained stage: the training settings of ``TrainConfig`` plus the sparsity target.

    ```yaml
    width:
      data: ../data/msmarco_subset_pairs/pairs.jsonl
      steps: 30
      batch_size: 8
      max_length: 64
      precision: bf16
      lora: null                 # train only the gates (or LoRA alongside them)
      sparsity: {target: 0.3, scope: overall, relaxation: sigmoid, gate_lr: 0.2, lagrangian_lr: 0.5, warmup: 0.3}
    ```
    """

    sparsity: SparsityConfig = SparsityConfig()


class GateTraining(TrainingExtension):
    """The gates and the Lagrange multipliers as one trainer extension."""

    def __init__(self, gates: MlpGates, config: SparsityConfig, total_steps: int):
        super().__init__()
        self.gates = gates
        self.config = config
        self.total_steps = total_steps
        groups = len(gates.sizes) if config.scope == "per_layer" else 1
        self.controller = LagrangianController(groups, linear=config.multipliers == "linear+quadratic")

    def param_groups(self) -> list[dict]:
        """Gates and multipliers keep a constant learning rate (as in CoFi): a gate whose learning rate
        has decayed can no longer follow the controller, so late in training the target would be missed."""
        multipliers = [p for p in self.controller.parameters() if p.requires_grad]
        return [{"params": list(self.gates.z), "lr": self.config.gate_lr, "scheduled": False},
                {"params": multipliers, "lr": self.config.lagrangian_lr, "scheduled": False}]

    def before_batch(self, step: int) -> None:
        self.gates.resample()

    def penalty(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        current = sparsity(self.gates.open_probabilities(), self.gates.closed(), self.config.scope)
        target = self.config.target_at(step, self.total_steps)
        return self.controller(current, target), {"target": target, "sparsity": self.gates.closed_fraction()}


def run_width_stage(loaded: LoadedModel, config: WidthConfig, recipe, work_dir: Path,
                    progress: bool = True, teacher: str | None = None) -> StageOutput:
    """Train gates on ``loaded`` (in place; distilling from the model at ``teacher`` when the objective
    says so), fold them and cut the MLPs to the target width."""
    before = account(loaded.model)
    training = StageTraining(loaded, config, recipe, work_dir, teacher)
    trainer = training.trainer
    reference = EmbeddingProbe(loaded, training.probe)
    gates = MlpGates(loaded.model, make_relaxation(config.sparsity))
    gates.attach(loaded.model)  # after LoRA: the hook sits on the module the layer calls
    extension = GateTraining(gates, config.sparsity, config.steps)
    result = trainer.train(extension, progress=progress)
    closed = gates.closed_fraction()
    gates.detach()
    model = trainer.finish()
    keep = gates.select_keep(config.sparsity.target, config.sparsity.scope, config.sparsity.multiple_of)
    gates.fold(model, keep)
    loaded.model = model
    after = account(model)
    widths_before = [s.intermediate_size for s in before.layers if s.mlp]
    widths_after = [s.intermediate_size for s in after.layers if s.mlp]
    report = {
        "training": result.summary(),
        "objective": config.objective,
        "target": config.sparsity.target,
        "closed_by_training": round(closed, 5),
        "removed_fraction": round(1 - sum(widths_after) / sum(widths_before), 5),
        "mlp_widths": widths_after,
        "probe_cosine": reference.compare(loaded),
        **training.report(loaded),
        **compare_accounts(before, after),
    }
    return StageOutput(loaded=loaded, report=report)

