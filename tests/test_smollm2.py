"""The real bundled model (SmolLM2-135M-Instruct, GGUF): equivalence with HF and retrieval at work."""

from __future__ import annotations

import copy

import pytest
import torch

from dist_reattn.config import ScopeConfig
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel
from dist_reattn.models.load import load_model, load_tokenizer, resolve
from dist_reattn.tasks.niah import build_sample, is_correct

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    src = resolve("smollm2-135m")
    hf = load_model(src, torch.float32, torch.device("cpu"))
    return hf, ReAttnModel(copy.deepcopy(hf)), load_tokenizer(src)


def test_full_mode_matches_hf_logits_and_tokens(smollm2):
    hf, ours, tok = smollm2
    ids = torch.tensor(build_sample(tok, 700, 0.5, seed=3).input_ids)
    ref_logits = hf(ids[None]).logits[0, -1]
    ref_tokens = hf.generate(ids[None], max_new_tokens=8, do_sample=False)[0, ids.numel() :].tolist()
    engine = Engine(ours, ScopeConfig(mode="full", chunk=256, local=256), capacity=800)
    # fp32 over 30 layers, summation order differs (chunked vs one call): logits of magnitude ~10-30
    # agree to ~1e-4; 2e-3 leaves margin without hiding a real bug (a wrong position is ~1).
    torch.testing.assert_close(engine.prefill(ids), ref_logits, atol=2e-3, rtol=0)
    assert engine.generate(ids, 8).tokens == ref_tokens


def test_retrieval_finds_a_needle_outside_the_local_window(smollm2):
    # A small scope (sink 8 + local 512) on a 3K prompt: the needle is far outside the local window.
    # Streaming cannot see it; ReAttention must retrieve it.
    _, ours, tok = smollm2
    small = dict(sink=8, local=512, chunk=256, topk=4, span=32, recall_clip=32)
    engine = Engine(ours, ScopeConfig(mode="reattention", **small), capacity=3100, record_selection=True)
    found = 0
    for seed, depth in ((1, 0.2), (2, 0.5)):
        sample = build_sample(tok, 3000, depth, seed=seed)
        answer = tok.decode(engine.generate(sample.input_ids, 12).tokens, skip_special_tokens=True)
        found += is_correct(answer, sample)
        last = engine.selections[-1][2]
        assert last.numel() <= 8 + 32 * 32 + 512
    assert found == 2
    sample = build_sample(tok, 3000, 0.5, seed=2)
    streaming = ScopeConfig(mode="streaming", **small)  # the same engine, another scope for this call
    answer = tok.decode(
        engine.generate(sample.input_ids, 12, scope=streaming).tokens, skip_special_tokens=True
    )
    assert not is_correct(answer, sample), "streaming should not see a needle outside sink + local"
