#!/usr/bin/env bash
# `r1lab zero` (embedded r1-tiny, chain_sum, 60 steps, 16 prompts x 8) on 1 and 2 GPUs through the SAME FSDP
# code path (R1LAB_FSDP=1 makes the 1-process run sharded too: bf16 compute, fp32 master weights and
# reduction), two seeds each, so the curves differ only by the GPU count and the sampling streams.
#   OUT=results bash experiments/multigpu/run_x2_curves.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=${OUT:-results}
mkdir -p "$O" /tmp/curves
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/mv/*.whl || exit 1
export PYTHONPATH=/tmp/site
TR="python3 -m torch.distributed.run --standalone"
ZERO="grpo.device=cuda grpo.task.name=jsonl:.whl/chain_sum.jsonl grpo.task.options.holdout_fraction=0.5 grpo.task.test_size=200 eval.k=8"
for s in 0 1; do
  CUDA_VISIBLE_DEVICES=$s R1LAB_FSDP=1 timeout 170 $TR --nproc-per-node 1 -m r1lab zero --out /tmp/curves/gpu1_seed$s \
      $ZERO grpo.seed=$s > /tmp/curves/gpu1_seed$s.log 2>&1 &
done
wait
for s in 0 1; do
  timeout 120 $TR --nproc-per-node 2 -m r1lab zero --out /tmp/curves/gpu2_seed$s $ZERO grpo.seed=$s \
      > /tmp/curves/gpu2_seed$s.log 2>&1
done
cd /tmp/curves && tar czf "$O/curves.tgz" */metrics.jsonl */summary.json *.log
grep -h -A0 "pass@1" *.log
