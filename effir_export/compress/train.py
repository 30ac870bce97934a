"""Training of an :class:`EffirModel` on text pairs: the reference fine-tune, the gate stage and recovery
all run through :class:`ContrastiveTrainer`, with one of three objectives (``objective:``):
``contrastive`` (InfoNCE on the labelled pairs), ``distill`` (reproduce the uncompressed teacher's
embeddings and in-batch similarity distributions; labels unused) or ``mixed`` (distill plus a weighted
InfoNCE term).

Each query is scored against every positive in its micro-batch (in-batch negatives) and the hard
negatives, with the model's own prompts and pooling; a positive that belongs to the same query (or
repeats the query's positive) is masked out rather than counted as a negative. LoRA (``peft``) wraps
the attention and MLP projections the adapter exposes and is merged before the model leaves the
trainer. Batches are a pure function of (seed, step) and checkpoints hold the trainable tensors, the
optimizer state and the RNG state (safetensors + JSON, no pickle), so a resumed run ends with the
same weights as an uninterrupted one.

Under torchrun (N ranks) every optimizer step takes N x ``accumulation`` micro-batches: rank r the
micro-batches r, r + N, ..., gradients averaged over the ranks, so N ranks give the weights one process
gets with ``accumulation`` x N (tested equal within float tolerance). In-batch negatives stay within a
micro-batch, unless ``gather_negatives: true``: then each query's InfoNCE candidates are the positives
and hard negatives of every rank's micro-batch, gathered with the differentiable
``torch.distributed.nn.functional.all_gather``, so N ranks with ``batch_size`` B train as one process
with ``batch_size`` N x B. Only rank 0 writes checkpoints. ``distributed: {strategy: fsdp}`` shards the
backbone's parameters, gradients and optimizer state over the ranks instead of replicating them
(torch's FSDP2 ``fully_shard``, one unit per layer), for models whose training state does not fit one
device; the merged model is gathered back whole at the end.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..errors import EffirError
from ..models.embedding import EmbeddingConfig, pad_batch, tokenize_texts
from ..models.encoder import select_device
from ..models.format import EffirModel, atomic_directory
from ..models.precision import effective_dtype
from ..schema import StrictModel
from .distill import DistillSettings, TeacherEmbeddings, distill_loss
from .pairs import TrainingPair


class CheckpointError(EffirError):
    """A training checkpoint cannot be used to resume this run."""


class LoraSettings(StrictModel):
    """Low-rank adapters on the layers' projections (merged into the weights before saving).

    ```yaml
    lora: {rank: 16, alpha: 32, dropout: 0.0, modules: all}   # modules: all | attention | mlp
    ```
    """

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    modules: Literal["all", "attention", "mlp"] = "all"


class DistributedSettings(StrictModel):
    """How torchrun's ranks hold the model while they train (one process: no effect).

    ```yaml
    distributed: {strategy: ddp}   # ddp: every rank a whole copy, gradients all-reduced
                                   # fsdp: parameters, gradients, optimizer state sharded (FSDP2)
    ```
    """

    strategy: Literal["ddp", "fsdp"] = "ddp"


class TrainConfig(StrictModel):
    """Training on text pairs: data, objective, optimisation, precision, checkpoints.

    ```yaml
    data: ../data/msmarco_subset_pairs/pairs.jsonl   # JSONL query/positive/negative(s), a BEIR folder,
                               # a .txt file of passages (Inverse Cloze pairs), or a list of these (mixed)
    split: train               # qrels split when data is a BEIR folder
    max_pairs: null            # use only the first N pairs of each source
    steps: 30                  # optimizer steps
    batch_size: 8              # queries per micro-batch (in-batch negatives come from it)
    accumulation: 1            # micro-batches per optimizer step
    hard_negatives: 1          # negatives per query from the data (0 = in-batch only)
    gather_negatives: false    # torchrun: InfoNCE candidates from every rank's micro-batch (= batch_size x N)
    distributed: {strategy: ddp}   # torchrun: ddp (replicated) | fsdp (sharded over the ranks)
    objective: contrastive     # contrastive | distill | mixed (distill + distill.contrastive_weight x InfoNCE)
    distill: {embedding_loss: cosine, embedding_weight: 1.0, kl_weight: 1.0, kl_temperature: 0.05,
              contrastive_weight: 0.1}   # the teacher is the build's reference (the uncompressed model)
    temperature: 0.02          # InfoNCE
    learning_rate: 1.0e-4
    weight_decay: 0.0
    warmup_steps: 0            # linear warm-up, then linear decay to 0
    max_grad_norm: 1.0
    max_length: 64             # training sequence length (the model's embedding max_length if null)
    lora: {rank: 16, alpha: 32, dropout: 0.0, modules: all}   # null = full fine-tuning
    gradient_checkpointing: false
    precision: bf16            # fp32 | bf16 (autocast)
    seed: 0
    device: auto               # auto | cpu | cuda | cuda:1 ...
    checkpoint_every: 0        # optimizer steps between checkpoints (0 = none)
    checkpoint_dir: null       # where checkpoints persist (default: the stage's work folder)
    resume: true               # continue from a matching checkpoint in checkpoint_dir
    probe: 32                  # pairs (from the end of the data) whose embeddings are compared before/after
    ```
    """

    data: str | list[str]
    split: str = "train"
    max_pairs: int | None = Field(None, ge=1)
    steps: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    accumulation: int = Field(1, ge=1)
    hard_negatives: int = Field(1, ge=0)
    gather_negatives: bool = False
    distributed: DistributedSettings = DistributedSettings()
    objective: Literal["contrastive", "distill", "mixed"] = "contrastive"
    distill: DistillSettings = DistillSettings()
    temperature: float = Field(0.02, gt=0.0)
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    max_length: int | None = Field(None, ge=2)
    lora: LoraSettings | None = LoraSettings()
    gradient_checkpointing: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = Field(0, ge=0)
    checkpoint_dir: str | None = None
    resume: bool = True
    probe: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _gathering_needs_info_nce(self) -> "TrainConfig":
        if self.gather_negatives and self.objective == "distill":
            raise ValueError("gather_negatives widens InfoNCE's negatives and objective 'distill' has no InfoNCE "
                             "term; use objective: contrastive or mixed, or gather_negatives: false")
        return self

    def identity(self) -> dict:
        """The settings that change the result (checkpoint bookkeeping excluded)."""
        return self.model_dump(exclude={"checkpoint_every", "checkpoint_dir", "resume", "device"})

    @property
    def uses_teacher(self) -> bool:
        return self.objective != "contrastive"


@dataclass
class TrainResult:
    """What a training run did: the loss after every optimizer step and where it started."""

    losses: list[float] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    ranks: int = 1
    sharded_fraction: float = 1.0  # of the trainable parameters each rank holds (FSDP: about 1 / ranks)

    def summary(self) -> dict:
        head = self.losses[: max(1, len(self.losses) // 5)]
        tail = self.losses[-max(1, len(self.losses) // 5):]
        return {"steps": len(self.losses), "resumed_from": self.resumed_from,
                "loss_first": round(sum(head) / len(head), 5) if head else None,
                "loss_last": round(sum(tail) / len(tail), 5) if tail else None,
                "seconds": round(self.seconds, 2),
                "distributed": {"ranks": self.ranks, "sharded_fraction": round(self.sharded_fraction, 4)}}


class TrainingExtension(nn.Module):
    """Extra trainable state beside the model (the width gates): its own optimizer groups, work
    before each micro-batch, and a term added to the loss with metrics for the progress bar."""

    def param_groups(self) -> list[dict]:
        """Optimizer groups (``params``, ``lr``; ``scheduled: False`` keeps the learning rate constant)."""
        return []

    def before_batch(self, step: int) -> None:
        """Called before every micro-batch (e.g. to draw gate noise)."""

    def penalty(self, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        return None, {}


def info_nce(queries: torch.Tensor, documents: torch.Tensor, temperature: float,
             mask: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
    """InfoNCE: query i's positive is document ``first`` + i; every other document (other positives in the
    batch, hard negatives) is a negative unless ``mask[i, j]`` is True."""
    logits = queries.float() @ documents.float().T / temperature
    if mask is not None:
        logits = logits.masked_fill(mask, float("-inf"))
    return nn.functional.cross_entropy(logits, torch.arange(first, first + len(queries), device=logits.device))


def false_negative_mask(batch: list[TrainingPair], documents: list[str]) -> torch.Tensor:
    """True where document j is not query i's positive but is relevant to it (same query, or the same text)."""
    mask = torch.zeros(len(batch), len(documents), dtype=torch.bool)
    for i, pair in enumerate(batch):
        for j, text in enumerate(documents):
            if j != i and (text == pair.positive or (j < len(batch) and batch[j].query == pair.query)):
                mask[i, j] = True
    return mask


