"""``scope.scoring=fp8`` in the engine (issue #25) on tiny random models, CPU: the FP8 reference scores.

With a margin covering every tile of a row the approximate path is the exact one, bit for bit, so
the engine's logits, tokens and scopes are the exact engine's; with a small margin on keys with
outlier channels it may pick otherwise, and the agreement it measured on its sample is reported.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from dist_reattn.config import ConfigError, ScopeConfig, ScopeLimits, load_config
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel

N, NEW = 150, 5
# topk 2 + margin 4 keeps 6 tiles of 64 keys: every tile of a middle of at most N - 36 keys
EXACT = ScopeConfig(mode="reattention", sink=4, local=32, chunk=16, topk=2, span=4, recall_clip=5)
FP8 = dataclasses.replace(EXACT, scoring="fp8")


def greedy(engine: Engine, ids: torch.Tensor, scope: ScopeConfig | None = None):
    """Prefill, then NEW greedy decode steps: (logits ``[NEW + 1, vocab]``, tokens, scopes, profile)."""
    engine.reset(scope)
    logits, tokens = [engine.prefill(ids)], []
    for _ in range(NEW):
        tokens.append(int(logits[-1].argmax()))
        logits.append(engine.decode_step(tokens[-1]))
    return torch.stack(logits), tokens, list(engine.selections), engine.profile.as_dict()


# every architecture; the value-norm-weighted score keys (quantized in their turn) on one (CI time)
@pytest.mark.parametrize("arch, select", [(a, "paper") for a in ARCHS] + [(ARCHS[0], "qkv")])
def test_fp8_with_a_margin_covering_every_tile_is_the_exact_engine(arch, select):
    model = ReAttnModel(tiny_model(arch))
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(1))
    exact, fp8 = (dataclasses.replace(s, select=select) for s in (EXACT, FP8))
    # decode "gather": one-token steps through the prefill's step (an int end: FP8); "lse": the
    # static step (a device end: exact, as a CUDA graph would run it)
    for decode in ("gather", "lse"):
        want = greedy(Engine(model, exact, N + NEW, record_selection=True, decode=decode), ids)
        got = greedy(Engine(model, fp8, N + NEW, record_selection=True, decode=decode), ids)
        assert torch.equal(got[0], want[0]), decode
        assert got[1] == want[1], decode
        assert len(got[2]) == len(want[2]) > 0
        for (layer, n, a), (layer_w, n_w, b) in zip(got[2], want[2], strict=True):
            assert (layer, n) == (layer_w, n_w) and torch.equal(a, b), (decode, layer, n)
        sampled = {stage: p.get("fp8_rows_sampled", 0) for stage, p in got[3].items()}
        assert sampled["prefill"] > 0 and "fp8_rows_sampled" not in want[3]["prefill"]
        for stage, p in got[3].items():  # every sampled row equals the exact top-k
            assert p.get("fp8_rows_equal", 0) == sampled[stage], (decode, stage)


def outlier_model(arch: str, factor: float = 30.0) -> ReAttnModel:
    """A tiny model whose keys carry one outlier channel per KV head (channel 3, ``factor`` times
    the others): the FP8 row of a query is then dominated by it and its other channels round coarsely."""
    hf = tiny_model(arch)
    for layer in hf.model.layers:
        w = layer.self_attn.k_proj.weight  # [Hkv * d, hidden]
        w.view(3, 16, -1)[:, 3].mul_(factor)
    return ReAttnModel(hf)


def test_fp8_with_a_small_margin_reports_the_agreement_it_measured():
    model = outlier_model("qwen2")
    n = 400  # middles of up to 6 tiles; topk 1 + margin 0 keeps 1
    ids = torch.randint(0, 120, (n,), generator=torch.Generator().manual_seed(1))
    scope = dataclasses.replace(EXACT, topk=1, scoring="fp8", fp8_margin=0)
    gen = Engine(model, scope, n + 4).generate(ids, 2)
    prefill = gen.profile["prefill"]
    # Sampled: the first 8 tokens of the chunks starting at 32 (the first that retrieves) and at
    # 32 + 16 * 16 = 288, every layer (2), every query head (6).
    assert prefill["fp8_rows_sampled"] == 2 * 8 * 2 * 6
    assert 0 < prefill["fp8_rows_equal"] < prefill["fp8_rows_sampled"]
    assert isinstance(prefill["fp8_rows_equal"], int)  # read off the device once, as the record keeps it
    # the same model scored exactly: nothing sampled, nothing counted; and it picks otherwise
    exact = Engine(model, dataclasses.replace(scope, scoring="exact"), n + 4, record_selection=True)
    exact.generate(ids, 2)
    assert "fp8_rows_sampled" not in exact.profile.as_dict()["prefill"]
    # The scale comes from the first chunk's keys, not the first forward's: results do not depend
    # on the slab, under FP8 too (where they differ from the exact scopes).
    scopes, scales = {}, {}
    for slab in (1, 3):
        engine = Engine(model, dataclasses.replace(scope, slab=slab), n + 4, record_selection=True)
        engine.prefill(ids)
        scopes[slab] = sorted((layer, m, s.tolist()) for layer, m, s in engine.selections)
        scales[slab] = engine.cache.k_scale.clone()
    assert torch.equal(scales[3], scales[1]) and scopes[3] == scopes[1]
    assert scopes[1] != sorted((layer, m, s.tolist()) for layer, m, s in exact.selections if m <= n)


def test_fp8_needs_an_engine_built_for_it():
    model = ReAttnModel(tiny_model("llama"))
    ids = torch.randint(0, 120, (N,), generator=torch.Generator().manual_seed(1))
    with pytest.raises(
        ConfigError, match=r"^scope.scoring='fp8' needs the FP8 keys this engine's cache"
    ) as e:
        Engine(model, EXACT, N + NEW).generate(ids, 2, scope=FP8)
    assert "\n" not in str(e.value)
    # an engine built for both serves an exact call as the exact engine does
    both = Engine(model, FP8, N + NEW, limits=ScopeLimits.of([EXACT, FP8], "cpu"))
    assert both.cache.k8 is not None
    assert both.generate(ids, 4, scope=EXACT).tokens == Engine(model, EXACT, N + NEW).generate(ids, 4).tokens
    # a batch's engine is built for plan.widest of its tasks' scopes: FP8 keys if any task scores so
    from dist_reattn.plan import widest

    wide = widest([dataclasses.replace(EXACT, topk=16), FP8], "cpu")
    assert ScopeLimits.of([wide], "cpu").fp8 and wide.topk == 16  # (valid: the margin sizes nothing)


def test_fp8_is_refused_before_the_weights_load_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    from dist_reattn.distributed import Comm
    from dist_reattn.runtime import prepare

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A100-SXM4-80GB")
    cfg = load_config(None, ["model.path=random:llama-3.1-8b", "model.device=cuda", "scope.scoring=fp8"])
    with pytest.raises(ConfigError) as e:
        prepare(cfg, 4096, Comm.single())  # (the memory plan would read the GPU's free memory)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("scope.scoring=fp8: FP8 scoring needs FP8 tensor cores"), msg
    assert "cuda:0 is NVIDIA A100-SXM4-80GB, compute capability 8.0" in msg and "--scope.scoring=exact" in msg
    # the engine refuses it too (built directly, as benchmarks do)
    model = ReAttnModel(tiny_model("llama"))
    model.device = torch.device("cuda", 0)  # only read by the check, which refuses first
    with pytest.raises(ConfigError, match="NVIDIA A100-SXM4-80GB, compute capability 8.0"):
        Engine(model, FP8, N)
