#!/usr/bin/env bash
# Paper-scale speed-up check on one H100/H200: full vs EffiR-shaped Mistral-7B (random weights), query- and
# document-side encode throughput in bf16 (SDPA, eager, torch.compile) and peak memory.
# Needs only PyTorch with CUDA and transformers (nothing is downloaded); about 5 minutes, hard-capped at 9.5.
#   bash bench/gpu.sh                 # writes bench/results/gpu_bench.json and prints the table
#   bash bench/gpu.sh --skip compile  # extra arguments go to bench/gpu_bench.py (see --help)
# CPU self-check of the same code path: python3 bench/gpu_bench.py --tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch: run bench/gpu_bench.py --tiny for the CPU check')"
exec timeout 570 "$PYTHON" bench/gpu_bench.py "$@"
