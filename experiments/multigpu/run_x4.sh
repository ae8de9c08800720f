#!/usr/bin/env bash
# One nvidia-h200-x4 session (issue 8): the GRPO scaling benchmark on 1, 2 and 4 GPUs (same global batch),
# then a model too large for one GPU (Qwen2.5-14B shape: 235 GB of fp32 weights + AdamW state) on 4.
#   OUT=results bash experiments/multigpu/run_x4.sh      (needs .whl/qwen_tok)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=${OUT:-results}
L=/tmp/logs
mkdir -p "$O" $L
TR="python3 -m torch.distributed.run --standalone"
for n in 1 2 4; do
  devices=$(seq -s, 0 $((n - 1)))
  CUDA_VISIBLE_DEVICES=$devices timeout 150 $TR --nproc-per-node $n benchmarks/grpo_scaling.py \
      --tokenizer .whl/qwen_tok --out "$O/scale_0.5b_${n}gpu.json" > $L/scale$n.log 2>&1
done
python3 benchmarks/grpo_scaling.py --combine "$O"/scale_0.5b_*gpu.json
timeout 420 $TR --nproc-per-node 4 benchmarks/grpo_scaling.py --tokenizer .whl/qwen_tok --preset qwen2.5-14b \
    --gradient-checkpointing --micro-batch-tokens 4096 --steps 4 --out "$O/scale_14b_4gpu.json" > $L/scale14b.log 2>&1
tar czf "$O/logs.tgz" -C $L .
tail -n 8 $L/*.log
