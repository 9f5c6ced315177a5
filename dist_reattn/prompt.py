"""Chat templating and tokenizing, in one place: the Python API, NIAH, RULER and batch prompts.

Long documents are never tokenized inside the template: :func:`user_turn` renders the template once
around a marker and returns the text before and after the user message, so a caller tokenizes its
document on its own and joins token lists. The tokenizer is duck-typed (any Hugging Face tokenizer):
``encode(text, add_special_tokens=False)`` and
``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``.
"""

from __future__ import annotations

import functools

_MARKER = "<<DIST-REATTN-USER>>"


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, no special tokens added."""
    # verbose=False: a document longer than the tokenizer's model_max_length is the point here.
    return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))


@functools.cache
def user_turn(tokenizer) -> tuple[str, str]:
    """The chat template's text before and after one user message's content, generation prompt included."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARKER}], tokenize=False, add_generation_prompt=True
    )
    if text.count(_MARKER) != 1:
        raise ValueError("the chat template must render the user message verbatim, exactly once")
    head, tail = text.split(_MARKER)
    return head, tail


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The token ids of a prompt given as a string (one user message), a list of chat messages
    (``[{"role": "user", "content": "..."}, ...]``), or token ids (used as they are).

    A string or messages get the chat template and the generation prompt.
    """
    if isinstance(prompt, str):
        head, tail = user_turn(tokenizer)
        return encode(tokenizer, head) + encode(tokenizer, prompt) + encode(tokenizer, tail)
    prompt = list(prompt.tolist() if hasattr(prompt, "tolist") else prompt)
    if prompt and all(isinstance(m, dict) for m in prompt):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return encode(tokenizer, text)
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt) and prompt:
        return prompt
    raise TypeError("prompt must be a string, a list of chat messages (dicts) or a list of token ids")
