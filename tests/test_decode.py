"""The static decode step (what a CUDA graph replays) against the prefill's step, on CPU and on a GPU.

The reference is the prefill's :class:`~dist_reattn.engine.Step` fed one token, which an engine
built with ``decode="gather"`` decodes with (another selection call, K/V read from the window and
the owners, SDPA). On CPU the static step runs eagerly (``Engine.decode_step``,
``GreedyDecoder(capture=False)``); where a GPU is present the same comparison runs with the graph
captured and replayed.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import free_port, join, spawn
from tiny_models import ARCHS, tiny_model

from dist_reattn.config import ScopeConfig
from dist_reattn.decode import GreedyDecoder, graph_reason, static_reason
from dist_reattn.distributed import shutdown
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel

N = 150
SCOPE = dict(sink=4, local=32, chunk=32, topk=2, span=4, recall_clip=8)
# Random tokens below the EOS id (127) of the tiny models: generation runs its whole length.
IDS = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(3))


# Gemma3: sliding-window layers (their own window) among the global ones.
DECODE_ARCHS = (*ARCHS, "gemma3_text")


@pytest.fixture(scope="module", params=DECODE_ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model(arch):
    return ReAttnModel(tiny_model(arch, layers=2))


@pytest.fixture(scope="module")
def model64(arch):
    """The same model in float64, for comparisons of whole greedy runs. The two steps sum attention
    in different orders; in fp32 that ulp difference can flip a top-k near-tie of a random tiny model
    (qwen3 with retrieval heads, step 29, on an AMD EPYC CPU), and every later token differs. In fp64
    a flip needs a near-tie 1e9 times closer; the fp32 logits are compared step by step above."""
    return ReAttnModel(tiny_model(arch, layers=2).double())


def engines(model, mode, capacity=N + 64, select="paper", heads=""):
    """(reference: decodes with the prefill's step, static: decodes with the static step), eagerly."""
    cfg = ScopeConfig(mode=mode, select=select, heads=heads, **SCOPE)
    plain = Engine(model, copy.copy(cfg), capacity, decode="gather", graph=False)
    return plain, Engine(model, copy.copy(cfg), capacity, graph=False)


@pytest.mark.parametrize(
    "mode,select", [("reattention", "paper"), ("streaming", "paper"), ("reattention", "mass_shared")]
)
def test_static_step_logits_equal_the_prefill_step(model, mode, select):
    # Step by step, same tokens fed to both: every decode step's logits (fp32) agree to rounding.
    plain, static = engines(model, mode, select=select)
    with torch.no_grad():
        a, b = plain.prefill(IDS), static.prefill(IDS)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        for t in range(12):
            assert static_reason(static.view()) is None and "gather" in static_reason(plain.view())
            token = int(a.argmax())
            a, b = plain.decode_step(token), static.decode_step(token)
            # the same ops on the same values: equal up to the order of fp32 sums in SDPA
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=f"step {t}")
    assert static.n == plain.n == N + 12


@pytest.mark.parametrize(
    "mode,select",
    [
        ("reattention", "paper"),
        ("streaming", "paper"),
        ("reattention", "qkv"),
        ("reattention", "qk_pe"),
        ("reattention", "mass_shared"),
    ],
)
def test_greedy_decoder_tokens_equal_the_plain_path(model64, mode, select):
    # Every selection goes through the same score_chunks / select_scope seam in both steps
    # (mass_shared: its first pass is scope.select=mass, then every layer the last layer's scope).
    check_greedy_decoder(model64, *engines(model64, mode, select=select))


