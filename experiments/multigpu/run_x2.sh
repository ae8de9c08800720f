#!/usr/bin/env bash
# One nvidia-h200-x2 session (issues 8, 7, 3): the GRPO scaling benchmark and `r1lab zero` on 1 and 2 GPUs at
# the same global batch; while GPU 0 runs the 1-GPU jobs, GPU 1 runs the serve and rollout benchmarks.
#   OUT=results bash experiments/multigpu/run_x2.sh      (needs .whl/ with mv/, serve/, qwen_tok/, chain_sum.jsonl)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
O=${OUT:-results}
L=/tmp/logs
mkdir -p "$O" $L
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/mv/*.whl .whl/serve/*.whl || exit 1
export PYTHONPATH=/tmp/site
TR="python3 -m torch.distributed.run --standalone"
ZERO="grpo.device=cuda grpo.task.name=jsonl:.whl/chain_sum.jsonl grpo.task.options.holdout_fraction=0.5 grpo.task.test_size=200 eval.k=8"
(
  CUDA_VISIBLE_DEVICES=0 timeout 140 $TR --nproc-per-node 1 benchmarks/grpo_scaling.py --tokenizer .whl/qwen_tok \
      --out "$O/scale_0.5b_1gpu.json" > $L/scale1.log 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 160 $TR --nproc-per-node 1 -m r1lab zero --out /tmp/z1 $ZERO > $L/zero1.log 2>&1
) &
A=$!
(
  CUDA_VISIBLE_DEVICES=1 timeout 150 python3 benchmarks/serve_concurrency.py --device cuda --model qwen2.5-0.5b \
      --tokenizer .whl/qwen_tok --out "$O/serve_h200.json" > $L/serve.log 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 160 python3 benchmarks/rollout.py --only "0.5b fixed" \
      --variants base,fused_proj,decode_attn,fused_proj+decode_attn --repeats 3 --out "$O/rollout_ab.json" > $L/rollout.log 2>&1
) &
B=$!
wait $A $B
timeout 110 $TR --nproc-per-node 2 benchmarks/grpo_scaling.py --tokenizer .whl/qwen_tok --out "$O/scale_0.5b_2gpu.json" \
    > $L/scale2.log 2>&1
timeout 140 $TR --nproc-per-node 2 -m r1lab zero --out /tmp/z2 $ZERO > $L/zero2.log 2>&1
python3 benchmarks/grpo_scaling.py --combine "$O"/scale_0.5b_*.json
for z in z1 z2; do mkdir -p $L/$z; cp /tmp/$z/metrics.jsonl /tmp/$z/summary.json $L/$z/ 2>/dev/null; done
tar czf "$O/logs.tgz" -C $L .
tail -n 5 $L/*.log
