"""The FSDP2 data-parallel path on CPU: 2 processes over gloo against a single-process reference."""

from __future__ import annotations

import copy
import os
import socket
import traceback
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from r1lab import distributed as D
from r1lab.train import batching as B
from r1lab.train import checkpoint as C
from r1lab.train import parallel as P
from r1lab.train import step as S

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(vocab: int, n: int = 8, seed: int = 7):
    """n sequences (4 groups of 2) of uneven lengths: a 'prompt' of 4 tokens + a completion, and advantages."""
    g = torch.Generator().manual_seed(seed)
    seqs, masks = [], []
    for i in range(n):
        length = 6 + (i * 5) % 11
        seqs.append(torch.randint(1, vocab, (length,), generator=g).tolist())
        masks.append([0] * 4 + [1] * (length - 4))
    adv = torch.randn(n, generator=g)
    return seqs, masks, adv


def _train_step(model, opt, seqs, masks, adv, info, total_tokens: float, scale: float, row_tokens: int):
    """One GRPO-like step: Σ -adv·logp over completion tokens / global token count, packed micro-batches,
    every rank running the same number of forward/backward passes."""
    from r1lab.train.batching import pack_sequences
    from r1lab.train.logprobs import token_logprobs

    model.train()
    opt.zero_grad(set_to_none=True)
    packs = pack_sequences(seqs, masks, row_tokens)  # one row per pass: no padding (MoE would route it)
    n_passes = D.max_across_ranks(len(packs), info)
    for pack in packs:
        logp = token_logprobs(model, pack.input_ids, pack.targets, pack.positions, pack.doc_ids)
        row_adv = torch.zeros_like(logp)
        for (r, start, n), i in zip(pack.spans, pack.seq_index):
            row_adv[r, start : start + n] = adv[i]
        loss = -(logp * row_adv * pack.loss_mask).sum() / total_tokens * scale
        loss.backward()
    for _ in range(n_passes - len(packs)):
        S.dummy_backward(model, info)
    norm = S.clip_grad_norm(model, 0.05)  # small: clipping is active, so the norm must be the global one
    S.all_reduce_expert_loads(model, info)
    loads = [m.expert_load.clone() for m in model.moe_layers()]
    opt.step()
    model.update_router_bias(1e-2)
    return norm, loads


