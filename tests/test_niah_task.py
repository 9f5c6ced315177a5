"""NIAH sample construction and scoring, with the real SmolLM2 tokenizer (no model weights run)."""

import time

import pytest

from dist_reattn.tasks.niah import (
    HAYSTACKS,
    INSTRUCTION,
    MAX_SHORTFALL,
    QUESTION,
    NiahSample,
    build_sample,
    is_correct,
    min_length,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _needle_sentence(sample: NiahSample) -> str:
    return f"The special magic number is: {sample.needle}."


def _context(tokenizer, sample: NiahSample) -> str:
    """The haystack text between the instruction and the question."""
    text = tokenizer.decode(sample.input_ids)
    start = text.index(INSTRUCTION) + len(INSTRUCTION) + 1  # the newline after the instruction
    return text[start : text.index(QUESTION) - 1]


@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("length", [1024, 2048, 4096, 16 * 1024, 64 * 1024])
def test_length_needle_and_depth(tokenizer, haystack, length):
    for depth in (0.0, 0.3, 0.5, 1.0):
        sample = build_sample(tokenizer, length, depth, seed=7, haystack=haystack)
        assert sample.length == len(sample.input_ids)
        assert length - MAX_SHORTFALL <= sample.length <= length
        assert sample.depth == depth
        assert len(sample.needle) == 7 and sample.needle.isdigit() and sample.needle[0] != "0"

        # needle_token points at the needle sentence, which occurs exactly once.
        n = len(tokenizer.encode(" " + _needle_sentence(sample), add_special_tokens=False))
        at = tokenizer.decode(sample.input_ids[sample.needle_token : sample.needle_token + n])
        assert at.strip() == _needle_sentence(sample)
        context = _context(tokenizer, sample)
        assert context.count(sample.needle) == 1
        assert context.count("special magic number") == 1

        # Depth, measured in characters of the haystack: off by at most about one sentence (the
        # longest prose sentence is ~1500 characters).
        sentence = _needle_sentence(sample)
        where = context.index(sentence) / (len(context) - len(sentence))
        slack = 0.02 + (1600 if haystack == "prose" else 40) / len(context)
        assert abs(where - depth) <= slack, (where, depth)
        if depth == 0.0:
            assert context.startswith(sentence)
        if depth == 1.0:
            assert context.endswith(sentence)


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_ids_are_the_tokens_of_their_text(tokenizer, haystack):
    # Assembled from per-sentence token lists, the prompt must still be what tokenizing its text gives.
    sample = build_sample(tokenizer, 4096, 0.4, seed=3, haystack=haystack)
    text = tokenizer.decode(sample.input_ids)
    assert tokenizer.encode(text, add_special_tokens=False) == sample.input_ids
    assert text.startswith("<|im_start|>")
    assert text.endswith("<|im_start|>assistant\nThe special magic number mentioned in the provided text is")


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_deterministic_and_seeded(tokenizer, haystack):
    a = build_sample(tokenizer, 3000, 0.5, seed=1, haystack=haystack)
    b = build_sample(tokenizer, 3000, 0.5, seed=1, haystack=haystack)
    assert a == b
    needles = {build_sample(tokenizer, 3000, 0.5, seed=s, haystack=haystack).needle for s in range(6)}
    assert len(needles) == 6


def test_haystacks_differ(tokenizer):
    noise = _context(tokenizer, build_sample(tokenizer, 2048, 0.5, seed=0, haystack="noise"))
    prose = _context(tokenizer, build_sample(tokenizer, 2048, 0.5, seed=0, haystack="prose"))
    assert noise.startswith("The grass is green. The sky is blue.")
    assert "The grass is green" not in prose
    assert "Python" in prose or "object" in prose


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_too_short_raises(tokenizer, haystack):
    minimum = min_length(tokenizer, haystack)
    assert 50 < minimum < 200
    with pytest.raises(ValueError, match=f"too short.*{minimum}"):
        build_sample(tokenizer, minimum - 1, 0.5, seed=0, haystack=haystack)
    sample = build_sample(tokenizer, minimum, 0.5, seed=0, haystack=haystack)
    assert sample.length == minimum
    assert tokenizer.decode(sample.input_ids).count(sample.needle) == 1


def test_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="haystack"):
        build_sample(tokenizer, 1024, 0.5, seed=0, haystack="lorem")
    with pytest.raises(ValueError, match="depth"):
        build_sample(tokenizer, 1024, 1.5, seed=0)


@pytest.mark.parametrize("haystack", HAYSTACKS)
def test_one_million_tokens_is_quick(tokenizer, haystack):
    t0 = time.perf_counter()
    sample = build_sample(tokenizer, 1024 * 1024, 0.25, seed=0, haystack=haystack)
    elapsed = time.perf_counter() - t0
    assert 1024 * 1024 - MAX_SHORTFALL <= sample.length <= 1024 * 1024
    assert abs(sample.needle_token / sample.length - 0.25) < 0.01
    assert elapsed < 15, f"build_sample took {elapsed:.1f} s at 1M tokens"


def test_is_correct():
    sample = NiahSample(input_ids=[], needle="4820193", depth=0.5, needle_token=0, length=0)
    assert is_correct(" 4820193.", sample)
    assert is_correct(' "4820193". It is a', sample)
    assert is_correct("The number is 4,820,193", sample)
    assert not is_correct(" 4820194.", sample)
    assert not is_correct(" 482019", sample)
    assert not is_correct(" 48201935", sample)  # a longer number is a different number
    assert not is_correct("", sample)