def test_greedy_decoder_with_retrieval_heads_equals_the_plain_path(model64, tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text('{"heads": {"0": [0], "1": [1, 2]}}')
    check_greedy_decoder(model64, *engines(model64, "reattention", heads=str(heads)))


def check_greedy_decoder(model, plain, static):
    want = plain.generate(IDS, 40)
    assert want.decode_tokens == len(want.tokens) - 2  # the first decode step is warm-up
    eager = static.generate(IDS, 40)  # Engine.decode: the static step, token by token
    assert eager.tokens == want.tokens and not eager.decode_graph and static.n == N + len(want.tokens) - 1
    static.reset()
    logits = static.prefill(IDS)
    d = GreedyDecoder(static.view(), capture=False, check_every=5).run(
        int(logits.argmax()), 40, model.eos_ids
    )
    assert d.tokens == want.tokens and not d.graph and d.warmup_steps == 0
    assert len(d.tokens) - 1 <= d.steps == d.fed <= 39  # reads every 5 steps: a few may run past an EOS


def test_greedy_decoder_stops_at_eos(model64):
    # EOS is whatever the plain path generates 9th: the decoder stops there, though it read the
    # tokens back only every 4 steps (its extra steps are not returned).
    plain, static = engines(model64, "reattention")
    want = plain.generate(IDS, 30).tokens
    eos = want[8]
    cut = want[: want.index(eos) + 1]
    logits = static.prefill(IDS)
    d = GreedyDecoder(static.view(), capture=False, check_every=4).run(int(logits.argmax()), 30, eos={eos})
    # steps run in batches of 4 between reads: the batch that made the EOS is the last one run
    assert d.tokens == cut and d.steps == -(-(len(cut) - 1) // 4) * 4


def test_greedy_decoder_refuses_past_capacity(model):
    _, static = engines(model, "reattention", capacity=N + 10)
    logits = static.prefill(IDS)
    with pytest.raises(RuntimeError, match="exceeds the engine's capacity"):
        GreedyDecoder(static.view(), capture=False).run(int(logits.argmax()), 20, eos=set())


def test_reasons_name_what_keeps_the_prefill_step(model):
    plain, static = engines(model, "reattention")
    assert graph_reason(static.view()) == "not a CUDA device"
    assert "inside sink + local" in static_reason(static.view())  # an empty cache
    static.prefill(IDS)
    assert static_reason(static.view()) is None and "gather" in static_reason(plain.view())
    full = Engine(model, ScopeConfig(mode="full", **SCOPE), N + 64)
    full.prefill(IDS)
    assert "full mode" in static_reason(full.view())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph capture)")
@pytest.mark.parametrize("arch", DECODE_ARCHS)
@pytest.mark.parametrize(
    "mode,select", [("reattention", "paper"), ("streaming", "paper"), ("reattention", "mass_shared")]
)
def test_cuda_graph_tokens_equal_the_plain_path(arch, mode, select):
    # The captured graph against the prefill's step on the GPU, fp32 weights, 60 tokens: same tokens.
    # (mass_shared: both passes of every token in the graph.)
    m = ReAttnModel(tiny_model(arch, layers=2).cuda())
    cfg = ScopeConfig(mode=mode, select=select, **SCOPE)
    plain = Engine(m, copy.copy(cfg), N + 80, decode="gather", graph=False).generate(IDS, 60)
    graphed = Engine(m, copy.copy(cfg), N + 80, graph=True).generate(IDS, 60)
    assert graphed.decode_graph and graphed.tokens == plain.tokens
    # two eager warm-up steps, then replays read every 16 tokens for EOS: a random tiny model may
    # stop early, and the replays after its EOS in that batch of 16 ran (and are counted as run)
    steady = len(graphed.tokens) - 1 - 2
    assert (
        graphed.decode_tokens == steady
        if len(graphed.tokens) == 60
        else steady <= graphed.decode_tokens < steady + 16
    )


FORCED = torch.randint(0, 120, (12,), generator=torch.Generator().manual_seed(4)).tolist()


def forced_logits(engine_plain: Engine, engine_static: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """Both engines prefilled with IDS, then fed the FORCED tokens one by one (``decode_step``: the
    prefill's step, and the static step): every step's logits ``[len(FORCED), vocab]`` of each."""
    engine_plain.prefill(IDS)
    engine_static.prefill(IDS)
    a = [engine_plain.decode_step(token) for token in FORCED]
    b = [engine_static.decode_step(token) for token in FORCED]
    return torch.stack(a), torch.stack(b)


def make(model, mode: str, comm=None, decode: str = "lse") -> Engine:
    """An eager engine over 8-token pages (striped over the ranks of ``comm``); ``decode="gather"``
    decodes with the prefill's step."""
    cfg = ScopeConfig(mode=mode, **SCOPE)
    return Engine(model, cfg, N + 64, comm=comm, page=8, decode=decode, graph=False)


def _ranks_worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    comm = join(rank, world, port)
    out = {}
    try:
        for arch in ("llama", "gemma3_text"):
            model = ReAttnModel(tiny_model(arch, layers=2), comm)
            for mode in ("reattention", "streaming"):
                logits = forced_logits(make(model, mode, comm, "gather"), make(model, mode, comm))
                engine = make(model, mode, comm)
                first = int(engine.prefill(IDS).argmax())
                d = GreedyDecoder(engine.view(), capture=False, check_every=4).run(first, 6, model.eos_ids)
                out[arch, mode] = (*logits, d.tokens)
    finally:
        shutdown(comm)
    torch.save(out, f"{path}.rank{rank}")


@pytest.mark.parametrize("world", [2, 3])
def test_static_step_on_ranks_equals_one_process(world, tmp_path):
    # Striped 8-token pages: every scope spans several owners; the static step exchanges candidates
    # and merges per-owner partials. Fed the same tokens, its logits equal the prefill step's on the
    # same ranks and one process's (fp32; the LSE merge and SDPA sum in other orders: 1e-4 on logits
    # of order 1); its greedy loop gives one process's first tokens.
    path = str(tmp_path / "r")
    spawn(_ranks_worker, (world, free_port(), path), world)  # forked from test_distributed's server
    results = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(world)]
    torch.set_grad_enabled(False)
    for arch in ("llama", "gemma3_text"):
        model = ReAttnModel(tiny_model(arch, layers=2))
        for mode in ("reattention", "streaming"):
            want, _ = forced_logits(make(model, mode, decode="gather"), make(model, mode))
            tokens = make(model, mode, decode="gather").generate(IDS, 6).tokens
            for rank, (plain, static, greedy) in enumerate(results[r][arch, mode] for r in range(world)):
                where = f"{arch} {mode} P={world} rank {rank}"
                torch.testing.assert_close(plain, want, atol=1e-4, rtol=0, msg=where)
                torch.testing.assert_close(static, want, atol=1e-4, rtol=0, msg=where)
                assert greedy == tokens, where


def _gpu_ranks_worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_grad_enabled(False)
    comm = join(rank, world, port, backend="nccl")
    out = {}
    try:
        for arch in ("llama", "gemma3_text"):
            model = ReAttnModel(tiny_model(arch, layers=2).cuda(), comm)
            for mode in ("reattention", "streaming"):
                runs = []
                for graph in (False, True):
                    cfg = ScopeConfig(mode=mode, **SCOPE)
                    engine = Engine(model, cfg, N + 80, comm=comm, page=8, graph=graph)
                    runs.append(engine.generate(IDS, 40))
                out[arch, mode] = [(g.tokens, g.decode_graph) for g in runs]
    finally:
        shutdown(comm)
    torch.save(out, f"{path}.rank{rank}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL inside a CUDA graph)")
def test_cuda_graph_on_two_gpus_equals_their_plain_step(tmp_path):
    # Two NCCL ranks, striped 8-token pages: the captured graph holds the candidate all-gather and the
    # log-sum-exp merge of per-owner partials. Its tokens equal the same step run eagerly on the same
    # ranks (40 tokens, fp32) and one process's prefill step for the first 6 (other summation orders).
    world, path = 2, str(tmp_path / "r")
    mp.spawn(_gpu_ranks_worker, args=(world, free_port(), path), nprocs=world, join=True)
    results = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(world)]
    torch.set_grad_enabled(False)
    for arch in ("llama", "gemma3_text"):
        model = ReAttnModel(tiny_model(arch, layers=2).cuda())
        for mode in ("reattention", "streaming"):
            cfg = ScopeConfig(mode=mode, **SCOPE)
            one = Engine(model, cfg, N + 80, page=8, decode="gather", graph=False).generate(IDS, 40)
            for rank in range(world):
                (plain, plain_graph), (graphed, captured) = results[rank][arch, mode]
                where = f"{arch} {mode} rank {rank}"
                assert captured and not plain_graph, where
                assert graphed == plain, where
                assert graphed[:6] == one.tokens[:6], where
