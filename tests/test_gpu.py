"""The engine on a CUDA GPU (bf16, the Triton kernel as the local top-k step); skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import ARCHS, tiny_model

import dist_reattn.select as select
from dist_reattn.config import ScopeConfig
from dist_reattn.engine import Engine
from dist_reattn.kernels import score_topk_ref
from dist_reattn.models.adapter import ReAttnModel

pytestmark = pytest.mark.gpu
N = 600


@pytest.mark.parametrize("arch", ARCHS)
def test_kernel_and_reference_choose_the_same_scopes(arch, monkeypatch):
    hf = tiny_model(arch).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(2))
    cfg = ScopeConfig(mode="reattention", sink=4, local=64, chunk=64, topk=4, span=8, recall_clip=16)
    fast = Engine(ReAttnModel(copy.deepcopy(hf)), cfg, N + 8, record_selection=True)
    tokens_fast = fast.generate(ids, 6).tokens
    monkeypatch.setattr(select, "score_topk", score_topk_ref)  # same engine, torch reference scoring
    slow = Engine(ReAttnModel(copy.deepcopy(hf)), cfg, N + 8, record_selection=True)
    tokens_slow = slow.generate(ids, 6).tokens
    assert tokens_fast == tokens_slow
    assert len(fast.selections) == len(slow.selections)
    for (l1, n1, s1), (l2, n2, s2) in zip(fast.selections, slow.selections, strict=True):
        assert (l1, n1) == (l2, n2) and torch.equal(s1, s2), f"layer {l1} n {n1}"


@pytest.mark.parametrize("arch", ARCHS)
def test_full_mode_matches_hf_in_bf16(arch):
    hf = tiny_model(arch).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(3))
    ref = hf(ids[None].cuda()).logits[0, -1].float()
    engine = Engine(ReAttnModel(copy.deepcopy(hf)), ScopeConfig(mode="full", local=64, chunk=64), N)
    # bf16 keeps 8 mantissa bits: chunked vs one-shot attention round differently, ~1e-2 on logits ~1.
    torch.testing.assert_close(engine.prefill(ids).float(), ref, atol=5e-2, rtol=0)


def test_profile_on_cuda_adds_up_to_the_prefill():
    hf = tiny_model("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(4))
    cfg = ScopeConfig(mode="reattention", sink=4, local=64, chunk=64, topk=4, span=8, recall_clip=16)
    engine = Engine(ReAttnModel(hf), cfg, N + 8)
    engine.generate(ids, 2)  # warm-up: kernel compilation is not what the profile is about
    gen = engine.generate(ids, 4)
    prefill = gen.profile["prefill"]
    assert {"scoring", "selection", "attention", "model"} <= set(prefill["seconds"])
    slab = 64 * cfg.slab_on("cuda")  # tokens per prefill forward
    assert prefill["tokens"] == N and prefill["steps"] == -(-N // slab)
    assert prefill["layer_steps"] == hf.config.num_hidden_layers * -(-N // 64)
    # Events time the stream; the host's wall clock includes launch latency after the last event.
    assert 0.5 * gen.prefill_seconds < prefill["total_s"] <= 1.05 * gen.prefill_seconds
    # Decode: a CUDA graph here (tiny llama, one GPU): its eager warm-up steps and capture are the
    # "decode_warmup" stage, the replays the "decode" stage; together every generated token's step.
    assert gen.decode_graph and gen.profile["decode"]["tokens"] == gen.decode_tokens
    assert gen.profile["decode_warmup"]["tokens"] + gen.decode_tokens == len(gen.tokens) - 1


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (32, 8, 128)])
def test_masked_gqa_attention_equals_expanded_heads(heads, kv_heads, d):
    # On CUDA a padded scope attends through SDPA with enable_gqa and the mask (cuDNN), or, where no
    # fused kernel takes that, with K/V expanded to every head; both must equal expanded heads.
    from dist_reattn.attention import scope_attention

    gen = torch.Generator(device="cuda").manual_seed(5)
    B, c, m = 2, 64, 320
    q = torch.randn(B, heads, c, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, kv_heads, m, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    valid = torch.rand(B, m, device="cuda", generator=gen) < 0.7
    valid[:, -c:] = True
    positions = valid.cumsum(-1) - 1
    cos = torch.randn(m, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    sin = torch.randn_like(cos)
    g = heads // kv_heads
    got = scope_attention(q, k, v, cos, sin, 0.125, positions, valid)
    want = scope_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), cos, sin, 0.125, positions, valid
    )
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
