#!/usr/bin/env bash
# The checks a CPU machine cannot make, on one CUDA GPU, in one device call that fits this project's GPU time (a
# session gets 15 minutes of device time in all, the machine's start included; one command at most 10): the steps
# run in order of what matters most, each with a time limit, and a step that could overrun BUDGET (seconds, default
# 480) from the script's start is skipped and listed in OUT_DIR/skipped.txt, so a slow machine loses the last steps,
# not the first ones. PART=checks (the default):
#   1. the CUDA tests (`pytest -m cuda`): float32 on the GPU against the float64 model, bf16 autocast of the flow
#      and of every reverse path, a bf16 training run with R-REPA whose checkpoint loads on the CPU, and the VAE
#      wrapper in float32 and bf16 against the CPU;
#   2. bench_precision.py --device cuda: float32 against bf16 autocast for the training steps, the R-REPA step, the
#      classifiers and sampling 100 and 1,000 images (sequential and Jacobi), with the bf16 images' distance to
#      the float32 sequential sampler's (issue #28's sampling goal: <= 0.6x of float32 within one uint8 level);
#   3. bench_align.py at the paper's transformer size (bf16, tables 1 and 3): the pseudo-reverse's speed-up and
#      memory against the naive reverse, where sequential steps are latency-bound (the paper's ~50x, ~50 %
#      setting). At the paper's size the naive reverse held 3.9 GiB per sample (measured on a CPU at batch 1),
#      hence batches <= 16;
#   4. bench_train.py: the default fmnist job's training throughput on the GPU (bf16), eager, on random
#      Fashion-MNIST-shaped data (throughput does not depend on pixel values; no dataset needed);
#   5. bench_sample.py: the Jacobi sampler against the sequential KV-cache sampler (float32; wall time, passes,
#      FLOPs, max |difference|), on the fmnist shape and the 256-token model, without FID (the embedded evaluator
#      is not on a fresh machine; the FID, a property of the images, is measured on the CPU). Set SAMPLE_CKPT to
#      a copy of the default job's run folder for a trained model's iteration counts; without it the fmnist
#      shape gets random weights, which converge faster;
#   6. bench_train.py again with torch.compile (train.compile=true);
#   7. bench_align.py at the benchmark size (float32, all three tables, the exact-gradient check);
#   8. bench_latent.py: SD-VAE's encode and decode throughput at 256 px (its architecture, random weights: the
#      cost does not depend on them), float32 and bf16 -- what encoding ImageNet's latent cache costs.
# PART=rehearse (a call of its own, about 10 minutes, BUDGET=570): `rrepa rehearse` of the three ImageNet presets at
# full size on the GPU (the real architectures with random weights, every stage from `latents encode` to
# `evaluate`; at most 3 min each), then `rrepa rehearse --plan --gpus 8 --gpu-memory 80` from the GPU's own
# measurements.
# Each step's output goes to OUT_DIR (default gpu-check/) as Markdown as it runs, so a call cut short keeps what it
# measured; a failed step does not stop the others, and the exit status is non-zero when any failed. Without a CUDA
# device it stops at once, in one line.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   BUDGET=300 bash benchmarks/gpu_check.sh gpu-check/       # leave device time for other work in the same call
#   PART=rehearse BUDGET=570 bash benchmarks/gpu_check.sh gpu-check/
#
# Needs the package's dependencies importable by $PYTHON (default: the project's .venv/bin/python when there, else
# python3) and src/ (put on PYTHONPATH here, so no install is needed); torch-fidelity only for the rehearsals.
set -uo pipefail
out=${1:-gpu-check}
part=${PART:-checks}
budget=${BUDGET:-480}
py=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
if ! $py -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device here ($py: torch.cuda.is_available() is false, or torch is missing); run it" \
         "on a machine with an NVIDIA GPU" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 RREPA_OFFLINE=1 PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to the screen and OUT_DIR/NAME
    local name=$1 limit=$2
    shift 2
    if (( SECONDS + limit > budget )); then
        echo "=== $name skipped: ${SECONDS} s spent, its limit ${limit} s would pass BUDGET=${budget} s" \
            | tee -a "$out/skipped.txt"
        return
    fi
    echo "=== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | grep -v "^USDT:" | tee "$out/$name" || { status=1; echo "=== $name FAILED"; }
    echo "=== $name: $((SECONDS - t0)) s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"
} | tee "$out/gpu.txt"

if [ "$part" = rehearse ]; then
    for preset in imagenet64 imagenet256-latent imagenet256-latent-p1; do
        step "rehearse_$preset.md" 180 $py -m rrepa.cli rehearse --preset $preset --work "$out/rehearsals" \
            --device cuda
        rm -rf "$out/rehearsals/$preset/run"  # a 7.5 GB checkpoint; the report stays
    done
    step rehearse_plan.md 20 $py -m rrepa.cli rehearse --plan --work "$out/rehearsals" --gpus 8 --gpu-memory 80
    rm -rf "$out/rehearsals/weights" "$out/rehearsals"/*/data "$out/rehearsals"/*/latents
    exit $status
elif [ "$part" != checks ]; then
    echo "gpu_check.sh: PART must be checks (the default) or rehearse, got '$part'" >&2
    exit 2
fi

step pytest-cuda.txt 80 $py -m pytest -q -m cuda -p no:cacheprovider tests/flow/test_tarflow.py tests/align/test_reverse.py \
    tests/training/test_loop_align.py tests/flow/test_jacobi.py tests/data/test_vae.py
step bench_precision.md 90 $py benchmarks/bench_precision.py --device cuda --repeats 5 --samples 100 1000 \
    ${SAMPLE_CKPT:+--ckpt "$SAMPLE_CKPT"}
step bench_align_paper_bf16.md 150 $py benchmarks/bench_align.py --device cuda --bf16 --scale paper --batch 8 16 \
    --tables 1 3
data=$(mktemp -d)
$py -c "import sys; from pathlib import Path; from rrepa.flow.testing import write_fake_fmnist; \
write_fake_fmnist(Path(sys.argv[1]), 8192, 256)" "$data"
step bench_train_fmnist.md 50 $py benchmarks/bench_train.py --device cuda --steps 400 --log-every 100 \
    --set "data.path=$data"
step bench_sample.md 50 $py benchmarks/bench_sample.py --device cuda --no-fid --repeats 2 --batch 1000 100 \
    --batch-256 64 8 ${SAMPLE_CKPT:+--ckpt "$SAMPLE_CKPT"}
step bench_train_fmnist_compile.md 80 $py benchmarks/bench_train.py --device cuda --steps 400 --log-every 100 \
    --set "data.path=$data" --set train.compile=true
rm -rf "$data"
step bench_align_bench.md 130 $py benchmarks/bench_align.py --device cuda --batch 8 64 --exact-check
for dt in float32 bfloat16; do
    step "bench_latent_sd_$dt.md" 20 $py benchmarks/bench_latent.py --device cuda --skip-train --vae random-sd \
        --image-size 256 --batch 32 --dtype $dt
done
exit $status
