from __future__ import annotations

import pytest

from dist_reattn.config import ConfigError, format_count, load_config, parse_count


@pytest.mark.parametrize("text,n", [("16K", 16384), ("1M", 1 << 20), ("4m", 4 << 20), ("20000", 20000)])
def test_parse_count(text, n):
    assert parse_count(text) == n
    assert parse_count(format_count(n)) == n


@pytest.mark.parametrize("text", ["4Q", "-1", "0", "", "1.5K", "K"])
def test_parse_count_rejects(text):
    with pytest.raises(ConfigError, match="not a positive token count"):
        parse_count(text)


def test_presets_and_overrides():
    cfg = load_config("smollm2-135m", ["--scope.topk=8", "scope.local=2K", "model.dtype=bf16"])
    assert (cfg.scope.topk, cfg.scope.local, cfg.scope.recall_clip, cfg.model.dtype) == (8, 2048, 127, "bf16")
    for name in ("llama-3.1-8b", "llama-3.2-3b", "qwen2.5-7b", "qwen2.5-1.5b", "mistral-7b-v0.3"):
        cfg = load_config(name)
        assert (cfg.scope.local, cfg.scope.recall_clip, cfg.scope.sink, cfg.scope.chunk) == (
            8192,
            256,
            32,
            512,
        )


@pytest.mark.parametrize(
    "override,message",
    [
        ("scope.chunk=0", "chunk=0 must be > 0"),
        ("scope.topk=-1", "topk=-1 must be >= 0"),
        ("scope.mode=dense", "not one of"),
        ("scope.local=100", "must be >= scope.chunk"),
        ("scope.nope=1", "unknown field"),
        ("nosuch.x=1", "unknown config section"),
        ("scope.topk", "needs a value"),
        ("model.dtype=fp8", "use auto, bf16"),
        ("scope.scoring=int8", r"scope.scoring='int8' is not one of exact, fp8"),
        ("scope.fp8_margin=-1", "fp8_margin=-1 must be >= 0"),
        (
            "scope.scoring=fp8 --scope.fp8_margin=13",
            r"topk=4 \+ scope.fp8_margin=13 is above .* 16 tiles per "
            r"row: use --scope.fp8_margin <= 12 \(or --scope.scoring=exact\)",
        ),
        ("scope.scoring=fp8 --scope.topk=20", r"use --scope.topk <= 16"),
        ("scope.distinct=true", r"it needs --scope.select=mass or mass_shared, not 'paper'"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, override.split(" "))
    assert "\n" not in str(e.value)


def test_fp8_margin_is_checked_only_under_fp8():
    assert load_config(None, ["scope.fp8_margin=30"]).scope.scoring == "exact"
    assert (
        load_config(None, ["scope.scoring=fp8", "scope.topk=4", "scope.fp8_margin=12"]).scope.fp8_margin == 12
    )


def test_unknown_preset():
    with pytest.raises(ConfigError, match="presets: .*smollm2-135m"):
        load_config("gpt-9")


def test_a_scope_that_outgrows_the_trained_window_is_refused():
    """The scope's tokens take positions 0, 1, ...: its widest (sink + recall_clip * span + local;
    sink + local where nothing is retrieved) must fit the window, unless the whole context does."""
    from dist_reattn.config import ScopeConfig

    paper = ScopeConfig()  # 32 + 127 * 32 + 4096 = 8192: SmolLM2's window exactly
    paper.check_window(8192, 10**6)
    ScopeConfig(span=64, recall_clip=63, distinct=True, select="mass_shared").check_window(8192, 10**6)
    wide = ScopeConfig(span=64)  # 32 + 127 * 64 + 4096 = 12256
    with pytest.raises(ConfigError, match=r"= 32 \+ 127 \* 64 \+ 4096 = 12256 positions, beyond the model's "
                       r"trained window of 8192: lower --scope.recall_clip, --scope.span or --scope.local"):  # fmt: skip
        wide.check_window(8192, 8193)
    wide.check_window(8192, 8192)  # a context inside the window: every position is in it anyway
    ScopeConfig(span=64, topk=0).check_window(8192, 10**6)  # nothing retrieved: sink + local
    with pytest.raises(
        ConfigError, match=r"scope.sink \+ scope.local = 32 \+ 9000 = 9032 .*lower --scope.local"
    ):
        ScopeConfig(mode="streaming", local=9000).check_window(8192, 10**6)
    ScopeConfig(mode="full").check_window(8192, 10**6)  # the baseline attends at the tokens' own positions
