"""RULER's synthetic tasks (NVIDIA/RULER, ``scripts/synthetic.yaml``), generated and scored here.

Eleven tasks: the NIAH family (niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue,
niah_multiquery), variable tracking (vt), common words (cwe) and frequent words (fwe). Each keeps
RULER's configuration: needle and haystack kinds, numbers of keys / values / queries, vt's chains and
hops, cwe's word frequencies, fwe's Zipf exponent, the prompt templates and answer prefixes, the
tokens to generate, and the "string match all" metric. What differs from RULER:

* "essay" haystacks are our shipped Python-docs prose (``data/python_docs_prose.txt``), not Paul
  Graham's essays, cut into words and sentences the same way (whitespace words, then sentences);
* RULER draws key words and cwe words from the wonderwords lists (a download); here key words are
  pairs "word-word" and cwe words single words from the prose's own vocabulary (lower-case words of
  4-12 letters), then generated pronounceable words where a long cwe list needs more;
* QA (squad, hotpotqa) needs downloaded data sets and is left out;
* the prompt goes through the model's chat template, the answer prefix after the assistant turn's
  start (RULER's "base" template has none);
* RULER's ``max_seq_length`` counts the prompt and the tokens to generate; so does ``length`` here.
  The haystack is sized with the model's own tokenizer so that prompt + tokens to generate lands
  within 1% of ``length`` and never above it (for lengths of a few thousand tokens and up: below that,
  one haystack unit, a noise paragraph of ~24 tokens, may be more than 1%).

A sample is deterministic in (task, length, seed). The tokenizer is duck-typed (any Hugging Face
tokenizer with a chat template).
"""

from __future__ import annotations

import functools
import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

from ..config import ConfigError
from ..prompt import encode as _encode
from ..prompt import user_turn
from .niah import NOISE_TEXT, PROSE_FILE

TOLERANCE = 0.01  # prompt + tokens to generate within this fraction of the target, never above it

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"(A-Z])")
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's 40 insertion depths, percent


@dataclass(frozen=True)
class TaskSpec:
    """One RULER task's configuration, as in RULER's ``synthetic.yaml`` and ``constants.py``.

    Attributes:
        name: the task's name in RULER.
        kind: "niah", "vt", "cwe" or "fwe".
        max_new_tokens: RULER's tokens_to_generate for the kind.
        metric: "all" (string_match_all) or "part" (string_match_part).
        haystack: "noise" (RULER's five sentences), "essay" (here: Python-docs prose) or "needle"
            (distractor needles); niah and vt only.
        key_kind: needle keys: "words", "numbers" or "uuids" (niah only).
        value_kind: needle values, the same kinds (niah only).
        num_keys: needles keys written into the haystack (niah; RULER's num_needle_k).
        num_values: values per key (niah; num_needle_v).
        num_queries: keys asked about (niah; num_needle_q).
        args: the kind's other settings: vt num_chains/num_hops, cwe freq_cw/freq_ucw/num_cw, fwe alpha.
    """

    name: str
    kind: str
    max_new_tokens: int
    metric: str = "all"
    haystack: str = "noise"
    key_kind: str = "words"
    value_kind: str = "numbers"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    args: dict = field(default_factory=dict)


def _niah(name: str, haystack: str, key_kind="words", value_kind="numbers", k=1, v=1, q=1) -> TaskSpec:
    # RULER writes at least as many keys as it asks about (num_needle_k = max(k, q)).
    return TaskSpec(name, "niah", 128, "all", haystack, key_kind, value_kind, max(k, q), v, q)


TASKS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        _niah("niah_single_1", "noise"),
        _niah("niah_single_2", "essay"),
        _niah("niah_single_3", "essay", value_kind="uuids"),
        _niah("niah_multikey_1", "essay", k=4),
        _niah("niah_multikey_2", "needle"),
        _niah("niah_multikey_3", "needle", key_kind="uuids", value_kind="uuids"),
        _niah("niah_multivalue", "essay", v=4),
        _niah("niah_multiquery", "essay", q=4),
        TaskSpec("vt", "vt", 30, args={"num_chains": 1, "num_hops": 4}),
        TaskSpec("cwe", "cwe", 120, args={"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
        TaskSpec("fwe", "fwe", 50, args={"alpha": 2.0}),
    )
}
NIAH_TASKS = tuple(n for n, s in TASKS.items() if s.kind == "niah")

