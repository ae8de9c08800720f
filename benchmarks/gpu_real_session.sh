#!/usr/bin/env bash
# The GPU half of issue 15 on a warm device machine, after benchmarks/stage_checkpoint.py has appended every
# part of the Qwen2.5-Coder-0.5B-Instruct GGUF to /root/stage/qwen05.gguf (one call per part, carrying
# .stage/partNNN and .stage/manifest.json). Carry .whl (math-verify, gguf, trl, datasets, ... wheels and
# basic_arithmetic.jsonl from `r1lab export-task basic_arithmetic .whl/basic_arithmetic.jsonl --test-size 100`)
# and .stage/manifest.json, then:
#
#   bash benchmarks/gpu_real_session.sh start    # install, verify, import, then zero + grpo_real in the background
#   bash benchmarks/gpu_real_session.sh poll     # the logs so far (repeat while the machine is warm)
#
# Everything lands in /root/r1 (zero run directory, grpo_real.json, logs); `poll` copies the small files to $OUT.
set -uo pipefail
W=/root/r1
case "${1:-}" in
start)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    mkdir -p $W && cp -r .whl/basic_arithmetic.jsonl $W/ && cp -r . $W/src
    python3 benchmarks/stage_checkpoint.py verify /root/stage/qwen05.gguf .stage/manifest.json || exit 1
    cat > $W/run.sh <<EOF
export PYTHONPATH=/tmp/site:$W/src TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 PYTHONUNBUFFERED=1
cd $W/src
T=jsonl:$W/basic_arithmetic.jsonl
python3 -m r1lab import-gguf /root/stage/qwen05.gguf /root/qwen05 --dtype float32 || exit 1
python3 benchmarks/humaneval_parity.py hf-generate /root/qwen05 $W/humaneval_hf.jsonl --max-new-tokens 512 \
    > $W/humaneval_hf.log 2>&1
python3 -m r1lab zero --recipe recipes/zero-qwen2.5-coder-0.5b.yaml --model /root/qwen05 --out $W/zero \\
    grpo.task.name=\$T grpo.task.options.holdout_fraction=0.5 > $W/zero.log 2>&1
python3 benchmarks/grpo_real.py --model /root/qwen05 --task \$T --holdout 0.5 --steps \${BENCH_STEPS:-6} \\
    --out $W/grpo_real.json > $W/grpo_real.log 2>&1
echo finished > $W/done
EOF
    setsid bash $W/run.sh > $W/session.log 2>&1 < /dev/null &
    sleep 20; cat $W/session.log
    ;;
poll)
    sleep "${2:-0}"
    tail -c 3000 $W/session.log $W/zero.log 2>/dev/null; tail -c 2500 $W/grpo_real.log 2>/dev/null
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    mkdir -p "$OUT/zero" && cp $W/zero/{summary.json,metrics.jsonl,report.html} "$OUT/zero/" 2>/dev/null
    cp $W/*.log $W/grpo_real.json $W/humaneval_hf.jsonl "$OUT/" 2>/dev/null
    ls $W/done 2>/dev/null
    ;;
*)
    echo "usage: $0 start|poll [seconds]"; exit 2 ;;
esac
