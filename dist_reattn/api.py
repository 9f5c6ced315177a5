"""The way in from Python: :func:`load` a model once, then :meth:`ReAttention.generate` per prompt.

    import dist_reattn

    llm = dist_reattn.load("smollm2-135m", scope={"local": 1024})
    print(llm.generate("Who wrote Hamlet?", max_new_tokens=16).text)

The same code runs in one process and under ``torchrun``: every rank calls :func:`load` and
``generate`` with the same arguments, and every rank gets the same result.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
from dataclasses import dataclass

import torch

from .config import Config, ConfigError, ScopeConfig, apply_dict, config_for_model
from .distributed import init_from_env, shutdown
from .engine import Engine
from .models.load import load_tokenizer
from .plan import check_memory, plan_for_scope
from .prompt import prompt_ids
from .runtime import load_adapted, new_engine, prepare


@dataclass(frozen=True)
class Result:
    """One generated answer, the same on every rank."""

    text: str
    """The generated tokens as text, special tokens skipped."""
    tokens: list[int]
    """Generated token ids (EOS included when reached)."""
    prompt_tokens: int
    """Tokens of the prompt, chat template included."""
    prefill_seconds: float
    decode_seconds: float
    """Steady-state decode: the first step (kernels compile there) and graph capture excluded."""
    prefill_tok_s: float
    decode_tok_s: float
    """Steady-state decode tokens per second (0 with fewer than two new tokens)."""
    profile: dict
    """Per-stage, per-phase seconds and counters (:meth:`dist_reattn.profile.Profile.as_dict`)."""
    scope: ScopeConfig
    """The scope this answer was read with."""


class ReAttention:
    """A loaded model and its engine; build it with :func:`load`.

    Attributes:
        config: the validated configuration it was built with (its scope is the default of each call).
        tokenizer: the model's Hugging Face tokenizer.
        world, rank: the ranks of the job (1, 0 in one process).
    """

    def __init__(self, cfg: Config, capacity: int | None):
        self.config, self._fixed = cfg, capacity
        self._comm = init_from_env(cfg.dist.timeout_s, cfg.dist.backend)
        self.world, self.rank = self._comm.world, self._comm.rank
        try:
            # Before any weight loads: the model, and what it needs (capacity, or one token for now).
            self._prep = _agreed(self._comm, lambda: prepare(cfg, capacity or 1, self._comm))
            self.tokenizer = load_tokenizer(self._prep.source)
            self._model = load_adapted(cfg, self._prep, self._comm)
            self._engine: Engine | None = None
            if capacity is not None:
                self._engine = new_engine(cfg, self._model, capacity, self._comm)
        except BaseException:
            self.close()
            raise

    @property
    def capacity(self) -> int:
        """Tokens (prompt + new) the cache holds now; 0 before the first call when sized per prompt."""
        return 0 if self._engine is None else self._engine.capacity

    def generate(self, prompt, max_new_tokens: int = 64, scope: ScopeConfig | dict | None = None) -> Result:
        """Greedy generation: a chunked prefill of the prompt, then up to ``max_new_tokens`` tokens.

        Args:
            prompt: a string (one user message: the chat template is applied), a list of chat
                messages (``[{"role": "user", "content": ...}]``) or token ids (used as they are).
            max_new_tokens: at most this many new tokens; stops earlier at EOS.
            scope: this call's scope: a ``ScopeConfig``, or a dict of fields changed from the
                configured one (``{"mode": "streaming"}``). It must lie within the limits the model
                was loaded with (sink, local, chunk, slab) and, where the prompt and new tokens are
                longer than the model's trained window, fit inside it: else a ConfigError.

        Returns:
            The answer, its timings and its per-phase profile; the same on every rank.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
        ids = prompt_ids(self.tokenizer, prompt)
        scope = self._scope(scope)
        scope.check_window(self._prep.spec.window, len(ids) + max_new_tokens)
        engine = self._engine_for(len(ids) + max_new_tokens)
        with torch.no_grad():
            gen = engine.generate(ids, max_new_tokens, scope=scope)
        return Result(
            self.tokenizer.decode(gen.tokens, skip_special_tokens=True),
            gen.tokens,
            gen.prompt_tokens,
            gen.prefill_seconds,
            gen.decode_seconds,
            gen.prefill_tok_s,
            gen.decode_tokens / gen.decode_seconds if gen.decode_seconds > 0 else 0.0,
            gen.profile,
            scope,
        )

    def _scope(self, scope: ScopeConfig | dict | None) -> ScopeConfig:
        if scope is None or isinstance(scope, ScopeConfig):
            return scope or self.config.scope
        if not isinstance(scope, dict):
            raise ConfigError(
                f"scope={scope!r}: give a ScopeConfig or a dict such as {{'mode': 'streaming'}}"
            )
        cfg = Config(scope=self.config.scope)
        apply_dict(cfg, {"scope": scope}, "scope")
        return cfg.scope

    def _engine_for(self, need: int) -> Engine:
        """The engine, its cache grown to ``need`` tokens when the capacity was left to the prompts."""
        if self._engine is not None and need <= self._engine.capacity:
            return self._engine
        if self._fixed is not None:
            raise ConfigError(
                f"the prompt and max_new_tokens need {need} tokens, above capacity={self._fixed} given to "
                "load(): load with a larger capacity, or capacity=None to size the cache per prompt"
            )
        self._engine = None  # the old cache goes before the new one is planned and allocated
        gc.collect()
        if self._prep.device.type == "cuda":
            torch.cuda.empty_cache()
        cfg, p = self.config, self._prep

        def check() -> None:  # the weights are loaded already: the plan counts the cache and activations
            plan = plan_for_scope(p.spec, cfg.scope, need, p.dtype, p.device, self.world, cfg.cache.page)
            check_memory(dataclasses.replace(plan, weight_bytes=0), need, self.world)

        _agreed(self._comm, check)
        self._engine = new_engine(cfg, self._model, need, self._comm)
        return self._engine

    def close(self) -> None:
        """Leaves the process group that :func:`load` joined (under torchrun), destroying it only if
        :func:`load` created it (a group the caller initialized stays); idempotent."""
        self._engine = None
        if getattr(self, "_comm", None) is not None and self._comm.world > 1:
            shutdown(self._comm)
        self._comm = None

    def __enter__(self) -> ReAttention:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _agreed(comm, check):
    """``check()``'s value; a ConfigError on any rank (memory differs per rank) is raised on every rank."""
    value, refusal = None, None
    try:
        value = check()
    except ConfigError as e:
        refusal = str(e)
    if comm.world > 1:
        refusal = next((r for r in comm.all_gather_object(refusal, "plan_check") if r), None)
    if refusal:
        raise ConfigError(refusal)
    return value


