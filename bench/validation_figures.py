"""Record the validation figures in bench/results/ (see validation/README.md).

    python bench/validation_figures.py minilm    # MiniLM on the whole dbpedia_subset: fp32, bf16, ONNX fp32/int4
    python bench/validation_figures.py smollm2   # SmolLM2 original vs half-MLP-dropped, PyTorch fp32/bf16, ONNX fp32/int4, on a slice

Exports (ONNX, the dropped copy) go to --work (default /tmp/effir-validation-bench) and are reused.
Each run writes bench/results/validation_<model>/ (report.json, report.md, junit.xml, plots).
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
THREADS = 1  # the 2-core machine is shared: 2 OpenMP threads stall badly when other processes run


def export(loaded, folder: Path, int4: bool) -> str:
    """ONNX export of ``loaded`` (fp32, or 4-bit RTN MatMulNBits), once."""
    from effir_export.export.int4 import Int4Config
    from effir_export.export.onnx import OnnxExportConfig, export_onnx

    if not (folder / "model.onnx").is_file():
        export_onnx(loaded, OnnxExportConfig(int4=Int4Config(method="rtn") if int4 else None), folder)
    return str(folder)


def with_recipe_embedding(source: str, recipe):
    """Load ``source`` with the recipe's embedding settings written into its config (exports copy them)."""
    from effir_export.models.sources import load_model

    loaded = load_model(source)
    loaded.model.config.embedding = recipe.embedding.apply(loaded.embedding).model_dump()
    return loaded


def minilm(work: Path):
    from effir_export.recipe import load_recipe
    from effir_export.validation import LatencyConfig, MemoryConfig, ValidateConfig

    recipe = load_recipe(REPO / "recipes" / "minilm-l6.yaml")
    loaded = with_recipe_embedding("minilm-l6", recipe)
    backends = ["bf16=torch-bf16:minilm-l6", f"onnx-fp32=onnx:{export(loaded, work / 'minilm-onnx', False)}",
                f"onnx-int4=onnx:{export(loaded, work / 'minilm-onnx-int4', True)}"]
    return recipe, ValidateConfig(
        reference="fp32=torch:minilm-l6", backends=backends, data=str(DATA / "dbpedia_subset"),
        gates=str(REPO / "validation" / "minilm-gates.yaml"), threads=THREADS,
        latency=LatencyConfig(query_batch=8, document_batch=32, warmup=2, repeats=10), memory=MemoryConfig(batch=32))


def smollm2(work: Path):
    from effir_export.models.format import save_model
    from effir_export.recipe import load_recipe
    from effir_export.validation import LatencyConfig, MemoryConfig, SliceConfig, ValidateConfig

    recipe = load_recipe(REPO / "recipes" / "smollm2-135m.yaml")
    full = with_recipe_embedding("smollm2-135m", recipe)
    half_dir = work / "smollm2-half-mlp"
    if not half_dir.is_dir():  # every odd layer's MLP removed (15 of 30), no recovery training
        half = with_recipe_embedding("smollm2-135m", recipe)
        for index, layer in enumerate(half.model.layers):
            if index % 2 == 1:
                half.model.adapter.remove_mlp(layer)
        save_model(half.model, half.tokenizer, half_dir)
    half = with_recipe_embedding(str(half_dir), recipe)
    backends = ["bf16=torch-bf16:smollm2-135m", f"onnx-fp32=onnx:{export(full, work / 'smollm2-onnx', False)}",
                f"half-mlp=torch:{half_dir}", f"half-mlp-bf16=torch-bf16:{half_dir}",
                f"half-mlp-onnx-int4=onnx:{export(half, work / 'smollm2-half-onnx-int4', True)}"]
    return recipe, ValidateConfig(
        reference="fp32=torch:smollm2-135m", backends=backends, data=str(DATA / "dbpedia_subset"),
        slice=SliceConfig(queries=5, documents=500, seed=0), gates=str(REPO / "validation" / "smollm2-gates.yaml"),
        threads=THREADS,
        latency=LatencyConfig(query_batch=8, document_batch=8, warmup=1, repeats=5), memory=MemoryConfig(batch=8))


def main() -> None:
    from effir_export.validation import run_validation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["minilm", "smollm2"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/effir-validation-bench"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe, config = {"minilm": minilm, "smollm2": smollm2}[args.model](args.work)
    config = config.model_copy(update={"out": str(REPO / "bench" / "results" / f"validation_{args.model}")})
    report = run_validation(config, embedding=recipe.embedding)
    print((Path(config.out) / "report.md").read_text())
    print("gates", "passed" if report.passed else "FAILED (see the table)")


if __name__ == "__main__":
    main()