# Prompts: RULER's templates, {context} is the haystack. NIAH's are in the plural and made singular
# when one value is asked for, as RULER does.
NIAH_INSTRUCTION = (
    "Some special magic {kind} are hidden within the following text. "
    "Make sure to memorize it. I will quiz you about the {kind} afterwards."
)
NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
NIAH_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, "
    "{n} variables are assigned the value {value}, they are:"
)
CWE_INSTRUCTION = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
CWE_QUESTION = "Question: What are the {n} most common words in the above list?"
CWE_PREFIX = "Answer: The top {n} words that appear most often in the list are:"
FWE_INSTRUCTION = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words."
)
FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"


@dataclass
class RulerSample:
    """One RULER prompt and its expected answers.

    Attributes:
        task: the task's name (a key of TASKS).
        length: the requested length: prompt plus tokens to generate, as in RULER.
        seed: the sample seed.
        input_ids: the whole prompt: chat template with the generation prompt, plus the answer prefix.
        context: the user message's text before the question (instruction, haystack).
        question: the user message's last line.
        answer_prefix: what follows the assistant turn's start in ``input_ids``.
        answers: the strings the answer must contain.
        metric: "all" or "part", see :func:`score`.
        max_new_tokens: RULER's tokens to generate for the task.
        units: haystack units used (noise paragraphs, prose words, distractor needles, cwe words,
            fwe words): the size the length search settled on.
    """

    task: str
    length: int
    seed: int
    input_ids: list[int]
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    units: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.input_ids)


# --- scoring ------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    # RULER's post-processing: control characters dropped, then stripped.
    return re.sub(r"[\x00-\x1f]", "\n", text).strip()


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Fraction of the answers found in the prediction, case-insensitively (RULER's string_match_all)."""
    pred = _clean(prediction).lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """1.0 if any answer is found in the prediction, case-insensitively (RULER's string_match_part)."""
    pred = _clean(prediction).lower()
    return float(any(a.lower() in pred for a in answers))


METRICS: dict[str, Callable[[str, list[str]], float]] = {"all": string_match_all, "part": string_match_part}


def score(prediction: str, answers: list[str], metric: str) -> float:
    """One sample's score in [0, 1]; RULER reports the mean over samples times 100.

    Args:
        prediction: the generated text (after the answer prefix).
        answers: the expected strings.
        metric: "all" (fraction found) or "part" (any found).

    Returns:
        The score.
    """
    return METRICS[metric](prediction, answers)


# --- word sources -------------------------------------------------------------------------------


@functools.cache
def _prose() -> str:
    return resources.files("dist_reattn.tasks").joinpath("data", PROSE_FILE).read_text(encoding="utf-8")


@functools.cache
def prose_words() -> tuple[str, ...]:
    """The prose cut into whitespace words, in order (RULER cuts its essays the same way)."""
    return tuple(_prose().split())


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Lower-case words of 4-12 letters from the prose, sorted: the stand-in for wonderwords."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,12}\b", _prose()))))


def _word_pool(n: int) -> tuple[str, ...]:
    """At least ``n`` distinct words: the vocabulary, then generated consonant-vowel words."""
    return _words_up_to(1 << max(n - 1, 1).bit_length())  # few sizes cached, each a prefix of the next


@functools.cache
def _words_up_to(n: int) -> tuple[str, ...]:
    words = list(vocabulary())
    seen = set(words)
    rng = random.Random("ruler:extra-words")
    while len(words) < n:
        w = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return tuple(words)


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        vocab = vocabulary()
        return f"{rng.choice(vocab)}-{rng.choice(vocab)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle kind {kind!r}")


