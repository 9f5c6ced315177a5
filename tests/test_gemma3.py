"""Gemma3 (sliding-window layers around global ones) on a tiny random config: against the unmodified
HF model, on real gloo ranks against one process, and in the memory plan."""

from __future__ import annotations

import copy

import pytest
import torch
from test_distributed import assert_ranks_match, run_all, run_ranks
from tiny_models import GEMMA3_WINDOW, tiny_gemma3

from dist_reattn.config import ConfigError, ScopeConfig
from dist_reattn.distributed import Comm
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel
from dist_reattn.models.load import spec_from_hf_config
from dist_reattn.plan import plan_memory
from dist_reattn.sliding import sliding_bytes

N = 150  # 7.5 sliding windows
# fp32; chunked attention and the renumbered positions of the sliding layers add in another order
# than one HF call: ~1e-6 on logits of order 1 after 5 layers; 1e-4 leaves margin, while a wrong
# window edge or a wrong rotary moves them by more than 1e-2.
ATOL = 1e-4
GEMMA = ("gemma3_text",)


@pytest.fixture(scope="module")
def gemma():
    hf = tiny_gemma3()
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = hf(ids[None]).logits[0, -1]
        ref_tokens = hf.generate(ids[None], max_new_tokens=6, do_sample=False)[0, N:].tolist()
    return hf, ReAttnModel(copy.deepcopy(hf)), ids, ref_logits, ref_tokens


def test_spec_reads_sliding_layers(gemma):
    _, ours, _, _, _ = gemma
    s = ours.spec
    assert s.sliding_layers == (0, 2, 3) and s.cache_layers == (1, 4) and s.sliding_window == GEMMA3_WINDOW
    assert s.kv_bytes_per_token(4) == 2 * 1 * 16 * 2 * 4  # the two global layers only
    assert ours.typed_rope
    # the two rotaries differ: each layer type gets its own
    cos_g, _ = ours.rope(torch.arange(8))
    cos_s, _ = ours.rope(torch.arange(8), sliding=True)
    assert (cos_g - cos_s).abs().max() > 0.1


@pytest.mark.parametrize("chunk, slab", [(16, 1), (7, 1), (16, 4), (64, 1)])
def test_full_mode_matches_hf(gemma, chunk, slab):
    # chunks shorter than the window (7), longer (64), several per forward (slab 4)
    _, ours, ids, ref_logits, ref_tokens = gemma
    cfg = ScopeConfig(mode="full", sink=4, local=max(32, chunk), chunk=chunk, slab=slab)
    engine = Engine(ours, cfg, capacity=N + 8)
    torch.testing.assert_close(engine.prefill(ids), ref_logits, atol=ATOL, rtol=0)
    assert engine.generate(ids, 6).tokens == ref_tokens
    # only the global layers are cached; each sliding layer keeps its window - 1 last tokens
    assert engine.cache.k.shape[0] == 2
    assert engine.sliding.k.shape == (3, GEMMA3_WINDOW - 1, 1, 16)


@pytest.mark.parametrize("select", ["paper", "mass_shared"])
def test_retrieval_selecting_everything_equals_hf(gemma, select):
    # The retrieval path on the global layers (one hit widened to the whole middle): every scope is
    # the whole cache in order, so the result is the HF model's.
    _, ours, ids, ref_logits, ref_tokens = gemma
    cfg = ScopeConfig(
        mode="reattention", sink=4, local=32, chunk=16, topk=1, span=2 * N, recall_clip=1, select=select
    )
    engine = Engine(ours, cfg, capacity=N + 8, record_selection=True)
    torch.testing.assert_close(engine.prefill(ids), ref_logits, atol=ATOL, rtol=0)
    assert engine.selections and {layer for layer, _, _ in engine.selections} == {0, 1}  # cache slots
    for _, n, scope in engine.selections:
        assert torch.equal(scope, torch.arange(n))
    assert engine.generate(ids, 6).tokens == ref_tokens


def test_retrieval_differs_from_full_and_keeps_the_structure(gemma):
    _, ours, ids, ref_logits, _ = gemma
    cfg = ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5)
    engine = Engine(ours, cfg, capacity=N + 8, record_selection=True)
    got = engine.prefill(ids)
    assert (got - ref_logits).abs().max() > 100 * ATOL  # a bounded scope: not the full model
    for _, n, scope in engine.selections:
        assert torch.equal(scope[-32:], torch.arange(n - 32, n)) and scope.numel() <= 4 + 20 + 32


def test_softcapping_is_refused():
    import transformers as tf

    cfg = tf.Gemma3TextConfig(num_hidden_layers=2, attn_logit_softcapping=50.0)
    with pytest.raises(ConfigError, match="attn_logit_softcapping"):
        spec_from_hf_config(cfg)


def test_memory_plan_counts_global_layers_and_windows():
    # Gemma-3-270M's shape: 18 layers, 3 global, 1 KV head x 256, window 512
    import transformers as tf

    shape = dict(num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512)
    spec = spec_from_hf_config(
        tf.Gemma3TextConfig(
            num_hidden_layers=18, vocab_size=262144, hidden_size=640, intermediate_size=2048, **shape
        )
    )
    assert len(spec.cache_layers) == 3 and len(spec.sliding_layers) == 15
    assert spec.kv_bytes_per_token(2) == 3 * 1 * 256 * 2 * 2  # 3,072 bytes per token in bf16
    plan = plan_memory(
        spec, 1 << 20, torch.bfloat16, torch.device("cpu"), chunk=512, max_scope=16_000, full_mode=False
    )
    assert plan.kv_bytes == (1 << 20) * 3072
    assert plan.sliding_bytes == sliding_bytes(15, 512, 1, 256, 2, 512) == 15 * 511 * 1024 + 1023 * 1024
    assert plan.total == plan.kv_bytes + plan.sliding_bytes + plan.weight_bytes + plan.activation_bytes


@pytest.fixture(scope="module")
def reference():
    return run_all(Comm.single(), archs=GEMMA)


@pytest.mark.parametrize("world, layout", [(2, "tensor"), (3, "sequence")])
def test_ranks_match_single_process(world, layout, reference, tmp_path):
    # Sequence groups split the 8-chunk slabs: a rank's first chunk needs the window's tokens from
    # the rank before (window 20 > chunk 16). Tensor layout: 1 KV head cannot be split, so P = 2
    # falls back to sequence groups (a warning), which this case then tests at P = 2.
    results = run_ranks(world, layout, GEMMA, tmp_path)
    assert [r["tensor_parallel"] for r in results] == [False] * world
    assert_ranks_match(results, reference, GEMMA, f"P={world} {layout}", atol=ATOL)
    assert "qkv_slab" in results[0]["stats"]
