#!/usr/bin/env bash
# The full-size rehearsals of the three ImageNet presets (`rrepa rehearse`, issue #31): the real architectures
# (466 M-parameter flows, DINOv2-B/14, SD-VAE, FID-Inception) with random weights on synthetic data in each
# preset's layout, every stage from `latents encode` to `evaluate`, then the capacity plan for 8 x 80 GB from the
# measurements. Writes OUT_DIR/<preset>.md and .json (the reports), OUT_DIR/plan.md, OUT_DIR/log-<preset>.txt.
#
#   bash benchmarks/bench_rehearse.sh [OUT_DIR]          # default benchmarks/rehearsals
#   PRESETS="imagenet256-latent" bash benchmarks/bench_rehearse.sh
#   THREADS=16 DEVICE=cuda bash benchmarks/bench_rehearse.sh gpu-check/rehearsals
#   BATCH=1 CHECKPOINTING=1 bash benchmarks/bench_rehearse.sh   # a 24 GB machine: batch 1, activation checkpointing
#
# Time, on a 2-core CPU with one thread (2026-12-07, beside other jobs): imagenet256-latent-p1 25 min and imagenet64
# 29 min, most of it the sample stages (4 guided samples of 1024 tokens: 13-14 min sequential, 4-7 min Jacobi); the
# training stages draw no grid (train.sample_rows=0). Memory: the probe's batch-2 step of a 1024-token preset peaks
# at ~15.6 GB; a training step adds AdamW's two moments and the EMA (3 x 1.9 GB for 466 M parameters), which at
# batch 2 does not fit 24 GB (killed by the OOM killer at 17.7 GB resident, 2026-12-06): use BATCH=1 there, and run
# nothing big beside it. CHECKPOINTING=1 trains with train.activation_checkpointing=true (the probe still measures
# the plain step, and the plan checks the training stage against its checkpointed prediction). ~25 GB of disk under WORK (default /tmp/rrepa-rehearsals: data, ~0.5 GB of weights, one 7.5 GB
# checkpoint per run; each preset's run folder is removed after its report is copied). The DDP stage is left out
# at full size on a CPU (two 466 M-parameter processes need ~30 GB); add DDP=1 where memory allows (2 GPUs: NCCL).
set -uo pipefail
out=${1:-benchmarks/rehearsals}
work=${WORK:-/tmp/rrepa-rehearsals}
threads=${THREADS:-2}
device=${DEVICE:-auto}
batch=${BATCH:-2}
sets=()
[ "${CHECKPOINTING:-0}" = 1 ] && sets=(--set train.activation_checkpointing=true)
presets=${PRESETS:-imagenet64 imagenet256-latent imagenet256-latent-p1}
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
mkdir -p "$out" "$work"
# A fixed mmap threshold turns off glibc's dynamic one, which after the probe's large frees would serve the training
# stage's tensors from heap arenas that are never returned: the probe's memory stayed resident under the training.
export HF_HUB_OFFLINE=1 RREPA_OFFLINE=1 OMP_NUM_THREADS=$threads PYTHONUNBUFFERED=1 MALLOC_MMAP_THRESHOLD_=1048576
status=0
for preset in $presets; do
    echo "=== rehearsal of $preset (full size) on $device"
    t0=$SECONDS
    if $py -m rrepa.cli rehearse --preset "$preset" --work "$work" --device "$device" --batch "$batch" "${sets[@]}" ${DDP:+--ddp} \
            2>&1 | tee "$out/log-$preset.txt"; then
        cp "$work/$preset/rehearsal.md" "$out/$preset.md"
        cp "$work/$preset/rehearsal.json" "$out/$preset.json"
    else
        status=1
        echo "=== $preset FAILED (log: $out/log-$preset.txt)"
    fi
    rm -rf "$work/$preset/run" "$work/$preset/run-ddp"
    echo "=== $preset: $((SECONDS - t0)) s"
done
$py -m rrepa.cli rehearse --plan --work "$work" --gpus 8 --gpu-memory 80 $(printf -- '--preset %s ' $presets) \
    | tee "$out/plan.md" || status=1
exit $status
