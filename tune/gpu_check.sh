#!/usr/bin/env bash
# The device check: GPU tests and both benchmarks, results under $OUT (default ./gpu-out).
# Meant for the lent GPU machine (its own torch + triton); a few minutes in all.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
timeout 300 python -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.txt"
timeout 150 python tune/bench_activations.py --device cuda --out "$OUT/activations-cuda.json" 2>&1 | tee "$OUT/bench-activations.txt"
timeout 150 python tune/bench_norms.py --device cuda --out "$OUT/norms-cuda.json" 2>&1 | tee "$OUT/bench-norms.txt"
