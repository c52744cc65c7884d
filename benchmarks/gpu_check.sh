#!/usr/bin/env bash
# One-GPU learner check (issue 15): our rank-1 learner vs stock HF + PEFT rank 1 vs full fine-tuning, bf16, random
# weights of Llama-3.1-8B widths; torch, transformers and peft only (no vLLM, no download). Prints one table.
# Runs from a plain checkout; options go to benchmarks/gpu_check.py (--layers, --group, --completion, --tiny, ...).
#   benchmarks/gpu_check.sh            # on a GPU machine, ~3-5 minutes
#   benchmarks/gpu_check.sh --tiny     # CPU smoke test
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