def load(
    model: str,
    config: str | Config | None = None,
    *,
    capacity: int | None = None,
    device: str | None = None,
    **overrides,
) -> ReAttention:
    """Loads a model for ReAttention inference, in one process or on every rank of a torchrun job.

    Args:
        model: a bundled name (``smollm2-135m``), a local Hugging Face directory or a ``.gguf`` file.
        config: a YAML preset (name in ``configs/`` or a path) or a :class:`~dist_reattn.config.Config`;
            default: the model's own preset, if it has one.
        capacity: tokens (prompt + new) the cache holds, checked against memory now; None sizes the
            cache to each prompt that needs more than the last (the weights stay; memory is checked
            before each allocation). A prompt beyond a given capacity is refused with one line.
        device: ``cpu``, ``cuda`` or ``auto`` (the config's ``model.device``).
        overrides: config sections, as dicts of fields or dataclasses (``scope={"local": 2048}``,
            ``cache={"page": 8}``), or dotted fields (``**{"scope.topk": 8}``). The scope given here
            is the default of every call and the widest one a call may ask for.

    Returns:
        A :class:`ReAttention`; under torchrun it has joined the job's process group (``close()``
        leaves it).
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)  # the caller's object is never changed
        cfg.model = dataclasses.replace(cfg.model, path=model)
    else:
        cfg = config_for_model(model, config, [])
    for key, value in {**overrides, **({"model.device": device} if device else {})}.items():
        section, _, field = key.partition(".")
        if field:
            value = {field: value}
        elif dataclasses.is_dataclass(value):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: give a section as a dict ({key}={{...}}) or a dotted field")
        apply_dict(cfg, {section: value}, "load()")
    cfg.validate()
    if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
        raise ConfigError(f"capacity={capacity!r} must be a positive number of tokens, or None")
    return ReAttention(cfg, capacity)
