"""Needle-in-a-haystack (NIAH) samples and their scoring.

A sample is one chat prompt of an exact token length: an instruction, a haystack of filler sentences
with one needle sentence ("The special magic number is: 1234567.") at a chosen depth, the question,
and the start of the assistant's answer, so the model only has to say the number.

The prompt is assembled from token lists, never by tokenizing the whole context: each filler sentence
is tokenized once with its leading separator (" " or "\n"), which the tokenizer's pre-tokenizer keeps
with the following word, so the concatenated lists are the tokens of the concatenated text. That keeps
a 4M-token sample to a few seconds of list work.

The tokenizer is duck-typed (any Hugging Face tokenizer): `encode(text, add_special_tokens=False)`,
`__call__(list_of_texts, add_special_tokens=False)["input_ids"]` and
`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import random
import re
from dataclasses import dataclass
from importlib import resources

from ..prompt import encode as _encode
from ..prompt import user_turn

HAYSTACKS = ("noise", "prose")

# RULER's "noise" haystack: the same five sentences over and over.
NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PROSE_FILE = "python_docs_prose.txt"  # in tasks/data/; see the README there for source and license

INSTRUCTION = (
    "A special magic number is hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the number afterwards."
)
QUESTION = "What is the special magic number mentioned in the provided text?"
ANSWER_PREFIX = "The special magic number mentioned in the provided text is"
NEEDLE_TEMPLATE = "The special magic number is: {}."

# The prompt may fall short of the requested length by less than one filler sentence.
MAX_SHORTFALL = 8

_PROBE_NEEDLE = "7777777"  # a stand-in of the needle's shape, for length accounting
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"(A-Z])")


@dataclass
class NiahSample:
    """One NIAH prompt and what it hides.

    Attributes:
        input_ids: the whole prompt: chat template with the generation prompt, plus the answer prefix.
        needle: the hidden 7-digit number as a string (first digit non-zero).
        depth: the requested depth of the needle in the haystack, in [0, 1].
        needle_token: index in `input_ids` of the first token of the needle sentence.
        length: len(input_ids).
    """

    input_ids: list[int]
    needle: str
    depth: float
    needle_token: int
    length: int


def _prompt_ids(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids before and after the context: (template + instruction, question + answer prefix)."""
    head, tail = user_turn(tokenizer)
    return _encode(tokenizer, f"{head}{INSTRUCTION}\n"), _encode(
        tokenizer, f"\n{QUESTION}{tail}{ANSWER_PREFIX}"
    )


@functools.cache
def _filler_sentences(haystack: str) -> tuple[str, ...]:
    """The haystack's sentences in order, each with its leading separator: "\\n" opens a paragraph."""
    if haystack == "noise":
        return tuple(" " + s for s in _SENTENCE_END.split(NOISE_TEXT))
    text = resources.files("dist_reattn.tasks").joinpath("data", PROSE_FILE).read_text(encoding="utf-8")
    sentences = []
    for paragraph in text.splitlines():
        for i, sentence in enumerate(_SENTENCE_END.split(paragraph.strip())):
            sentences.append(("\n" if i == 0 else " ") + sentence)
    return tuple(sentences)


def _check_haystack(haystack: str) -> None:
    if haystack not in HAYSTACKS:
        raise ValueError(f"unknown haystack {haystack!r}; expected one of {HAYSTACKS}")


def _needle_ids(tokenizer, needle: str) -> tuple[list[int], list[int]]:
    """The needle sentence inside the haystack (" The ...") and as its first sentence ("The ...")."""
    sentence = NEEDLE_TEMPLATE.format(needle)
    return _encode(tokenizer, " " + sentence), _encode(tokenizer, sentence)


def _min_length(head: list[int], tail: list[int], needle: list[int], needle_first: list[int]) -> int:
    return len(head) + len(tail) + max(len(needle), len(needle_first))


def min_length(tokenizer, haystack: str = "noise") -> int:
    """The shortest prompt `build_sample` accepts: template, needle and question with no haystack.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        haystack: one of HAYSTACKS (the minimum does not depend on it; checked for symmetry).

    Returns:
        The minimum `length`, in tokens.
    """
    _check_haystack(haystack)
    head, tail = _prompt_ids(tokenizer)
    return _min_length(head, tail, *_needle_ids(tokenizer, _PROBE_NEEDLE))


