#!/usr/bin/env bash
# One device session, in phases (each bounded by `timeout`), logs and JSON under $OUT.
#   bash benchmarks/gpu_session.sh PHASE [PHASE ...]
# Phases: env, kernels, parity, chunk, serving-quick, serving, throughput, host-profile, moe,
#         mla-prefix, mla-prefix-tests, fp8, fp8-kernels, profile-fp8 (PROFILE_FP8_BUDGET
#         seconds, default 60), spec, profile-spec, spec-serving, pd, profile, profile-traces
# `env spec pd` (issues 13 and 14) fits in 420 s: spec = GPU tests (60 s) + bench_spec_decode
# --budget-s 120 (130 s), pd = GPU tests (60 s) + bench_disagg --budget-s 150 (160 s).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 ))s"; }
for phase in "$@"; do
  stamp "$phase"
  case $phase in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
         python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)' ;;
    kernels) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py \
         tests/test_kernels_backend.py tests/test_kernels_prefix.py tests/test_kernels_runner.py \
         tests/test_fused_moe.py tests/test_layer_kernels.py 2>&1 | tee "$OUT/kernel-tests.log" | tail -25 ;;
    parity) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py \
         tests/test_gpu_moe.py tests/test_vllm_gpu.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
    chunk) timeout 120 python3 benchmarks/bench_chunk_attention.py --quick --out-dir "$OUT" 2>&1 \
         | tee "$OUT/chunk-attention.log" | tail -45 ;;
    serving-quick) timeout 110 python3 benchmarks/bench_serving.py --runs long-128k,prefix-128k --no-hf \
         --out-dir "$OUT" 2>&1 | tee "$OUT/serving-quick.log" | tail -30 ;;
    serving) timeout 560 python3 benchmarks/bench_serving.py --out-dir "$OUT" 2>&1 \
         | tee "$OUT/serving.log" | tail -40 ;;
    profile) mkdir -p "$OUT/profile"; timeout 290 python3 benchmarks/profile_steps.py \
         --out-dir "$OUT/profile" 2>&1 | tee "$OUT/profile/profile-steps.log" | tail -30 ;;
    profile-traces) mkdir -p "$OUT/profile"; timeout 100 python3 benchmarks/profile_steps.py \
         --traces-only --out-dir "$OUT/profile" 2>&1 | tee "$OUT/profile/profile-steps.log" \
         | grep -v "USDT\|^\[transformers\]" | tail -20 ;;
    throughput) timeout 590 python3 benchmarks/bench_serving.py --runs throughput --out-dir "$OUT" \
         2>&1 | tee "$OUT/throughput.log" | tail -30 ;;
    host-profile) timeout 300 python3 benchmarks/profile_host.py --no-py-spy --out "$OUT/host" \
         --model "$(python3 -c 'import sys; sys.path.insert(0, "benchmarks"); import tempfile, pathlib; from serving_model import LLAMA_31_8B, write_model_dir; print(write_model_dir(pathlib.Path(tempfile.mkdtemp()), LLAMA_31_8B, 4096))')" \
         --input-len 1024 --output-len 256 --vocab-size 128000 \
         --engine-flag=--load-format=dummy --engine-flag=--dtype=bfloat16 --engine-flag=--max-model-len=4096 \
         2>&1 | tee "$OUT/host-profile.log" | tail -20 ;;
    moe) mkdir -p "$OUT/moe"; timeout 420 python3 benchmarks/bench_moe.py --out "$OUT/moe" \
         --budget-s 380 2>&1 | tee "$OUT/moe/bench_moe.log" | tail -60 ;;
    mla-prefix) timeout 80 python3 benchmarks/bench_mla_prefix.py --out-dir "$OUT" --budget-s 55 \
         2>&1 | tee "$OUT/mla-prefix.log" | grep -v "^\[transformers\]" | tail -20 ;;
    mla-prefix-tests) timeout 150 python3 -m pytest -q -p no:cacheprovider \
         tests/test_mla_expanded_prefix.py 2>&1 | tee "$OUT/mla-prefix-tests.log" | tail -15 ;;
    fp8) mkdir -p "$OUT/fp8"; timeout 150 python3 -m pytest -q -p no:cacheprovider \
         tests/test_kernels_fp8.py tests/test_gpu_fp8.py 2>&1 | tee "$OUT/fp8-tests.log" | tail -25
         timeout 400 python3 benchmarks/bench_fp8.py --out-dir "$OUT/fp8" 2>&1 \
         | tee "$OUT/fp8/bench_fp8.log" | tail -40 ;;
    spec) timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_spec_decode.py \
         tests/test_spec_kernels.py 2>&1 | tee "$OUT/spec-tests.log" | tail -25
         timeout 130 python3 benchmarks/bench_spec_decode.py --budget-s 120 --out-dir "$OUT" 2>&1 \
         | tee "$OUT/spec-decode.log" | grep -v "^\[transformers\]" | tail -30 ;;
    profile-spec) timeout 300 python3 benchmarks/profile_spec_decode.py --out-dir "$OUT" 2>&1 \
         | grep -v "USDT\|^\[transformers\]" | tee "$OUT/profile-spec-decode.log" | tail -80 ;;
    spec-serving) timeout 400 python3 benchmarks/bench_serving.py --runs spec-ngram-32k,spec-mtp-32k \
         --no-hf --out-dir "$OUT" 2>&1 | tee "$OUT/spec-serving.log" | tail -20 ;;
    pd) mkdir -p "$OUT/pd"; timeout 60 python3 -m pytest -q -p no:cacheprovider \
         tests/test_gpu_kv_transfer.py 2>&1 | tee "$OUT/pd/gpu-tests.log" | tail -15
         timeout 160 python3 benchmarks/bench_disagg.py --budget-s 150 --out "$OUT/pd" 2>&1 \
         | tee "$OUT/pd/bench_disagg.log" | tail -45 ;;
    fp8-kernels) timeout 30 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_fp8.py \
         2>&1 | tee "$OUT/fp8-kernel-tests.log" | tail -25 ;;
    profile-fp8) b=${PROFILE_FP8_BUDGET:-60}; mkdir -p "$OUT/profile-fp8"
         timeout $(( b + 20 )) python3 benchmarks/profile_fp8.py --out-dir "$OUT/profile-fp8" \
         --budget-s "$b" 2>&1 | tee "$OUT/profile-fp8/profile_fp8.log" | tail -80 ;;
    *) echo "unknown phase $phase" ;;
  esac
done
stamp done