# ----------------------------------------------------------------------------- spawning (other test files use these)
def join_group(rank: int, port: int) -> D.DistInfo:
    """In a spawned worker: join the WORLD-process gloo group on 127.0.0.1:port as torchrun would."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    info = D.init_distributed("cpu")
    assert info.is_distributed and info.world_size == WORLD and info.rank == rank
    return info


def _worker(rank: int, fn, port: int, args: tuple, errors, finished) -> None:
    try:
        fn(rank, port, *args)
    except BaseException:  # noqa: BLE001 - report to the parent with the traceback
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        D.shutdown(clean=False)
        raise
    finished.put(rank)
    D.shutdown()  # the way `torchrun -m r1lab` ranks end (cli.main)
    D.exit_after_teardown(0)


def spawn_ranks(fn, *args) -> None:
    """Run fn(rank, port, *args) in WORLD spawned processes (fn: a module-level function, so the children
    can import it); fails the test with every rank's traceback if one raises. A rank killed by a signal
    after every rank finished its work (gloo's threads have aborted a process at exit, rarely, under load)
    is reported as a warning: the test then checks what the ranks wrote."""
    ctx = mp.get_context("spawn")
    errors, finished = ctx.SimpleQueue(), ctx.SimpleQueue()
    try:
        mp.start_processes(_worker, args=(fn, _free_port(), args, errors, finished), nprocs=WORLD, join=True,
                           start_method="spawn")
    except Exception as exc:  # noqa: BLE001
        msgs = []
        while not errors.empty():
            msgs.append(errors.get())
        done = set()
        while not finished.empty():
            done.add(finished.get())
        if not msgs and isinstance(exc, mp.ProcessExitedException) and done == set(range(WORLD)):
            warnings.warn(f"a rank died after all ranks finished their work: {exc}")
            return
        pytest.fail("\n".join(msgs) or traceback.format_exc())


def _check(rank: int, port: int, preset_name: str, tmp: str) -> None:
    import r1lab.model as rm
    from r1lab.rollout import SamplingParams, generate

    info = join_group(rank, port)
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"

    args = rm.preset(preset_name, moe_impl="loop") if "moe" in preset_name else rm.preset(preset_name)
    ref = rm.build(args, seed=3)
    model = P.shard_model(copy.deepcopy(ref), info)
    assert P.is_sharded(model)

    # (d) rollout on the gathered weights: each rank its own prompts and lengths, no collective inside.
    prompts = [[5 + rank, 17, 3 + 2 * rank], [9, 9, 40 + rank, 2]][: 1 + rank]
    params = SamplingParams(temperature=0.0, max_new_tokens=6 + 4 * rank, n=1, stop_token_ids=[])
    with P.gathered_for_rollout(model, info) as policy:
        assert not P.is_sharded(policy)
        got = [c.token_ids for c in generate(policy, prompts, params)]
    want = [c.token_ids for c in generate(ref, prompts, params)]
    assert got == want, (got, want)

    # (a) one sharded step on this rank's whole groups == one single-process step on all the data.
    seqs, masks, adv = _data(args.vocab_size)
    share = D.rank_share(list(range(len(seqs))), info, group_size=2)
    assert len(share) == len(seqs) // WORLD
    B.check_whole_groups([i // 2 for i in share], 2)  # sequence i belongs to group i // 2
    n_tok = sum(sum(m[1:]) for m in masks)
    local_tok = sum(sum(masks[i][1:]) for i in share)
    assert D.sum_across_ranks(local_tok, info) == n_tok
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    # rank 0 packs one sequence per micro-batch (4 passes), rank 1 two (2): dummy passes fill in
    norm, loads = _train_step(model, opt, [seqs[i] for i in share], [masks[i] for i in share], adv[share], info,
                              n_tok, WORLD, row_tokens=16 * (1 + rank))
    ref_norm, ref_loads = _train_step(ref, ref_opt, seqs, masks, adv, D.single_process(), n_tok, 1.0, row_tokens=32)
    assert abs(norm - ref_norm) < 1e-5 * max(1.0, ref_norm), (norm, ref_norm)
    for a, b in zip(loads, ref_loads):  # global loads after the all-reduce
        assert torch.equal(a, b), (a, b)
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        full = P.full_tensor(p.detach())
        assert torch.allclose(full, ref_params[name], atol=1e-5, rtol=0), (name, (full - ref_params[name]).abs().max())
    ref_bufs, moved = dict(ref.named_buffers()), 0.0
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(b, ref_bufs[name]), name
            moved += float(b.abs().sum())
    assert moved > 0 or not model.moe_layers()  # the biases did move (the MTP module's MoE never runs)

    # (b) expert loads are summed over ranks.
    for m in model.moe_layers():
        m.expert_load.fill_(rank + 1.0)
    S.all_reduce_expert_loads(model, info)
    for m in model.moe_layers():
        assert torch.equal(m.expert_load, torch.full_like(m.expert_load, sum(range(1, WORLD + 1))))
        m.expert_load.zero_()

    # metrics: mean by default, max for *_max, sum for *_per_s; a key only one rank reports
    merged = D.all_reduce_metrics({"reward": float(rank), "len_max": 10.0 * rank, "tokens_per_s": 5.0,
                                   **({"only0": 3.0} if rank == 0 else {})}, info)
    assert merged == {"reward": 0.5, "len_max": 10.0, "tokens_per_s": 10.0, "only0": 3.0}, merged

    # (c) one consolidated HF folder, written by rank 0, that load() reads back to the reference's logits.
    out = C.save_consolidated(model, info, os.path.join(tmp, "hf"))
    assert out is not None and (out / "config.json").is_file()
    assert C.consolidated_state_dict(model, info) is None or info.is_main
    loaded = rm.load(os.path.join(tmp, "hf"))
    ids = torch.tensor([[1, 5, 9, 33, 2, 7, 100]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids), ref.eval()(ids), atol=1e-5, rtol=0)

    # minibatches: the same count on every rank, even for a rank left with no groups
    plan = B.minibatch_plan(3 if rank == 0 else 0, 2, 4, info)
    assert len(plan) == 4 and (plan == [[]] * 4 if rank else sorted(sum(plan, [])) == list(range(6))), plan
    plan = B.minibatch_plan(1 + 3 * rank, 2, 4, info)  # 2 and 8 completions: 2 steps on both ranks
    assert len(plan) == 2 and sorted(sum(plan, [])) == list(range(2 + 6 * rank)), plan

    # trainer checkpoint: consolidated HF folder + sharded model/optimizer, resumed by one process below
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    sched.step()
    ckpt = C.save_checkpoint(tmp, 1, model, opt, sched, {"cursor": 5}, keep_last=2, info=info)
    assert ckpt.name == "step_000001" and (ckpt / "model" / "config.json").is_file()
    fresh = P.shard_model(rm.build(args, seed=99), info, sync_from_rank0=False)  # resume, same world size
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.5, momentum=0.9)
    assert C.restore_checkpoint(ckpt, fresh, fresh_opt, None, info) == {"cursor": 5, "step": 1}
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), name
    if info.is_main:
        torch.save({"params": {k: v.detach() for k, v in ref.named_parameters()},
                    "momentum": {k: ref_opt.state[v]["momentum_buffer"] for k, v in ref.named_parameters()
                                 if v in ref_opt.state}},
                   os.path.join(tmp, "ref.pt"))
    D.barrier(info)


@pytest.mark.parametrize("preset_name", ["tiny-dense", "tiny-moe"])
def test_two_process_fsdp_matches_single_process(preset_name, tmp_path):
    import r1lab.model as rm
    from r1lab.train.checkpoint import load_latest_checkpoint

    spawn_ranks(_check, preset_name, str(tmp_path))

    # resume with a different number of processes: the 2-rank sharded state into one plain process
    args = rm.preset(preset_name, moe_impl="loop") if "moe" in preset_name else rm.preset(preset_name)
    model = rm.build(args, seed=99)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    found = load_latest_checkpoint(tmp_path)
    assert found is not None and found[0] == 1
    extra = C.restore_checkpoint(found[1], model, opt, sched, D.single_process())
    assert extra == {"cursor": 5, "step": 1}
    assert sched.last_epoch == 1
    want = torch.load(tmp_path / "ref.pt")
    for name, p in model.named_parameters():
        assert torch.allclose(p, want["params"][name], atol=1e-5, rtol=0), name
    assert want["momentum"]  # (the MTP module gets no gradient, hence no optimizer state)
    for name, p in model.named_parameters():
        if name in want["momentum"]:
            assert torch.allclose(opt.state[p]["momentum_buffer"], want["momentum"][name], atol=1e-5, rtol=0), name


# ----------------------------------------------------------------------------- single-process helpers
def test_rank_share_whole_groups():
    items = list(range(5 * 4))  # 5 groups of 4
    shares = [D.rank_share(items, D.DistInfo(rank=r, world_size=2, is_distributed=True), group_size=4)
              for r in range(2)]
    assert shares[0] + shares[1] == items
    assert [len(s) for s in shares] == [12, 8]
    assert all(len(s) % 4 == 0 for s in shares)
    with pytest.raises(ValueError):
        D.rank_share(list(range(7)), D.single_process(), group_size=2)


def test_check_whole_groups():
    B.check_whole_groups([0, 0, 1, 1, 2, 2], 2)
    with pytest.raises(AssertionError):
        B.check_whole_groups([0, 0, 1], 2)
    with pytest.raises(AssertionError):
        B.check_whole_groups([0, 1, 1, 0], 2)


def test_single_process_is_a_no_op(tmp_path, monkeypatch):
    import r1lab.model as rm

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.init_distributed("cpu")
    assert not info.is_distributed and info.world_size == 1 and info.is_main
    model = P.shard_model(rm.build(rm.preset("tiny-dense")), info)
    with P.gathered_for_rollout(model, info) as policy:
        assert policy is model
    assert D.all_reduce_metrics({"a": 1.0}, info) == {"a": 1.0}
    assert D.max_across_ranks(3, info) == 3
    out = C.save_consolidated(model, info, tmp_path / "hf")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(rm.load(out)(ids), model.eval()(ids))


_EXIT_SCRIPT = """
import atexit, sys
from r1lab import distributed as D
D.init_distributed("cpu")  # R1LAB_FSDP=1: a 1-process gloo group
atexit.register(lambda: print("atexit ran"))
sys.stdout.write("buffered;")  # a pipe: block-buffered, lost unless flushed
D.shutdown(clean=sys.argv[1] == "clean")
D.exit_after_teardown(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
print("returned;")
"""


@pytest.mark.parametrize("clean,code,rc,out", [
    ("clean", "0", 0, "buffered;atexit ran\n"),
    ("clean", "3", 3, "buffered;atexit ran\n"),
    ("clean", "bad recipe", 1, "buffered;atexit ran\n"),
    ("error", "0", 0, "buffered;returned;\natexit ran\n"),  # no clean teardown: the normal way out
])
def test_exit_after_teardown(tmp_path, clean, code, rc, out):
    """A torchrun rank ends without finalizing the interpreter after a clean teardown, yet keeps what a normal
    exit does: its exit code (sys.exit("message") → 1 and the message), atexit handlers, buffered output."""
    import subprocess
    import sys

    env = dict(os.environ, R1LAB_FSDP="1", MASTER_PORT=str(_free_port()), WORLD_SIZE="1", RANK="0")
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, clean, code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert (proc.returncode, proc.stdout) == (rc, out), proc.stderr[-2000:]
    assert ("bad recipe" in proc.stderr) == (code == "bad recipe")