def _fill(lengths: list[int], start: int, budget: int) -> list[int]:
    """Sentence indices, cycling through the haystack from `start`, whose lengths sum to <= budget.

    Whole sentences in order while they fit, then the first later sentences that still fit the last
    few tokens, so the sum falls short of the budget by less than the shortest sentence.
    """
    n = len(lengths)
    rotated = list(range(start, n)) + list(range(start))
    cycle = sum(lengths)
    order = rotated * (budget // cycle)
    left = budget - cycle * (budget // cycle)
    pos = 0
    while pos < n and lengths[rotated[pos]] <= left:
        left -= lengths[rotated[pos]]
        order.append(rotated[pos])
        pos += 1
    for i in rotated[pos + 1 :] + rotated[:pos]:
        if left == 0:
            break
        if lengths[i] <= left:
            left -= lengths[i]
            order.append(i)
    return order


def build_sample(tokenizer, length: int, depth: float, seed: int, haystack: str = "noise") -> NiahSample:
    """Build one NIAH prompt of `length` tokens with the needle at `depth` of the haystack.

    Deterministic in (length, depth, seed, haystack): they seed the needle and, for "prose", where in
    the text the haystack starts.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        length: prompt length in tokens; the prompt has exactly this many, or up to MAX_SHORTFALL fewer
            where whole sentences cannot fill the last tokens.
        depth: where the needle goes, as a fraction of the haystack: 0 = first sentence, 1 = last. It
            is placed at the sentence boundary nearest to that fraction of the haystack's tokens.
        seed: sample seed; different seeds give different needles.
        haystack: "noise" (RULER's repeated sentences) or "prose" (the Python language reference).

    Returns:
        The sample.

    Raises:
        ValueError: unknown haystack, depth outside [0, 1], or `length` below `min_length`.
    """
    _check_haystack(haystack)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"NIAH depth must be in [0, 1], got {depth}")
    rng = random.Random(f"niah:{haystack}:{length}:{depth!r}:{seed}")
    needle = str(rng.randint(1_000_000, 9_999_999))

    head, tail = _prompt_ids(tokenizer)
    needle_ids, needle_first = _needle_ids(tokenizer, needle)
    minimum = _min_length(head, tail, needle_ids, needle_first)
    if length < minimum:
        raise ValueError(
            f"NIAH length {length} is too short: template, needle and question alone take {minimum} tokens"
        )

    sentences = _filler_sentences(haystack)
    sentence_ids = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in sentence_ids]
    start = 0 if haystack == "noise" else rng.randrange(len(sentences))
    # The context's first sentence follows the instruction's newline, so it loses its leading
    # separator, which may change its token count: reserve for the worst case.
    stripped = tokenizer([s.lstrip() for s in sentences], add_special_tokens=False)["input_ids"]
    growth = max(
        len(a) - len(b) for a, b in zip([needle_first, *stripped], [needle_ids, *sentence_ids], strict=True)
    )
    budget = max(0, length - len(head) - len(tail) - len(needle_ids) - max(0, growth))
    order = _fill(lengths, start, budget)

    # Boundary b sits before order[b]; take the one nearest to depth * (haystack tokens).
    offsets = [0, *itertools.accumulate(lengths[i] for i in order)]
    target = depth * offsets[-1]
    b = bisect.bisect_left(offsets, target)
    if b > 0 and target - offsets[b - 1] <= offsets[b] - target:
        b -= 1

    pieces = [sentence_ids[i] for i in order[:b]] + [needle_ids] + [sentence_ids[i] for i in order[b:]]
    if b == 0:
        pieces[0] = needle_first
        needle_token = len(head)
    else:
        pieces[0] = stripped[order[0]]
        needle_token = len(head) + offsets[b] + len(pieces[0]) - lengths[order[0]]
    input_ids = head + list(itertools.chain.from_iterable(pieces)) + tail
    return NiahSample(
        input_ids=input_ids, needle=needle, depth=depth, needle_token=needle_token, length=len(input_ids)
    )


def is_correct(answer: str, sample: NiahSample) -> bool:
    """Whether the generated answer states the needle: the 7-digit number, not as part of a longer one.

    Thousands separators ("1,234,567") are accepted.

    Args:
        answer: the generated text (after the prompt's answer prefix).
        sample: the sample it answers.

    Returns:
        True if the needle number appears in `answer`.
    """
    plain = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)
    return re.search(rf"(?<!\d){re.escape(sample.needle)}(?!\d)", plain) is not None
