"""Paper-scale speed-up check: encode throughput of Mistral-7B-shaped retrievers on one GPU.

Random weights (speed does not depend on their values), built with transformers' own Mistral
classes and reshaped with effir-export's Llama-family adapter, exactly as a compressed model is:

- ``full``: 32 layers, every MLP 14336 wide;
- ``effir``: the paper's shape: 16 of 32 MLPs dropped, the other 16 MLPs 30 % narrower;
- ``mlp16``: 16 of 32 MLPs dropped, full width.

For each, query-side (short) and document-side (long) encode throughput (sequences/s, last-token
pooling + L2 norm as the retriever does) in bf16 with SDPA attention, with eager attention, and
with SDPA under ``torch.compile``, plus the peak GPU memory. Prints one table and writes JSON.
Needs only torch (CUDA) and transformers; nothing is downloaded. ``--tiny`` runs the same code on
CPU with a toy shape in seconds (the test suite runs it so this script cannot rot).

    bash bench/gpu.sh                                   # on an H100/H200: ~5 minutes
    python3 bench/gpu_bench.py --tiny --out /tmp/gpu_bench_tiny.json
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import platform
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PAPER_SPEEDUP = {"query": 1.97, "document": 1.82}  # EffiR (arXiv 2512.20612), HF transformers, one H100

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, sliding_window=None)
TINY = dict(hidden_size=64, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, sliding_window=None)


@dataclass(frozen=True)
class Side:
    """One encode workload: ``batch`` sequences of ``length`` tokens."""

    name: str
    batch: int
    length: int


@dataclass(frozen=True)
class Variant:
    """Which MLPs are dropped and how much width the others keep."""

    name: str
    dropped_mlps: tuple[int, ...]
    width_keep: float


def variants(num_layers: int) -> list[Variant]:
    """full, effir (half the MLPs dropped + 30 % narrower), mlp16 (half the MLPs dropped)."""
    half = num_layers // 2
    dropped = tuple(range(half - 1, num_layers - 1))  # a contiguous mid-to-late block, the last layer kept
    return [Variant("full", (), 1.0), Variant("effir", dropped, 0.7), Variant("mlp16", dropped, 1.0)]


def load_adapter():
    """effir-export's Llama-family adapter. Imported without the package ``__init__`` when the full
    package cannot import (a GPU box with only torch + transformers: no pydantic/accelerate)."""
    try:
        return importlib.import_module("effir_export.models.adapters").adapter_by_name("llama")
    except ImportError:
        for name in [m for m in sys.modules if m == "effir_export" or m.startswith("effir_export.")]:
            del sys.modules[name]
        bare = types.ModuleType("effir_export")
        bare.__path__ = [str(REPO / "effir_export")]
        sys.modules["effir_export"] = bare
        return importlib.import_module("effir_export.models.adapters").adapter_by_name("llama")


def build(shape: dict, variant: Variant, device: torch.device, dtype: torch.dtype, attn: str, adapter):
    """A random-weight Mistral backbone reshaped to ``variant`` (weights created on ``device``)."""
    from transformers import MistralConfig, MistralModel

    config = MistralConfig(**shape)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            torch.manual_seed(0)
            model = MistralModel(config)
    finally:
        torch.set_default_dtype(previous)
    adapter.prepare(model)
    width = round(shape["intermediate_size"] * variant.width_keep / 64) * 64 if variant.width_keep < 1 else None
    for index, layer in enumerate(adapter.layers(model)):
        if index in variant.dropped_mlps:
            adapter.remove_mlp(layer)
        elif width is not None:
            adapter.resize_mlp(layer, torch.arange(width, device=device))
    return model.eval()


def encode_fn(model):
    """input_ids, mask -> normalised last-token embeddings (right padding, as the Encoder does)."""

    def encode(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        last = mask.sum(1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    return encode


def time_side(encode, side: Side, vocab: int, device: torch.device, warmup: int, iters: int) -> float:
    """Sequences per second of ``encode`` on random tokens of one side's shape."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(4, vocab, (side.batch, side.length), generator=generator).to(device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        for _ in range(warmup):
            encode(ids, mask)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            encode(ids, mask)
        sync(device)
    return side.batch * iters / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(args, out: Path) -> dict:
    """Measure every (mode, variant); ``out`` is rewritten after each row, so a run cut short keeps its rows."""
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run on a GPU machine, or use --tiny for the CPU check")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("fp32" if args.tiny else "bf16")]
    shape = TINY if args.tiny else MISTRAL_7B
    sides = ([Side("query", 4, 8), Side("document", 2, 32)] if args.tiny
             else [Side("query", args.query_batch, args.query_length), Side("document", args.doc_batch, args.doc_length)])
    modes = [m for m in ("sdpa", "eager", "compile") if m not in args.skip]
    adapter = load_adapter()
    started = time.perf_counter()
    result = {
        "shape": "tiny" if args.tiny else "mistral-7b",
        "config": shape,
        "sides": [asdict(s) for s in sides],
        "dtype": str(dtype).removeprefix("torch."),
        "device": device_name(device),
        "torch": torch.__version__,
        "transformers": importlib.import_module("transformers").__version__,
        "compile_backend": args.compile_backend,
        "paper_speedup_effir": PAPER_SPEEDUP,
        "rows": [],
        "complete": False,
        "command": "python3 bench/gpu_bench.py " + " ".join(sys.argv[1:]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for mode in modes:  # mode-major: the compiled runs, the slowest to start, come last
        for variant in variants(shape["num_hidden_layers"]):
            if mode == "compile" and time.perf_counter() - started > args.compile_deadline_s:
                row = {"variant": variant.name, "mode": mode, "skipped": "time budget"}
            else:
                row = measure(shape, variant, mode, sides, device, dtype, adapter, args)
            result["rows"].append(row)
            add_speedups(result["rows"])
            result["seconds"] = round(time.perf_counter() - started, 1)
            out.write_text(json.dumps(result, indent=2) + "\n")
            print(format_row(row), file=sys.stderr, flush=True)
    result["complete"] = True
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def measure(shape: dict, variant: Variant, mode: str, sides: list[Side], device, dtype, adapter, args) -> dict:
    model = build(shape, variant, device, dtype, "eager" if mode == "eager" else "sdpa", adapter)
    encode = encode_fn(model)
    if mode == "compile":
        encode = torch.compile(encode, backend=args.compile_backend, dynamic=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"variant": variant.name, "mode": mode, "dropped_mlps": len(variant.dropped_mlps),
           "mlp_width": round(shape["intermediate_size"] * variant.width_keep / 64) * 64,
           "params_m": parameters(model) / 1e6, "throughput": {}}
    for side in sides:
        row["throughput"][side.name] = time_side(encode, side, shape["vocab_size"], device, args.warmup, args.iters)
    row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, encode
    torch._dynamo.reset()  # compiled graphs hold the model until reset
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def add_speedups(rows: list[dict]) -> None:
    """Throughput of each variant over ``full`` in the same mode."""
    base = {r["mode"]: r for r in rows if r["variant"] == "full" and "throughput" in r}
    for row in rows:
        ref = base.get(row["mode"])
        if "throughput" in row and ref is not None:
            row["speedup"] = {side: row["throughput"][side] / ref["throughput"][side] for side in row["throughput"]}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"{row['variant']:<6} {row['mode']:<8} skipped ({row['skipped']})"
    t, s = row["throughput"], row.get("speedup", {})
    mem = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "-"
    return (f"{row['variant']:<6} {row['mode']:<8} {row['params_m']:>9.1f} {t['query']:>10.1f} {s.get('query', 0):>6.2f}x "
            f"{t['document']:>10.1f} {s.get('document', 0):>6.2f}x {mem:>8}")


def table(result: dict) -> str:
    q, d = result["sides"]
    head = (f"{result['shape']} on {result['device']}, {result['dtype']}; query {q['batch']}x{q['length']} tokens, "
            f"document {d['batch']}x{d['length']} tokens; paper (EffiR vs full, H100): "
            f"{PAPER_SPEEDUP['query']}x query, {PAPER_SPEEDUP['document']}x document\n"
            f"{'model':<6} {'mode':<8} {'params M':>9} {'query/s':>10} {'speedup':>7} {'docs/s':>10} {'speedup':>7} {'peak GB':>8}")
    return "\n".join([head] + [format_row(r) for r in result["rows"]])


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Encode throughput of full vs EffiR-shaped Mistral-7B (random weights).")
    parser.add_argument("--tiny", action="store_true", help="toy shape on CPU (seconds): checks the script itself")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 (fp32 with --tiny)")
    parser.add_argument("--query-batch", type=int, default=256)
    parser.add_argument("--query-length", type=int, default=32)
    parser.add_argument("--doc-batch", type=int, default=32)
    parser.add_argument("--doc-length", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per side (default 3; 1 with --tiny)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per side (default 10; 2 with --tiny)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["sdpa", "eager", "compile"], help="modes to leave out")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only)")
    parser.add_argument("--compile-deadline-s", type=float, default=360.0,
                        help="skip torch.compile runs that would start after this many seconds (keeps the run < 10 min)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default bench/results/gpu_bench.json)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.iters = args.iters if args.iters is not None else (2 if args.tiny else 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or REPO / "bench" / "results" / ("gpu_bench_tiny.json" if args.tiny else "gpu_bench.json")
    result = run(args, out)
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
