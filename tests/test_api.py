"""dist_reattn.load and generate on a tiny random Llama with the real SmolLM2 tokenizer: the three
prompt forms, the scope per call and its limits, the capacity per prompt or fixed. The example of
the README's "Use from Python" runs from the installed wheel in tests/test_packaging.py."""

from __future__ import annotations

import pytest
import torch

import dist_reattn
from dist_reattn.config import ConfigError, ScopeConfig
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel
from dist_reattn.models.load import load_model, resolve

SCOPE = {"sink": 4, "local": 128, "chunk": 64, "topk": 2, "span": 4, "recall_clip": 8}
DOC = " ".join(f"lamp-{i % 97} river-{i % 89}" for i in range(150))  # ~900 tokens: past sink + local


@pytest.fixture(scope="module")
def llm(model_dir):
    return dist_reattn.load(str(model_dir), scope=SCOPE, device="cpu")


def test_a_string_is_one_templated_user_message_and_equals_the_engine(llm, model_dir):
    text = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": DOC}], tokenize=False, add_generation_prompt=True
    )
    ids = llm.tokenizer.encode(text, add_special_tokens=False)  # the whole text at once
    out = llm.generate(DOC, max_new_tokens=4)
    assert out.prompt_tokens == len(ids) > 4 + 128 and len(out.tokens) <= 4
    assert out.text == llm.tokenizer.decode(out.tokens, skip_special_tokens=True)
    assert out.prefill_seconds > 0 and out.prefill_tok_s > 0 and "prefill" in out.profile
    assert llm.generate([{"role": "user", "content": DOC}], max_new_tokens=4).tokens == out.tokens
    assert llm.generate(ids, max_new_tokens=4).tokens == out.tokens
    model = ReAttnModel(load_model(resolve(str(model_dir)), torch.float32, torch.device("cpu")))
    assert Engine(model, ScopeConfig(**SCOPE), 2000).generate(ids, 4).tokens == out.tokens


def test_scope_per_call_within_the_limits_and_refused_beyond(llm):
    assert llm.generate(DOC, 4, scope={"mode": "streaming"}).scope.mode == "streaming"
    assert llm.config.scope.mode == "reattention"  # the call changed nothing in the object
    assert llm.generate(DOC, 4).scope == ScopeConfig(**SCOPE)
    with pytest.raises(ConfigError, match=r"^scope.local=256 is above this engine's limit local=128"):
        llm.generate(DOC, 4, scope={"local": 256})
    with pytest.raises(ConfigError, match="unknown field"):
        llm.generate(DOC, 4, scope={"locale": 64})
    # A prompt past the window (8192) with a scope that cannot fit it: refused before any cache.
    with pytest.raises(
        ConfigError, match=r"= 4 \+ 8 \* 1100 \+ 128 = 8932 positions, beyond the model's trained"
    ):
        llm.generate([1] * 8200, 4, scope={"span": 1100})
    assert llm.capacity < 8200


def test_capacity_grows_with_the_prompt_unless_given(model_dir):
    llm = dist_reattn.load(str(model_dir), scope=SCOPE, device="cpu")
    assert llm.capacity == 0  # nothing allocated before the first prompt
    small = llm.generate("Hi", max_new_tokens=2)
    assert llm.capacity == small.prompt_tokens + 2
    llm.generate("Hi", max_new_tokens=1)  # fits: the same cache
    assert llm.capacity == small.prompt_tokens + 2
    big = llm.generate(DOC, max_new_tokens=2)
    assert llm.capacity == big.prompt_tokens + 2
    fixed = dist_reattn.load(str(model_dir), capacity=64, scope=SCOPE, device="cpu")
    with pytest.raises(ConfigError, match=r"need \d+ tokens, above capacity=64 given to load\(\)"):
        fixed.generate(DOC, max_new_tokens=2)
    with pytest.raises(ConfigError, match="capacity=0 must be a positive"):
        dist_reattn.load(str(model_dir), capacity=0)