def lora_target_names(model: EffirModel, modules: str) -> list[str]:
    """Full names of the linear maps inside the layers, split into MLP and attention by the adapter."""
    adapter = model.adapter
    names = []
    for index, layer in enumerate(model.layers):
        mlp_ids = {id(m) for part in adapter.mlp_modules(layer) for m in part.modules()}
        prefix = f"backbone.{_child_path(model.backbone, layer)}"
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                in_mlp = id(module) in mlp_ids
                if modules == "all" or (modules == "mlp") == in_mlp:
                    names.append(f"{prefix}.{name}")
    if not names:
        raise EffirError(f"no {modules} projections left to put LoRA on; use lora.modules: all or full fine-tuning")
    return names


def _child_path(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in root.named_modules() if module is target)


class ContrastiveTrainer:
    """Train ``model`` (in place) on ``pairs``; :meth:`finish` merges LoRA and returns the plain model.
    ``teacher`` (the teacher's embeddings of every text the batches use, see :meth:`texts`) is set
    before :meth:`train` when the objective distills."""

    def __init__(self, model: EffirModel, tokenizer, settings: EmbeddingConfig, config: TrainConfig,
                 pairs: list[TrainingPair], checkpoint_dir: Path):
        if len(pairs) < 2:
            raise EffirError(f"training needs at least 2 pairs (got {len(pairs)}); add training data")
        if distributed.accelerate_shards() and config.distributed.strategy != "fsdp":
            raise EffirError("accelerate launched this run with an FSDP config, and the training section says "
                             "distributed: {strategy: ddp}; set distributed: {strategy: fsdp} (the recipe decides)")
        self.config = config
        self.teacher: TeacherEmbeddings | None = None
        self.tokenizer = tokenizer
        self.settings = settings.model_copy(update={"max_length": config.max_length or settings.max_length})
        self.pairs = pairs
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = select_device(config.device)
        requested = torch.bfloat16 if config.precision == "bf16" else None
        self.autocast_bf16 = effective_dtype(requested, self.device) is torch.bfloat16  # fp32 without native bf16
        torch.manual_seed(config.seed)
        self.model = model.to(self.device)
        self.peft = None
        if config.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = config.lora
            targets = lora_target_names(model, lora.modules)
            self.peft = get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                         target_modules=targets, bias="none"))
        if config.gradient_checkpointing:
            model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._plain: nn.Module | None = None  # under FSDP: the unsharded twin that finish() fills

    def _shard(self) -> nn.Module:
        """Shard the backbone over the ranks (each layer, then the rest); returns a twin of the model (or of
        its LoRA wrapper) on the meta device, into which :meth:`finish` gathers the trained weights. Done
        when training starts, so encoding before it (probes, inference mode) sees the plain model."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        wrapper = self.peft if self.peft is not None else self.model
        memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in wrapper.parameters()}
        twin = copy.deepcopy(wrapper, memo)  # parameters on meta (no second copy of the weights), buffers copied
        mesh = init_device_mesh(self.device.type, (distributed.world_size(),))
        for layer in self.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model.backbone, mesh=mesh)  # the root: EffirModel.embed calls the backbone module
        return twin

    # --- data --------------------------------------------------------------------------------------
    def batch(self, micro_step: int) -> list[TrainingPair]:
        """The pairs of micro-batch ``micro_step``: a seeded permutation per epoch, read in order."""
        size, count = self.config.batch_size, len(self.pairs)
        rows = []
        for position in range(micro_step * size, (micro_step + 1) * size):
            epoch, offset = divmod(position, count)
            rows.append(int(self._permutation(epoch)[offset]))
        return [self.pairs[r] for r in rows]

    def _permutation(self, epoch: int) -> torch.Tensor:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.pairs), generator=generator))
        return self._perm_cache[1]

    def _encode(self, texts: list[str], kind: str) -> torch.Tensor:
        ids, mask = pad_batch(tokenize_texts(self.tokenizer, texts, self.settings, kind), self.tokenizer.pad_token_id)
        ids, mask = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
        return self.model.embed(ids, mask)

    def documents(self, batch: list[TrainingPair]) -> list[str]:
        """A micro-batch's candidate documents: the positives, then each pair's hard negatives."""
        return [p.positive for p in batch] + [n for p in batch for n in p.negatives[: self.config.hard_negatives]]

    def micro_index(self, step: int, micro: int) -> int:
        """The global micro-batch this rank computes as micro-batch ``micro`` of optimizer step ``step``."""
        world = distributed.world_size()
        return (step * self.config.accumulation + micro) * world + distributed.rank()

    def texts(self) -> tuple[list[str], list[str]]:
        """Every query and document the run's micro-batches use on any rank (what the teacher must embed)."""
        queries, documents = {}, {}
        for micro in range(self.config.steps * self.config.accumulation * distributed.world_size()):
            batch = self.batch(micro)
            queries.update(dict.fromkeys(p.query for p in batch))
            documents.update(dict.fromkeys(self.documents(batch)))
        return list(queries), list(documents)

    def rank_batches(self, micro_index: int) -> list[list[TrainingPair]]:
        """Every rank's micro-batch in the optimizer step where this rank computes ``micro_index``."""
        first = micro_index - distributed.rank()
        return [self.batch(first + r) for r in range(distributed.world_size())]

    def micro_batch_loss(self, batch: list[TrainingPair],
                         peers: list[list[TrainingPair]] | None = None) -> torch.Tensor:
        """The objective on one micro-batch: InfoNCE, the distillation loss, or both. With ``peers`` (every
        rank's micro-batch, :meth:`rank_batches`) InfoNCE's candidates are gathered from all ranks."""
        config = self.config
        documents = self.documents(batch)
        query_texts = [p.query for p in batch]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            queries = self._encode(query_texts, "query")
            docs = self._encode(documents, "document")
        if config.objective == "contrastive":
            return self._info_nce(batch, documents, queries, docs, peers)
        if self.teacher is None:
            raise EffirError(f"objective '{config.objective}' needs the teacher's embeddings; set trainer.teacher "
                             "(the training stages do it from the build's reference)")
        loss = distill_loss(queries, docs, self.teacher.lookup(query_texts, "query", self.device),
                            self.teacher.lookup(documents, "document", self.device), config.distill)
        if config.objective == "mixed":
            loss = loss + config.distill.contrastive_weight * self._info_nce(batch, documents, queries, docs, peers)
        return loss

    def _info_nce(self, batch: list[TrainingPair], documents: list[str], queries: torch.Tensor,
                  docs: torch.Tensor, peers: list[list[TrainingPair]] | None) -> torch.Tensor:
        if peers is None:
            return info_nce(queries, docs, self.config.temperature,
                            false_negative_mask(batch, documents).to(self.device))
        return self._gathered_info_nce(peers, queries, docs)

    def _gathered_info_nce(self, peers: list[list[TrainingPair]], queries: torch.Tensor,
                           docs: torch.Tensor) -> torch.Tensor:
        """InfoNCE of this rank's queries against every rank's candidates, ordered as one process orders the
        concatenated batch (all positives, then all hard negatives); the mean over the ranks is that
        process's loss, and gradients flow back to the rank that embedded each candidate."""
        from torch.distributed.nn.functional import all_gather

        counts = [len(self.documents(b)) for b in peers]
        padded = nn.functional.pad(docs, (0, 0, 0, max(counts) - len(docs)))  # all_gather needs equal shapes
        gathered = all_gather(padded)
        sizes = [len(b) for b in peers]
        candidates = torch.cat([g[:n] for g, n in zip(gathered, sizes)]
                               + [g[n:c] for g, n, c in zip(gathered, sizes, counts)])
        merged = [pair for b in peers for pair in b]
        first = sum(sizes[: distributed.rank()])
        mask = false_negative_mask(merged, self.documents(merged))[first: first + len(queries)]
        return info_nce(queries, candidates, self.config.temperature, mask.to(self.device), first)

    # --- training ------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def train(self, extension: TrainingExtension | None = None, progress: bool = True,
              on_step: Callable[[int], None] | None = None) -> TrainResult:
        """Run (or resume) ``config.steps`` optimizer steps; ``on_step(step)`` runs after each one."""
        config = self.config
        if config.distributed.strategy == "fsdp" and distributed.active():
            self._plain = self._shard()
        extension = (extension or TrainingExtension()).to(self.device)
        groups = [{"params": list(self.trainable().values()), "lr": config.learning_rate,
                   "weight_decay": config.weight_decay, "base_lr": config.learning_rate, "scheduled": True}]
        groups += [{"weight_decay": 0.0, "scheduled": True, **g, "base_lr": g["lr"]} for g in extension.param_groups()]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
        result = TrainResult(ranks=distributed.world_size(), sharded_fraction=self._held_fraction())
        key = self._checkpoint_key(extension)
        start = self._load_checkpoint(key, extension, optimizer, result) if config.resume else 0
        result.resumed_from = start
        self.model.train()
        extension.train()
        began = time.perf_counter()
        bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="training", unit="step",
                   disable=not progress or not distributed.is_main())
        for step in bar:
            self._set_learning_rates(optimizer, step)
            optimizer.zero_grad(set_to_none=True)
            total, metrics = 0.0, {}
            for micro in range(config.accumulation):
                extension.before_batch(step)
                index = self.micro_index(step, micro)
                peers = self.rank_batches(index) if config.gather_negatives and distributed.active() else None
                loss = self.micro_batch_loss(self.batch(index), peers)
                penalty, metrics = extension.penalty(step)
                objective = loss if penalty is None else loss + penalty
                (objective / config.accumulation).backward()
                total += float(loss.detach()) / config.accumulation
            distributed.average_gradients(p for g in groups for p in g["params"])
            total = float(distributed.all_reduce_sum_(torch.tensor(total, dtype=torch.float64))) / distributed.world_size()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(groups[0]["params"], config.max_grad_norm)
            optimizer.step()
            result.losses.append(total)
            bar.set_postfix(loss=f"{total:.4f}", **{k: f"{v:.3f}" for k, v in metrics.items()})
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                self._save_checkpoint(step + 1, key, extension, optimizer, result)
            if on_step is not None:
                on_step(step + 1)
        self.model.eval()
        extension.eval()
        result.seconds = time.perf_counter() - began
        return result

    def _held_fraction(self) -> float:
        """The share of the trainable parameters this rank holds (1.0 unless FSDP shards them)."""
        from torch.distributed.tensor import DTensor

        params = list(self.trainable().values())
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
        return held / max(1, sum(p.numel() for p in params))

    def finish(self) -> EffirModel:
        """Merge LoRA into the weights, turn gradient checkpointing off and return the plain model (sharded
        weights gathered whole on every rank)."""
        wrapper = self.peft if self.peft is not None else self.model
        if self._plain is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
            wrapper = self._plain
            (wrapper.base_model.model if self.peft is not None else wrapper).load_state_dict(full, assign=True)
        model = wrapper.merge_and_unload() if self.peft is not None else wrapper
        if self.config.gradient_checkpointing:
            model.backbone.gradient_checkpointing_disable()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model.eval()

    def _set_learning_rates(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        warmup, total = self.config.warmup_steps, self.config.steps
        factor = (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * (factor if group["scheduled"] else 1.0)

    # --- checkpoints ---------------------------------------------------------------------------------
    def _checkpoint_key(self, extension: nn.Module) -> str:
        facts = {"config": self.config.identity(), "world_size": distributed.world_size(), "layers": self.model.config.layers, "pairs": len(self.pairs),
                 "extension": {k: list(v.shape) for k, v in extension.state_dict().items()},
                 "trainable": {k: list(v.shape) for k, v in self.trainable().items()},
                 "teacher": self.teacher.fingerprint if self.teacher is not None else None}
        return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _save_checkpoint(self, step: int, key: str, extension: nn.Module, optimizer, result: TrainResult) -> None:
        """Rank 0 writes the checkpoint; under FSDP every rank first helps gather the sharded tensors whole."""
        if distributed.is_main() or self._plain is not None:
            tensors = {f"model.{k}": _whole(v) for k, v in self.trainable().items()}
            tensors.update({f"extension.{k}": _whole(v) for k, v in extension.state_dict().items()})
            tensors["rng.torch"] = torch.get_rng_state()
            if self.device.type == "cuda":
                tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            optimizer_state = _flatten(optimizer.state_dict(), "optimizer", tensors)
            if distributed.is_main():
                self._write_checkpoint(tensors, {"key": key, "step": step, "losses": result.losses,
                                                 "optimizer": optimizer_state})
        distributed.barrier()

    def _write_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        with atomic_directory(self.checkpoint_dir / "latest") as tmp:
            save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
            (tmp / "state.json").write_text(json.dumps(meta))

    def _load_checkpoint(self, key: str, extension: nn.Module, optimizer, result: TrainResult) -> int:
        found = distributed.run_on_main(lambda: self._read_checkpoint(key))  # every rank resumes from rank 0's
        if found is None:
            return 0
        meta, tensors = found
        with torch.no_grad():
            for name, parameter in self.trainable().items():
                parameter.copy_(_shaped_like(parameter, tensors[f"model.{name}"]))
        extension.load_state_dict({k[len("extension."):]: v for k, v in tensors.items() if k.startswith("extension.")})
        optimizer.load_state_dict(_unflatten(meta["optimizer"], tensors))
        for group in optimizer.param_groups:  # FSDP: the moments go back to their parameters' shards
            for parameter in group["params"]:
                state = optimizer.state.get(parameter, {})
                for name, value in state.items():
                    if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                        state[name] = _shaped_like(parameter, value)
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        result.losses = list(meta["losses"])
        return int(meta["step"])

    def _read_checkpoint(self, key: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The latest checkpoint's metadata and tensors (None when there is none); refuses another run's."""
        folder = self.checkpoint_dir / "latest"
        for stale in self.checkpoint_dir.glob(".latest.*-*"):  # left by a save that was killed mid-way
            shutil.rmtree(stale, ignore_errors=True)
        if not (folder / "state.json").is_file():
            return None
        meta = json.loads((folder / "state.json").read_text())
        if meta["key"] != key:
            raise CheckpointError(f"checkpoint {folder} was made by a different run (config, data or model differ); "
                                  f"delete it or set resume: false")
        return meta, load_file(str(folder / "state.safetensors"))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, gathered whole when FSDP shards it (a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def _shaped_like(parameter: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` on ``parameter``'s device, sharded as ``parameter`` is when FSDP shards it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(parameter.device)
    if isinstance(parameter, DTensor):
        return distribute_tensor(whole.to(parameter.dtype), parameter.device_mesh, parameter.placements)
    return whole


def _flatten(value, path: str, tensors: dict[str, torch.Tensor]):
    """JSON-able form of a nested state dict; tensors go to ``tensors`` under their path (whole)."""
    if isinstance(value, torch.Tensor):
        tensors[path] = _whole(value)
        return {"tensor": path}
    if isinstance(value, dict):
        return {"items": [[k, _flatten(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"list": [_flatten(v, f"{path}.{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    return {"value": value}


def _unflatten(node: dict, tensors: dict[str, torch.Tensor]):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "items" in node:
        return {k: _unflatten(v, tensors) for k, v in node["items"]}
    if "list" in node:
        items = [_unflatten(v, tensors) for v in node["list"]]
        return tuple(items) if node["tuple"] else items
    return node["value"]