def _join_query(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _insert_at_depths(rng: random.Random, sentences: list[str], items: list[str]) -> str:
    """RULER's essay insertion: items at distinct depths drawn from DEPTHS, joined with spaces."""
    cuts = sorted(int(len(sentences) * d / 100) for d in rng.sample(DEPTHS, len(items)))
    parts, last = [], 0
    for cut, item in zip(cuts, items, strict=True):
        parts += [*sentences[last:cut], item]
        last = cut
    return " ".join(parts + sentences[last:])


def _essay_sentences(n_words: int) -> list[str]:
    words = prose_words()
    text = " ".join(words[i % len(words)] for i in range(n_words))
    return _SENTENCE_END.split(text.strip())


# --- the generators: (spec, rng, units) -> (context, question, answer prefix, answers) ---------------


def _niah_text(spec: TaskSpec, rng: random.Random, units: int):
    keys, values, needles = [], [], []
    for _ in range(spec.num_keys):
        key = _random_value(rng, spec.key_kind)
        while key in keys:
            key = _random_value(rng, spec.key_kind)
        keys.append(key)
        values.append([_random_value(rng, spec.value_kind) for _ in range(spec.num_values)])
        needles += [NEEDLE.format(kind=spec.value_kind, key=key, value=v) for v in values[-1]]
    rng.shuffle(needles)

    if spec.haystack == "essay":
        context = _insert_at_depths(rng, _essay_sentences(units), needles)
    else:
        if spec.haystack == "noise":
            lines = [NOISE_TEXT] * units
        else:  # distractor needles; unlike RULER, never with a key that is asked about
            lines = []
            for _ in range(units):
                key = _random_value(rng, spec.key_kind)
                while key in keys:
                    key = _random_value(rng, spec.key_kind)
                value = _random_value(rng, spec.value_kind)
                lines.append(NEEDLE.format(kind=spec.value_kind, key=key, value=value))
        for at, needle in zip(
            sorted(rng.sample(range(units), len(needles)), reverse=True), needles, strict=True
        ):
            lines.insert(at, needle)
        context = "\n".join(lines)

    asked = rng.sample(range(spec.num_keys), spec.num_queries)
    query = _join_query([keys[i] for i in asked])
    answers = [v for i in asked for v in values[i]]
    kind = spec.value_kind
    instruction, question, prefix = NIAH_INSTRUCTION, NIAH_QUESTION, NIAH_PREFIX
    if len(answers) == 1:  # RULER's singular wording
        kind = kind[:-1]
        instruction = instruction.replace("Some", "A").replace("are", "is")
        question = question.replace("are all", "is")
        prefix = prefix.replace("are", "is")
    return (
        f"{instruction.format(kind=kind)}\n{context}",
        question.format(kind=kind, query=query),
        prefix.format(kind=kind, query=query),
        answers,
    )


def _vt_chain(rng: random.Random, hops: int, letters: int, taken: set[str]) -> tuple[list[str], list[str]]:
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in taken:
            taken.add(name)
            names.append(name)
    lines = [f"VAR {names[0]} = {rng.randint(10000, 99999)}"]
    lines += [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, lines


def _vt_body(rng: random.Random, units: int, chains: int, hops: int, letters: int):
    """Noise paragraphs with ``chains`` assignment chains in order; returns (context, value, names)."""
    taken: set[str] = set()
    made = [_vt_chain(rng, hops, letters, taken) for _ in range(chains)]
    lines = [NOISE_TEXT] * units
    for _, chain in made:
        for j, at in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
            lines.insert(at + j, chain[j])
    names, chain = made[0]
    return "\n".join(lines), chain[0].split("= ")[-1], names


# RULER prepends one solved example of a short vt prompt (about 500 tokens: 3-letter names in it).
VT_EXAMPLE_UNITS = 16


def _vt_text(spec: TaskSpec, rng: random.Random, units: int):
    chains, hops = spec.args["num_chains"], spec.args["num_hops"]
    ex_context, ex_value, ex_names = _vt_body(rng, VT_EXAMPLE_UNITS, chains, hops, 3)
    example = (
        f"{VT_INSTRUCTION}\n{ex_context}\n{VT_QUESTION.format(value=ex_value)} "
        f"{VT_PREFIX.format(n=hops + 1, value=ex_value)} {' '.join(ex_names)}\n"
    )
    context, value, names = _vt_body(rng, units, chains, hops, 5)
    return (
        f"{example}\n{VT_INSTRUCTION}\n{context}",
        VT_QUESTION.format(value=value),
        VT_PREFIX.format(n=hops + 1, value=value),
        names,
    )


def _cwe_list(rng: random.Random, pool: tuple[str, ...], distinct: int, common: int, f_cw: int, f_ucw: int):
    words = rng.sample(pool, distinct)
    listed = words[:common] * f_cw + words[common:] * f_ucw
    rng.shuffle(listed)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listed)), words[:common]


