"""GPTQ checkpoint of a compressed SmolLM2-135M: size and embedding fidelity on CPU.

The compressed model is SmolLM2-135M with every other MLP dropped (15 of 30, via the adapter), the
depth shape EffiR's scoring typically picks at this ratio. It is quantised with ``export_gptq``
(GPTQModel in ``.venv-gptq``) on MS MARCO calibration passages, reloaded with
``load_gptq_model`` and compared with the fp32 compressed model on held-out DBpedia queries and
documents. Writes ``bench/results/gptq_smollm2.{json,md}``.

    python3 bench/gptq_smollm2.py [--group-size 64] [--samples 128]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
RESULTS = REPO / "bench" / "results"


def held_out_texts(n_queries: int, n_docs: int) -> tuple[list[str], list[str]]:
    queries = [json.loads(line)["text"] for line in (DATA / "dbpedia_subset" / "queries.jsonl").open()][:n_queries]
    docs = []
    for line in (DATA / "dbpedia_subset" / "corpus.jsonl").open():
        row = json.loads(line)
        docs.append(f"{row.get('title', '')} {row['text']}".strip())
        if len(docs) == n_docs:
            break
    return queries, docs


def rtn_copy(model, quantised):
    """The fp32 model with every GPTQ-quantised weight rounded to nearest on the same 4-bit grid."""
    from effir_export.export.gptq_loader import gptq_weights
    from effir_export.quant.gptq import rtn_quantize

    rtn = copy.deepcopy(model)
    for name, weight in gptq_weights(quantised).items():
        linear = rtn.get_submodule(name)
        group = weight.as_quantized_weight().group_size
        with torch.no_grad():
            linear.weight.copy_(rtn_quantize(linear.weight, weight.bits, group, symmetric=True).dequantize())
    return rtn


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--docs", type=int, default=200)
    args = parser.parse_args()

    from effir_export.export.gptq import GptqConfig, export_gptq
    from effir_export.export.gptq_loader import load_gptq_model
    from effir_export.models.encoder import Encoder
    from effir_export.models.sources import load_model

    loaded = load_model("smollm2-135m")
    model = loaded.model
    for index, layer in enumerate(model.layers):
        if index % 2 == 1:
            model.adapter.remove_mlp(layer)
    model.sync_config()
    fp32_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    config = GptqConfig(group_size=args.group_size, samples=args.samples, max_length=args.max_length)
    queries, docs = held_out_texts(50, args.docs)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gptq"
        start = time.perf_counter()
        report = export_gptq(loaded, DATA / "calibration" / "msmarco_passages.txt", out, config)
        quantise_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
        quantised = load_gptq_model(out)
    reference = Encoder(model, loaded.tokenizer, device="cpu")
    expected = {kind: reference.encode(texts, kind=kind) for kind, texts in (("query", queries), ("document", docs))}
    candidates = {"gptq": quantised, "rtn": rtn_copy(model, quantised), "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    cos = {}
    for label, candidate in candidates.items():
        encoder = Encoder(candidate, loaded.tokenizer, device="cpu")
        cos[label] = {kind: cosine_rows(expected[kind], encoder.encode(texts, kind=kind))
                      for kind, texts in (("query", queries), ("document", docs))}
    result = {
        "model": "smollm2-135m, MLPs of odd layers dropped (15 of 30)",
        "gptq": config.model_dump(exclude={"calibration"}),
        "calibration": "data/calibration/msmarco_passages.txt",
        "quantized_linears": report["quantized_linears"],
        "checkpoint_bytes": size,
        "fp32_bytes": fp32_bytes,
        "compression_vs_fp32": round(fp32_bytes / size, 2),
        "cosine_to_fp32": {label: {k: {"mean": float(v.mean()), "min": float(v.min()), "n": int(v.size)}
                                   for k, v in by_kind.items()} for label, by_kind in cos.items()},
        "quantise_seconds": round(quantise_s, 1),
        "machine": f"{platform.processor() or platform.machine()}, 2-core CPU",
        "command": "python3 bench/gptq_smollm2.py " + " ".join(sys.argv[1:]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gptq_smollm2.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "gptq_smollm2.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    g = r["gptq"]
    lines = [f"# GPTQ {g['bits']}-bit SmolLM2-135M (compressed)", "",
             f"Command: `{r['command']}` on {r['machine']}.", "",
             f"Model: {r['model']}; group size {g['group_size']}, sym={g['sym']}, desc_act={g['desc_act']}, "
             f"{g['samples']} calibration passages (max {g['max_length']} tokens); {r['quantized_linears']} linear "
             f"layers quantised in {r['quantise_seconds']} s.", "",
             f"Checkpoint {r['checkpoint_bytes'] / 1e6:.1f} MB vs {r['fp32_bytes'] / 1e6:.1f} MB in fp32 "
             f"({r['compression_vs_fp32']}x; the 49152 x 576 embedding table stays in bf16).", "",
             "Embedding cosine to the fp32 compressed model (50 DBpedia queries, "
             f"{r['cosine_to_fp32']['gptq']['document']['n']} DBpedia documents):", "",
             "| weights | query mean | query min | document mean | document min |", "|---|---|---|---|---|"]
    names = {"gptq": "GPTQ (this checkpoint)", "rtn": "round-to-nearest, same grid", "bf16": "bf16, unquantised"}
    for label, by_kind in r["cosine_to_fp32"].items():
        q, d = by_kind["query"], by_kind["document"]
        lines.append(f"| {names[label]} | {q['mean']:.4f} | {q['min']:.4f} | {d['mean']:.4f} | {d['min']:.4f} |")
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    sys.exit(main())
