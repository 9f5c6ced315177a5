"""The sequence-sharded engine on real gloo ranks (CPU) against the single-process reference.

The tiny models have 6 query / 3 KV heads: P = 2 splits them unevenly by tensor parallelism (4 + 2
query, 2 + 1 KV heads), P = 3 evenly, and P = 4 (more ranks than KV heads) shards only the KV cache
and the scoring while every rank computes the whole model.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from tiny_models import ARCHS, tiny_model

from dist_reattn.config import ScopeConfig
from dist_reattn.distributed import Comm, init_from_env, shutdown
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel

N, NEW, PAGE = 150, 5, 8  # 8-token pages: every rank owns many stripes of the 150-token prompt
SCOPES = {
    "reattention": ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5),
    "full": ScopeConfig(mode="full", sink=4, local=32, chunk=16),
    # 3 chunks per forward: batched candidates, selection and scope K/V fetch across ranks
    "reattention-slab": ScopeConfig(
        mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5, slab=3
    ),
}


def greedy(engine: Engine, ids: torch.Tensor) -> tuple[torch.Tensor, list[int], list]:
    """Prefill, then NEW greedy decode steps: (logits of every step ``[NEW + 1, vocab]``, tokens, scopes)."""
    engine.reset()
    logits, tokens = [engine.prefill(ids)], []
    for _ in range(NEW):
        tokens.append(int(logits[-1].argmax()))
        logits.append(engine.step(torch.tensor([tokens[-1]]), stage="decode"))
    return torch.stack(logits), tokens, list(engine.selections)


def run_all(comm: Comm) -> dict:
    """Logits, greedy tokens and every step's scope, per (arch, mode, decode attention)."""
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(1))
    out = {}
    for arch in ARCHS:
        model = ReAttnModel(tiny_model(arch), comm)
        for mode, scope in SCOPES.items():
            engine = Engine(
                model, scope, N + NEW, comm=comm, page=PAGE, record_selection=True, check_consensus=True
            )
            for decode in ("lse", "gather"):
                engine.decode = decode
                logits, tokens, selections = greedy(engine, ids)
                out[arch, mode, decode] = {"logits": logits, "tokens": tokens, "selections": selections}
    out["stats"] = comm.stats.as_dict()
    out["tensor_parallel"] = model.tensor_parallel
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    comm = init_from_env(timeout_s=120, backend="gloo")
    try:
        result = run_all(comm)
    finally:
        shutdown(comm)
    torch.save(result, f"{path}.rank{rank}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    return run_all(Comm.single())


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_match_single_process(world, reference, tmp_path):
    path = str(tmp_path / "result")
    mp.spawn(_worker, args=(world, free_port(), path), nprocs=world, join=True)
    results = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(world)]
    for arch in ARCHS:
        for mode in SCOPES:
            for decode in ("lse", "gather"):
                ref = reference[arch, mode, "gather"]  # one rank: both forms are the same code
                for rank, res in enumerate(results):
                    got = res[arch, mode, decode]
                    where = f"{arch} {mode} decode={decode} P={world} rank {rank}"
                    assert got["tokens"] == ref["tokens"], where
                    assert len(got["selections"]) == len(ref["selections"]), where
                    for (l1, n1, s1), (l2, n2, s2) in zip(got["selections"], ref["selections"], strict=True):
                        assert (l1, n1) == (l2, n2) and torch.equal(s1, s2), f"{where}: layer {l1} n {n1}"
                    # fp32: the sharded o_proj/MLP sum partial products across ranks in another order,
                    # and the LSE merge adds softmax pieces in another order (~1e-7 relative per
                    # layer); 1e-4 on logits of order 1 leaves margin.
                    torch.testing.assert_close(got["logits"], ref["logits"], atol=1e-4, rtol=0, msg=where)
    assert [r["tensor_parallel"] for r in results] == [world in (2, 3)] * world
    if world > 1:
        stats = results[0]["stats"]
        assert stats["topk_candidates"]["calls"] > 0 and stats["scope_kv"]["bytes"] > 0
        # LSE decode moves [H, d + 1] fp32 per layer and token: 6 heads x 17 x 4 bytes.
        per_call = stats["decode_partials"]["bytes"] / stats["decode_partials"]["calls"]
        assert per_call == 6 * 17 * 4
        assert ("qkv_heads" in stats) == (world in (2, 3))


def _hung_worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    comm = init_from_env(timeout_s=3, backend="gloo")
    if rank == 1:
        time.sleep(60)  # a hung rank: never enters the collective
    t0 = time.perf_counter()
    try:
        comm.all_gather(torch.ones(2), "probe")
    except RuntimeError as e:
        with open(f"{path}.rank{rank}", "w") as f:
            f.write(f"{time.perf_counter() - t0:.1f} {e}")
        os._exit(3)


def test_a_hung_rank_fails_the_job_within_the_timeout(tmp_path):
    path = str(tmp_path / "err")
    t0 = time.perf_counter()
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(_hung_worker, args=(2, free_port(), path), nprocs=2, join=True)
    assert time.perf_counter() - t0 < 40  # not the hung rank's 60 s: the timeout (3 s) ended the job
    waited, message = open(f"{path}.rank0").read().split(" ", 1)
    assert 2.5 < float(waited) < 20
    assert (
        message.startswith("rank 0/2: collective #1 (probe) failed")
        and "another rank died or hangs; not there: rank 1 (entered #0)" in message
    )