def _cwe_text(spec: TaskSpec, rng: random.Random, units: int, length: int):
    n = spec.args["num_cw"]
    # RULER's settings: a solved example of 40 words (10 x10, 30 x3) and the task's frequencies, or
    # below 4K tokens an example of 20 words (x3, x1) and frequencies 6 and 1.
    if length < 4096:
        ex, main = (20, 3, 1), (units, 6, 1)
    else:
        ex, main = (40, 10, 3), (units, spec.args["freq_cw"], spec.args["freq_ucw"])
    pool = _word_pool(max(units, ex[0]))
    ex_list, ex_common = _cwe_list(rng, pool, ex[0], n, ex[1], ex[2])
    listed, common = _cwe_list(rng, pool, main[0], n, main[1], main[2])
    ex_answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_common))
    example = f"{CWE_INSTRUCTION}\n{ex_list}\n{CWE_QUESTION.format(n=n)} {CWE_PREFIX.format(n=n)} {ex_answer}"
    return f"{example}\n{CWE_INSTRUCTION}\n{listed}", CWE_QUESTION.format(n=n), CWE_PREFIX.format(n=n), common


def _zeta(alpha: float, terms: int = 100_000) -> float:
    # Riemann zeta by partial sum plus the integral of the tail (error ~ terms**-alpha).
    return sum(k**-alpha for k in range(1, terms)) + terms ** (1 - alpha) / (alpha - 1) + terms**-alpha / 2


