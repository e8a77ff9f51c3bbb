#!/usr/bin/env bash
# The device check: GPU tests, the benchmarks (host overhead, activations, norms, training steps) and a tuning run, results under $OUT (default ./gpu-out).
# Meant for the lent GPU machine (its own torch + triton); about ten minutes in all, or about five with
# TUNE=0 (tests and benchmarks only).
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi > "$OUT/versions.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/versions.txt"
timeout 240 python -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.txt"
timeout 60 python tune/bench_overhead.py --device cuda --launch-path --out "$OUT/overhead-cuda.json" \
    --profile "$OUT/profile-cuda.txt" 2>&1 | tee "$OUT/bench.txt"
timeout 100 python tune/bench_activations.py --device cuda --out "$OUT/activations-cuda.json" 2>&1 | tee -a "$OUT/bench.txt"
timeout 100 python tune/bench_norms.py --device cuda --out "$OUT/norms-cuda.json" 2>&1 | tee -a "$OUT/bench.txt"
# the gated rows kernels on the halves of one projection, against copies of the halves (the path before them)
timeout 60 python tune/bench_cpu.py --device cuda --only halves --sizes 2**24 2**26 --dtypes bf16 --reps 50 \
    --out "$OUT/halves-cuda.json" 2>&1 | tee -a "$OUT/bench.txt"
timeout 260 python tune/bench_step.py --device cuda --dtypes bf16 --models vit llama phi3 --out "$OUT/step-cuda.json" 2>&1 | tee -a "$OUT/bench.txt"
# planned peak vs torch.cuda.max_memory_allocated (issue 14: within 5 %); into bench.txt (a run returns 8 files)
timeout 120 python tune/plan_gpu_check.py --device cuda 2>&1 | tee -a "$OUT/bench.txt"
[ "${TUNE:-1}" = 0 ] && exit 0
# Tuning: bf16 + fp16, the paper's two activations and the norms first (the budget may not cover all).
# kernelgen needs jinja2, sympy and rich there: carry wheels as the device README says if they are missing.
python -c "import jinja2, sympy, rich" 2>&1 | tee "$OUT/kernelgen-deps.txt"
mkdir -p "$OUT/db" && cp tune/db/*.json "$OUT/db/" 2>/dev/null
timeout 200 python -m kernelgen tune --arch native --db "$OUT/db" --budget 150 --dtypes bfloat16,float16 \
    --ops regelu2,resilu2,ms_norm 2>&1 | tee "$OUT/tune.txt"
timeout 100 python -m kernelgen tune --arch native --db "$OUT/db" --budget 60 --dtypes bfloat16,float16 2>&1 | tee -a "$OUT/tune.txt"
python -m kernelgen tune --arch native --db "$OUT/db" --report > "$OUT/tune-report.txt" 2>&1
