#!/usr/bin/env bash
# The R1 pipeline at GPU scale (issue 6), one GPU, from nothing: pretrain the r1-small teacher base and the
# dense student base side by side, then every stage of recipes/pipeline-gpu.yaml.
#   RUNS=runs bash experiments/pipeline-r1-gpu/run.sh
#   NPROC=2 RUNS=runs bash experiments/pipeline-r1-gpu/run.sh      # the pipeline on 2 GPUs (torchrun, FSDP2)
# The task is chain_sum as JSONL (`r1lab export-task chain_sum .whl/chain_sum.jsonl --train-size 6000
# --test-size 300`), so the GPU machine needs no reasoning-gym; the file splits into the same problems.
set -euo pipefail
R=${RUNS:-runs}
TASK=${TASK:-.whl/chain_sum.jsonl}
mkdir -p "$R"
start=$(date +%s)
NPROC=${NPROC:-1}
second_gpu=$(( NPROC > 1 ? 1 : 0 ))  # with 2+ GPUs the two pretrainings get one GPU each
CUDA_VISIBLE_DEVICES=0 python3 -m r1lab pretrain --recipe recipes/pretrain-small.yaml --out "$R/pretrain-small" \
    > "$R/pretrain-small.log" 2>&1 &
teacher=$!
CUDA_VISIBLE_DEVICES=$second_gpu python3 -m r1lab pretrain --recipe recipes/pretrain-student-small.yaml \
    --out "$R/pretrain-student-small" > "$R/pretrain-student-small.log" 2>&1 &
student=$!
wait $teacher
wait $student
echo "pretraining done in $(( $(date +%s) - start ))s"
launch="python3"
[ "$NPROC" -gt 1 ] && launch="python3 -m torch.distributed.run --standalone --nproc-per-node $NPROC"
$launch -m r1lab pipeline r1 --recipe recipes/pipeline-gpu.yaml --out "$R/pipeline-gpu" \
    base="$R/pretrain-small/model" student="$R/pretrain-student-small/model" \
    task.name="jsonl:$TASK" task.options.holdout_fraction=0.5 "$@"
echo "all done in $(( $(date +%s) - start ))s"