def _fwe_text(spec: TaskSpec, rng: random.Random, units: int, length: int):
    alpha = spec.args["alpha"]
    size = max(10, (length - spec.max_new_tokens) // 50)  # RULER's vocabulary size
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    coded = sorted(vocab)
    rng.shuffle(coded)
    coded[0] = "..."  # the most frequent "word" is noise, as in RULER
    z = _zeta(alpha)
    words = [w for k, w in enumerate(coded, 1) for _ in range(int(units * k**-alpha / z))]
    rng.shuffle(words)
    return f"{FWE_INSTRUCTION} {' '.join(words)}", FWE_QUESTION, FWE_PREFIX, coded[1:4]


def _text(spec: TaskSpec, rng: random.Random, units: int, length: int):
    if spec.kind == "niah":
        return _niah_text(spec, rng, units)
    if spec.kind == "vt":
        return _vt_text(spec, rng, units)
    if spec.kind == "cwe":
        return _cwe_text(spec, rng, units, length)
    return _fwe_text(spec, rng, units, length)


def _min_units(spec: TaskSpec) -> int:
    if spec.kind == "niah":
        return spec.num_keys * spec.num_values if spec.haystack != "essay" else 1
    if spec.kind == "vt":
        return spec.args["num_hops"] + 1  # each assignment goes at a distinct noise paragraph
    if spec.kind == "cwe":
        return spec.args["num_cw"]
    return 200  # fwe: fewer words would give the 2nd-5th ranked words equal (or no) counts


# --- prompts and the length search ------------------------------------------------------------


def prompt_text(tokenizer, context: str, question: str, answer_prefix: str) -> str:
    """The whole prompt as text: chat template around ``context\\nquestion``, then the answer prefix."""
    head, tail = user_turn(tokenizer)
    return f"{head}{context}\n{question}{tail}{answer_prefix}"


def answer_tokens(tokenizer, sample: RulerSample) -> list[int]:
    """Indices into ``sample.input_ids`` of the tokens that spell the answers in the context.

    Every occurrence of every answer string in the context counts (vt's variable names recur along
    the chain). Needs a fast tokenizer (offsets); raises ValueError when its ids differ from the
    sample's or when no answer occurs in the context.
    """
    head, _ = user_turn(tokenizer)
    text = prompt_text(tokenizer, sample.context, sample.question, sample.answer_prefix)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if list(enc["input_ids"]) != sample.input_ids:
        raise ValueError("the tokenizer's offsets encoding differs from the sample's input_ids")
    spans = [
        (len(head) + m.start(), len(head) + m.end())
        for a in sample.answers
        for m in re.finditer(re.escape(a), sample.context)
    ]
    offsets = enc["offset_mapping"]
    found = [i for i, (c0, c1) in enumerate(offsets) if any(c0 < end and start < c1 for start, end in spans)]
    if not found:
        raise ValueError(f"no answer of the {sample.task} sample occurs in its context")
    return found


def check_task(name: str) -> TaskSpec:
    """The task's spec; raises ValueError naming the known tasks."""
    if name not in TASKS:
        raise ValueError(f"unknown RULER task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def parse_tasks(raw: str) -> list[str]:
    """Task names from a --tasks flag: RULER names, "niah" (the NIAH family) and "all", each once."""
    names: list[str] = []
    for item in (x.strip() for x in raw.split(",")):
        group = {"niah": list(NIAH_TASKS), "all": list(TASKS)}.get(item, [item])
        for name in group:
            if name not in TASKS:
                raise ConfigError(
                    f"--tasks {item!r} is not a RULER task: give niah, all, or {', '.join(TASKS)}"
                )
            if name not in names:
                names.append(name)
    return names


def min_length(tokenizer, task: str, length: int = 4096) -> int:
    """The shortest ``length`` :func:`build_sample` accepts for ``task``: its smallest haystack.

    cwe's settings change below 4K tokens (as in RULER), so its minimum depends on the ``length``
    asked for; the other tasks' does not.
    """
    spec = check_task(task)
    units = _min_units(spec)
    rng = random.Random("ruler:min")
    parts = _text(spec, rng, units, length)
    return len(_encode(tokenizer, prompt_text(tokenizer, *parts[:3]))) + spec.max_new_tokens


def build_sample(tokenizer, task: str, length: int, seed: int) -> RulerSample:
    """Build one RULER sample whose prompt plus tokens to generate is within 1% of ``length``.

    The haystack's size in units is searched with the model's own tokenizer: each try renders the
    whole prompt and counts its tokens; the next size is interpolated from the tokens per unit seen
    so far (bisection when that stalls), keeping the largest that fits.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        task: a key of TASKS.
        length: the target length in tokens, prompt plus ``max_new_tokens``, as in RULER.
        seed: sample seed; with (task, length) it fixes the sample.

    Returns:
        The sample; ``prompt_tokens + max_new_tokens <= length``.

    Raises:
        ValueError: unknown task, or ``length`` below :func:`min_length`.
    """
    spec = check_task(task)
    budget = length - spec.max_new_tokens
    slack = max(1, int(TOLERANCE * length))

    def render(units: int):
        parts = _text(spec, random.Random(f"ruler:{task}:{length}:{seed}"), units, length)
        return parts, _encode(tokenizer, prompt_text(tokenizer, *parts[:3]))

    lo = _min_units(spec)
    parts, ids = render(lo)
    if len(ids) > budget:
        raise ValueError(
            f"RULER {task} length {length} is too short: its smallest prompt takes "
            f"{len(ids)} + {spec.max_new_tokens} tokens to generate"
        )
    base, best = len(ids), (lo, parts, ids)
    hi = None  # smallest size known to be too long
    units = lo
    while budget - len(best[2]) > slack:
        rate = max((len(ids) - base) / (units - lo), 1e-3) if units > lo else 8.0
        guess = lo + int((budget - slack / 2 - base) / rate)
        top = hi if hi is not None else max(2 * best[0], guess + 1)
        if not best[0] < guess < top:
            guess = (best[0] + top) // 2
        if guess <= best[0]:
            break  # adjacent sizes straddle the window: one unit is more than the slack
        units = guess
        parts, ids = render(units)
        if len(ids) <= budget:
            best = (units, parts, ids)
        else:
            hi = units
    units, parts, ids = best
    context, question, prefix, answers = parts
    return RulerSample(
        task=task,
        length=length,
        seed=seed,
        input_ids=ids,
        context=context,
        question=question,
        answer_prefix=prefix,
        answers=list(answers),
        metric=spec.metric,
        max_new_tokens=spec.max_new_tokens,
        units=units,
    )
