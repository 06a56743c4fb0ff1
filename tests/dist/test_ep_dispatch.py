"""Expert parallelism on k2-tiny (16 routed experts, top-4): N spawned ranks over gloo, routed experts sharded
E / N per rank, all_to_all dispatch. Each rank's logits for its own sequences equal the single-process model's,
with uneven token counts and ranks that have no tokens in a step; the expert load counts add up. With an EPLB
placement (redundant experts) the logits stay the same and the ranks' max/mean token load drops."""

from __future__ import annotations

import multiprocessing as mp
import queue
import socket
import time

import pytest
import torch
from ep_worker import RankArgs, Step, load, run_steps, serve_rank
from k2ray.kernels import HAS_TRITON

from k2ray.dist.ep_group import EPGroup, EPGroupSpec, EPPeerUnavailable
from k2ray.dist.eplb import rebalance
from k2ray.dist.moe_dispatch import AllToAllDispatch
from k2ray.model.args import ModelArgs
from k2ray.model.default_checkpoint import tiny_checkpoint_dir
from k2ray.model.expert_map import load_imbalance, moe_layer_ids, rank_loads

# Ranks spawn, import torch and load k2-tiny concurrently on a small shared machine.
GROUP_TIMEOUT_S = 120.0
RESULTS_TIMEOUT_S = 300.0
JOIN_TIMEOUT_S = 30.0
# fp32 throughout; the ranks only add the experts' outputs in another order.
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# The GPU's fp32 matmuls may run in TF32 and sum in another order than the single-process run.
GPU_TOLERANCE = {"atol": 1e-3, "rtol": 1e-3}
PROMPT_VOCAB = 512
SKEWED_VOCAB = 16  # prompts from a few token ids: the router favours a few experts
CHECKPOINT = str(tiny_checkpoint_dir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reference_args() -> ModelArgs:
    return ModelArgs.from_checkpoint(CHECKPOINT)


def schedule(rank: int, world_size: int, vocab: int = PROMPT_VOCAB) -> list[Step]:
    """Prompts of different lengths per rank; the last rank starts a step late, rank 1 (when it is not
    the last) skips step 2, and only rank 0 has work in the final step."""
    is_last = rank == world_size - 1

    def prompt(rank: int, index: int, num: int) -> list[int]:
        generator = torch.Generator().manual_seed(rank * 100 + index)
        return torch.randint(0, vocab, (num,), generator=generator).tolist()

    def decode(*seqs: str, step: int) -> Step:
        return [(seq, prompt(rank, 10 * step + i, 1)) for i, seq in enumerate(seqs)]

    if is_last:
        steps = [[], [("a", prompt(rank, 1, 9)), ("b", prompt(rank, 2, 2))], decode("a", "b", step=2)]
        seqs = ("a", "b")
    elif rank == 0:
        steps = [[("a", prompt(rank, 0, 3))], decode("a", step=1), decode("a", step=2) + [("b", prompt(rank, 3, 6))]]
        seqs = ("a", "b")
    else:
        steps = [[("a", prompt(rank, 0, 3 + 4 * rank))], decode("a", step=1), [] if rank == 1 else decode("a", step=2)]
        seqs = ("a",)
    steps.append(decode(*seqs, step=3))
    steps.append(decode("a", step=4) if rank == 0 else [])
    return steps


def group_args(world_size: int, pack_experts: bool = False, device_of=lambda rank: "cpu",
               kernel_backend: str = "torch", placement: str | None = None,
               vocab: int = PROMPT_VOCAB) -> list[RankArgs]:
    port = free_port()
    return [RankArgs(CHECKPOINT, EPGroupSpec("127.0.0.1", port, "ep0", rank, world_size), GROUP_TIMEOUT_S,
                     schedule(rank, world_size, vocab), device_of(rank), kernel_backend, pack_experts, placement)
            for rank in range(world_size)]


def run_processes(all_args: list[RankArgs]) -> list[dict]:
    """Each RankArgs in its own spawned process; their results in the same order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    processes = [ctx.Process(target=serve_rank, args=(i, args, results), daemon=True) for i, args in enumerate(all_args)]
    for process in processes:
        process.start()
    out: dict[int, dict] = {}
    deadline = time.monotonic() + RESULTS_TIMEOUT_S
    try:
        while len(out) < len(all_args):
            index, result = results.get(timeout=max(deadline - time.monotonic(), 0))
            assert not isinstance(result, str), f"process {index}: {result}"
            out[index] = result
    except queue.Empty:
        pytest.fail(f"only processes {sorted(out)} of {len(all_args)} answered within {RESULTS_TIMEOUT_S}s")
    finally:
        for process in processes:
            process.join(JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join(JOIN_TIMEOUT_S)
    return [out[i] for i in range(len(all_args))]


def reference_run(model, world_size: int, vocab: int = PROMPT_VOCAB) -> list[dict]:
    """The single-process model on each rank's schedule, here."""
    runs = [run_steps(model, schedule(rank, world_size, vocab)) for rank in range(world_size)]
    return [{"logits": logits, "counts": counts} for logits, counts in runs]


def assert_matches_single_process(out: list[dict], reference: list[dict], top_k: int, tolerance=TOLERANCE,
                                  vocab: int = PROMPT_VOCAB) -> None:
    world_size = len(out)
    steps = [schedule(rank, world_size, vocab) for rank in range(world_size)]
    for rank in range(world_size):
        for step, expected in enumerate(reference[rank]["logits"]):
            got = out[rank]["logits"][step]
            assert got.keys() == expected.keys()
            for seq in expected:
                torch.testing.assert_close(torch.from_numpy(got[seq]), torch.from_numpy(expected[seq]), **tolerance)
            assert (out[rank]["counts"][step] == reference[rank]["counts"][step]).all(), f"rank {rank} step {step}"
    for step in range(len(steps[0])):
        num_tokens = sum(len(toks) for rank in range(world_size) for _, toks in steps[rank][step])
        per_layer = sum(out[rank]["counts"][step] for rank in range(world_size)).sum(axis=1)
        assert (per_layer == num_tokens * top_k).all(), f"step {step}: {per_layer} != {num_tokens} x {top_k}"


@pytest.fixture(scope="module")
def reference_models():
    return {pack: load(RankArgs(CHECKPOINT, None, GROUP_TIMEOUT_S, [], pack_experts=pack)) for pack in (False, True)}


@pytest.mark.parametrize(("world_size", "pack_experts"), [(2, False), (2, True), (4, False)])
def test_ep_group_matches_the_single_process_model(world_size, pack_experts, reference_models):
    out = run_processes(group_args(world_size, pack_experts))
    model = reference_models[pack_experts]
    args = model.args
    assert_matches_single_process(out, reference_run(model, world_size), args.num_experts_per_tok)
    # Per MoE layer a token travels once to each rank holding one of its experts: at least once, at most top_k.
    num_moe_layers = sum(args.is_moe_layer(layer) for layer in range(args.num_hidden_layers))
    num_tokens = sum(len(toks) for rank in range(world_size) for step in schedule(rank, world_size)
                     for _, toks in step)
    rows_per_token = sum(result["num_sent_rows"] for result in out) / (num_tokens * num_moe_layers)
    assert 1 <= rows_per_token <= min(world_size, args.num_experts_per_tok)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
def test_redundant_experts_keep_the_outputs_and_balance_the_ranks(world_size, reference_models, tmp_path):
    """An EPLB placement with one redundant expert per rank, computed from the single-process model's load on a
    skewed workload, then that workload on the EP group with the placement."""
    model = reference_models[False]
    reference = reference_run(model, world_size, SKEWED_VOCAB)
    load = sum(counts for run in reference for counts in run["counts"])  # [MoE layers, E]
    placement = rebalance(load.tolist(), moe_layer_ids(model.args), world_size, num_redundant_experts=world_size)
    assert all(len(set(row)) < len(row) for row in placement.physical_to_logical)  # it replicates experts
    path = tmp_path / "placement.json"
    placement.save(path)
    out = run_processes(group_args(world_size, placement=str(path), vocab=SKEWED_VOCAB))
    assert_matches_single_process(out, reference, model.args.num_experts_per_tok, vocab=SKEWED_VOCAB)
    before = load_imbalance(rank_loads(torch.from_numpy(load), world_size))
    physical = sum(step for result in out for step in result["physical"])  # [MoE layers, P], the group's
    after = load_imbalance(rank_loads(torch.from_numpy(physical), world_size))
    print(f"ep_size {world_size}: max/mean tokens per rank {before:.3f} contiguous -> {after:.3f} EPLB")
    assert after < before


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter check; the gpu test runs the compiled kernels")
def test_ep_group_runs_the_int4_triton_kernel_under_the_interpreter(monkeypatch):
    """kernel_backend="triton" (packed experts through fused_moe_int4) on both ranks and on the reference, all in
    spawned processes under TRITON_INTERPRET=1 (it must be set before triton is imported)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    world_size = 2
    ranks = group_args(world_size, pack_experts=True, kernel_backend="triton")
    references = [RankArgs(CHECKPOINT, None, GROUP_TIMEOUT_S, args.steps, "cpu", "triton", True) for args in ranks]
    out = run_processes(ranks + references)
    top_k = reference_args().num_experts_per_tok
    assert_matches_single_process(out[:world_size], out[world_size:], top_k)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="an NCCL EP group needs 2 GPUs")
def test_ep_group_over_nccl_with_the_int4_kernel():
    out = run_processes(group_args(2, pack_experts=True, device_of=lambda rank: f"cuda:{rank}",
                                   kernel_backend="triton"))
    model = load(RankArgs(CHECKPOINT, None, GROUP_TIMEOUT_S, [], "cuda:0", "triton", True))
    assert_matches_single_process(out, reference_run(model, 2), model.args.num_experts_per_tok, GPU_TOLERANCE)


def test_missing_rank_fails_the_group_within_its_timeout():
    group = EPGroup(EPGroupSpec("127.0.0.1", free_port(), "ep0", 0, 2), torch.device("cpu"), timeout_s=1.0)
    dispatch = AllToAllDispatch(group, 16)
    with pytest.raises(EPPeerUnavailable, match="not all ranks joined"):
        dispatch.plan(torch.zeros(3, 4, dtype=torch.int64))
    assert not group.is_connected


@pytest.mark.parametrize(("field", "value"), [("rank", 2), ("world_size", 0), ("port", 0), ("group_id", "a/b")])
def test_group_spec_rejects_bad_fields(field, value):
    fields = {"host": "127.0.0.1", "port": 1234, "group_id": "ep0", "rank": 0, "world_size": 2} | {field: value}
    with pytest.raises(ValueError, match=field):
        EPGroupSpec(**fields)


def test_experts_must_shard_evenly():
    group = EPGroup(EPGroupSpec("127.0.0.1", 1234, "ep0", 0, 3), torch.device("cpu"), timeout_s=1.0)
    with pytest.raises(ValueError, match="does not divide"):
        AllToAllDispatch(group, 16)
