"""The engine on tiny random models of every supported architecture, against the unmodified HF model."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from dist_reattn.config import ScopeConfig
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel

N = 150
# fp32 everywhere: chunked attention sums in a different order than one HF call, so logits agree
# to float32 rounding accumulated over 2 layers, far below 1e-4 of logits of order 1.
ATOL = 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def arch_models(request):
    hf = tiny_model(request.param)
    ours = ReAttnModel(copy.deepcopy(hf))
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = hf(ids[None]).logits[0, -1]
        ref_tokens = hf.generate(ids[None], max_new_tokens=6, do_sample=False)[0, N:].tolist()
    return hf, ours, ids, ref_logits, ref_tokens


def test_full_mode_matches_hf(arch_models):
    _, ours, ids, ref_logits, ref_tokens = arch_models
    engine = Engine(ours, ScopeConfig(mode="full", sink=4, local=32, chunk=32), capacity=N + 8)
    torch.testing.assert_close(engine.prefill(ids), ref_logits, atol=ATOL, rtol=0)
    assert engine.generate(ids, 6).tokens == ref_tokens


def test_reattention_equals_full_when_cache_fits_the_window(arch_models):
    # The regime of DESIGN section 2 step 2 (n <= sink + local): every step's scope is the whole
    # cache in order, so no retrieval happens and the result is the HF model's.
    _, ours, ids, ref_logits, _ = arch_models
    cfg = ScopeConfig(mode="reattention", sink=4, local=N, chunk=32)
    engine = Engine(ours, cfg, capacity=N + 8, record_selection=True)
    torch.testing.assert_close(engine.prefill(ids), ref_logits, atol=ATOL, rtol=0)
    for _, n, scope in engine.selections:
        assert torch.equal(scope, torch.arange(n))


@pytest.fixture(scope="module", params=ARCHS)
def one_layer(request):
    # With one layer the keys and values are functions of the embeddings alone, so the last token's
    # logits depend only on which tokens are in its scope: the unmodified HF model run over exactly
    # those tokens (positions 0..|scope|-1, as the scope renumbers them) is an independent reference.
    hf = tiny_model(request.param, layers=1)
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(1))
    return hf, ReAttnModel(copy.deepcopy(hf)), ids


def hf_last_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0, -1]


@pytest.mark.parametrize("mode", ["streaming", "reattention"])
def test_sink_plus_local_equals_hf_over_exactly_those_tokens(one_layer, mode):
    # streaming, and reattention with topk 0, attend to [0, sink) + [n - local, n) only.
    hf, ours, ids = one_layer
    cfg = ScopeConfig(mode=mode, sink=4, local=32, chunk=16, topk=0)
    got = Engine(ours, cfg, capacity=N).prefill(ids)
    ref = hf_last_logits(hf, torch.cat([ids[:4], ids[N - 32 :]]))
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # not what the whole context gives (else the comparison could not tell the two apart)
    assert (got - hf_last_logits(hf, ids)).abs().max() > 100 * ATOL


def test_retrieval_scope_equals_hf_over_the_selected_tokens(one_layer):
    # The retrieval step runs (cache beyond sink + local) and picks some, not all, middle tokens; the
    # last token's logits are the HF model's over exactly the recorded scope, renumbered.
    hf, ours, ids = one_layer
    cfg = ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5)
    engine = Engine(ours, cfg, capacity=N, record_selection=True)
    got = engine.prefill(ids)
    (scope,) = [s for _, n, s in engine.selections if n == N]
    middle = scope[4:-32]
    assert 0 < middle.numel() < N - 4 - 32, "no retrieval, or everything retrieved"
    torch.testing.assert_close(got, hf_last_logits(hf, ids[scope]), atol=ATOL, rtol=0)
    assert (got - hf_last_logits(hf, torch.cat([ids[:4], ids[N - 32 :]]))).abs().max() > 100 * ATOL


@pytest.mark.parametrize("select", ["paper", "mass_shared"])
def test_retrieval_path_selecting_everything_equals_full(arch_models, select):
    # topk and recall_clip as large as the middle: every middle token is retrieved, so the scope is
    # the whole cache in order and positions equal the original ones.
    _, ours, ids, ref_logits, ref_tokens = arch_models
    # topk 1 with a span twice the middle: each hit widens to the whole middle (topk stays within
    # the score kernel's limit). mass_shared: the prompt's last token and each decode token run
    # twice, the second pass writing their K/V again: the result must not change.
    cfg = ScopeConfig(
        mode="reattention", sink=4, local=32, chunk=16, topk=1, span=2 * N, recall_clip=N, select=select
    )
    engine = Engine(ours, cfg, capacity=N + 8, record_selection=True)
    torch.testing.assert_close(engine.prefill(ids), ref_logits, atol=ATOL, rtol=0)
    assert engine.selections, "the retrieval step never ran"
    for _, n, scope in engine.selections:
        assert torch.equal(scope, torch.arange(n))
    assert engine.generate(ids, 6).tokens == ref_tokens


def test_reattention_scope_structure(arch_models):
    _, ours, ids, ref_logits, _ = arch_models
    cfg = ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5)
    engine = Engine(ours, cfg, capacity=N + 8, record_selection=True)
    gen = engine.generate(ids, 4)
    # the seeded tiny models emit no EOS (id 127) in 4 steps: generation runs to max_new_tokens
    assert len(gen.tokens) == 4, gen.tokens
    layers = ours.spec.layers
    decode_steps = [s for s in engine.selections if s[1] > N]
    assert len(decode_steps) == layers * (len(gen.tokens) - 1)
    for _, n, scope in engine.selections:
        assert torch.equal(scope[:4], torch.arange(4))
        assert torch.equal(scope[-32:], torch.arange(n - 32, n))
        middle = scope[4:-32]
        assert middle.numel() <= 5 * 4
        assert bool((middle >= 4).all()) and bool((middle < n - 32).all())
        assert bool((middle[1:] > middle[:-1]).all())


def test_capacity_is_enforced(arch_models):
    _, ours, ids, _, _ = arch_models
    engine = Engine(ours, ScopeConfig(mode="full", sink=4, local=32, chunk=32), capacity=N - 1)
    with pytest.raises(RuntimeError, match="capacity"):
        engine.prefill(ids)


def test_unsupported_architecture_is_refused():
    import transformers as tf

    from dist_reattn.config import ConfigError

    cfg = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    with pytest.raises(ConfigError, match="supported: llama, mistral, qwen2, qwen3"):
        ReAttnModel(tf.GPT2LMHeadModel(cfg))


@pytest.mark.parametrize("mode", ["reattention", "streaming", "full"])
def test_slab_of_chunks_equals_chunk_by_chunk(arch_models, mode):
    # One forward of several chunks (projections and MLPs over the slab, retrieval and attention
    # batched over its chunks) gives every chunk the scope and attention it gets alone: same scopes
    # per (layer, n), logits within fp32 rounding, same greedy tokens. N = 150 with chunk 16 and
    # slab 4 has a plain prefix, full batches, a batch cut by the slab's end and a short last chunk.
    _, ours, ids, _, _ = arch_models
    runs = {}
    for slab in (1, 4):
        cfg = ScopeConfig(mode=mode, sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5, slab=slab)
        engine = Engine(ours, cfg, capacity=N + 8, record_selection=True)
        logits = engine.prefill(ids)
        scopes = sorted((n, layer, s.tolist()) for layer, n, s in engine.selections)
        runs[slab] = logits, scopes, engine.generate(ids, 6).tokens, engine.profile.as_dict()
    (l1, s1, t1, p1), (l4, s4, t4, p4) = runs[1], runs[4]
    torch.testing.assert_close(l4, l1, atol=ATOL, rtol=0)
    assert s4 == s1 and (mode == "full" or len(s1) == ours.spec.layers * (N // 16 - 2 + 1))
    assert t4 == t1
    # the slab ran fewer forwards over the same chunks
    assert p4["prefill"]["steps"] == -(-N // 64) and p1["prefill"]["steps"] == -(-N // 16)
    assert p4["prefill"]["layer_steps"] == p1["prefill"]["layer_steps"]


def test_a_call_scope_is_served_within_the_limits_and_refused_beyond(arch_models):
    # Issue #26: an engine's limits (the widest sink, local, chunk and slab) are fixed at build; a
    # call's scope within them reads what an engine built for that scope reads, one beyond them is
    # refused with one line naming the limit (never served from a window sized for less).
    import dataclasses

    from dist_reattn.config import ConfigError, ScopeLimits

    _, ours, ids, _, _ = arch_models
    narrow = ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5)
    wide = dataclasses.replace(narrow, sink=8, local=64, slab=2)
    built = Engine(ours, narrow, N + 8, limits=ScopeLimits.of([narrow, wide], "cpu"))
    assert built.generate(ids, 4, scope=wide).tokens == Engine(ours, wide, N + 8).generate(ids, 4).tokens
    assert built.generate(ids, 4).tokens == Engine(ours, narrow, N + 8).generate(ids, 4).tokens
    small = Engine(ours, narrow, N + 8)
    for field, value in (("sink", 8), ("local", 64), ("chunk", 32), ("slab", 2)):
        with pytest.raises(ConfigError) as e:
            small.generate(ids, 4, scope=dataclasses.replace(narrow, **{field: value}))
        msg = str(e.value)
        assert "\n" not in msg and f"limit {field}=" in msg, msg
    with pytest.raises(ConfigError, match=r"^scope.select='qkv' needs other score keys than this engine"):
        small.generate(ids, 4, scope=dataclasses.replace(narrow, select="qkv"))  # the cache keeps plain keys
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.scope.local = 64


def test_a_call_scope_brings_its_own_scoring_and_heads(arch_models, tmp_path):
    # A call's scope.select (one that needs no other score keys) and scope.heads are served as by an
    # engine built with them: same scopes at every step, which differ from the build's own.
    import dataclasses

    _, ours, ids, _, _ = arch_models
    heads = tmp_path / "heads.json"
    heads.write_text('{"heads": {"0": [1], "1": [0, 3]}}')
    base = ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=3)

    def scopes(engine, scope=None):
        engine.generate(ids, 3, scope=scope)
        return [(layer, n, t.tolist()) for layer, n, t in engine.selections]

    paper = scopes(Engine(ours, base, N + 8, record_selection=True))
    for other in (dataclasses.replace(base, select="qk_pe"), dataclasses.replace(base, heads=str(heads))):
        built = Engine(ours, base, N + 8, record_selection=True)
        want = scopes(Engine(ours, other, N + 8, record_selection=True))
        assert scopes(built, other) == want and want != paper, other
        assert scopes(built) == paper  # and the next call without a scope is the build's again


def test_mass_shared_runs_one_token_steps_twice_with_the_last_layers_scope(arch_models):
    """``scope.select=mass_shared``: the prompt's last token is fed alone; each one-token step runs a
    first pass (layer l keeps the keys of largest mass of layers 0..l), then a second pass where every
    layer attends the first pass's last-layer scope."""
    _, ours, ids, _, _ = arch_models
    cfg = ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=1, span=8, recall_clip=3)
    engine = Engine(
        ours, dataclasses.replace(cfg, select="mass_shared"), capacity=N + 8, record_selection=True
    )
    engine.generate(ids, 3)
    layers = len(ours.spec.cache_layers)
    differs = []
    for n in (N, N + 1, N + 2):  # the prompt's last token, then two decode tokens
        scopes = [s for _, m, s in engine.selections if m == n]
        assert len(scopes) == 2 * layers, n
        first, second = scopes[:layers], scopes[layers:]
        assert all(torch.equal(s, first[-1]) for s in second), n
        differs.append(not all(torch.equal(s, first[-1]) for s in first))
    assert any(differs)  # the first pass chose per layer: the second pass changed something
    assert any(m == N - 1 for _, m, _ in engine.selections)  # the chunks stopped one token short
