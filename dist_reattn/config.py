"""Typed configuration: dataclasses whose sections map 1:1 onto YAML presets in ``configs/`` and onto
``--section.field=value`` command-line overrides. Each component receives only its own section."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

MODES = ("reattention", "streaming", "full")
# What the retrieval's top-k ranks the middle keys by (ScopeConfig.select; docs/DESIGN.md section 2).
SCORINGS = ("paper", "qkv", "qkv2", "qk_pe")  # what a head's top-k ranks keys by
MASS_SELECTIONS = ("mass", "mass_shared")  # one-token steps keep the keys of largest fused mass
SELECTIONS = (*SCORINGS, *MASS_SELECTIONS)
SCORE_NORMS = {"qkv": 1, "qkv2": 2}  # selections that score keys weighted by this norm of their value
SCORES = ("exact", "fp8")  # how the top-k is computed (ScopeConfig.scoring)
# Presets ship inside the package as dist_reattn/configs (pyproject.toml maps the top-level configs/
# there); an editable checkout has them at the top level only.
_HERE = Path(__file__).resolve().parent
CONFIG_DIR = _HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"


class ConfigError(ValueError):
    """Bad user input: the message is one line naming the problem and the fix."""


@dataclass
class ModelConfig:
    path: str = "smollm2-135m"
    """A bundled model name (``smollm2-135m``), a local Hugging Face directory, or a ``.gguf`` file."""
    dtype: str = "auto"
    """Weights, activations and KV dtype: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``."""
    device: str = "auto"
    """``auto`` (the local GPU when there is one, else CPU), ``cpu`` or ``cuda``."""


@dataclass(frozen=True)
class ScopeConfig:
    """How one sequence is read. Frozen: a variant is ``dataclasses.replace(scope, local=8192)``, and
    an engine serves it per call within the :class:`ScopeLimits` it was built for."""

    mode: str = "reattention"
    """``reattention`` (sink + retrieved + local), ``streaming`` (sink + local) or ``full`` (everything)."""
    sink: int = 32
    """G: the first tokens, always in scope."""
    local: int = 4096
    """L: the most recent tokens, always in scope (includes the current chunk)."""
    topk: int = 4
    """k: keys kept per (query head, query token) in the retrieval step; 0 retrieves nothing."""
    span: int = 32
    """S: each kept hit is widened to tokens [j - S/2, j - S/2 + S)."""
    recall_clip: int = 127
    """R: at most R distinct hits are kept, by vote count."""
    chunk: int = 512
    """C: prefill chunk length in tokens."""
    select: str = "paper"
    """What the top-k ranks the middle keys by: ``paper`` (``q . k`` on un-rotated vectors: exactly the
    paper's selection), ``qkv`` / ``qkv2`` (each key weighted by the L1 / L2 norm of its value: the
    paper's ablations; the cache keeps the weighted keys too, +50% KV memory), ``qk_pe`` (``q . k``
    with RoPE at a fixed relative distance of ``local`` tokens, the nearest a selected token can be).
    Votes, clip, spans and attention are the same for these. ``mass``: steps of one token (the
    prompt's last token, fed alone, and decode) keep the ``recall_clip`` keys of largest attention
    mass summed over the query heads and over the retrieving layers so far (no per-head top-k, no
    votes; :func:`~dist_reattn.select.mass_candidates`); longer steps select as ``paper``.
    ``mass_shared``: as ``mass``, then the token runs a second time with every layer attending the
    scope of the last retrieving layer (the mass of all layers): twice the cost of a one-token step."""
    distinct: bool = False
    """With ``select=mass`` or ``mass_shared``: at most one hit per block of ``span`` middle tokens
    (blocks from ``sink`` on), the block's key of largest mass, so the ``recall_clip`` hits fall in
    as many separate places instead of crowding one needle (the paper's tile-max kernel takes one
    winner per 128-key tile in the same spirit)."""
    heads: str = ""
    """A JSON file naming the retrieval heads per retrieving layer (made from the selection probe:
    ``python -m dist_reattn.report.selection_report ... --heads-out FILE``): their top-k picks
    outvote every other head's, so they fill the recall clip first. Empty: every head votes alike
    (the paper)."""
    slab: int = 0
    """Prefill chunks per model forward (0: 16 on a GPU, 1 on a CPU). Norms, projections and MLPs run
    once over the slab and the retrieval and attention of its chunks run batched; every chunk still
    gets exactly the scope and attention it would get alone, so results do not depend on it."""
    scoring: str = "exact"
    """How the top-k is computed: ``exact`` (every middle key scored exactly), or ``fp8`` (opt-in,
    approximate: each row's best ``topk + fp8_margin`` tiles of 64 keys chosen on FP8 copies of the
    score keys, then the keys of those tiles scored exactly; the cache keeps the FP8 keys too, +1
    byte per key element). FP8 tensor cores are needed on a GPU (compute capability 8.9+); on a CPU
    the torch reference runs it. Prefill chunks and steps of one token through the prefill's step
    use it; the static decode step scores exactly. Records carry the agreement it measured on a
    sample (profile counters ``fp8_rows_sampled``, ``fp8_rows_equal``)."""
    fp8_margin: int = 4
    """Extra tiles each row keeps beyond ``topk`` under ``scoring=fp8`` (``topk + fp8_margin <= 16``);
    a margin covering every tile gives the exact result."""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"scope.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.heads and not Path(self.heads).is_file():
            raise ConfigError(
                f"scope.heads={self.heads!r} is not a file: give a retrieval-heads JSON "
                f"(selection_report --heads-out), or leave it empty"
            )
        if self.select not in SELECTIONS:
            raise ConfigError(
                f"scope.select={self.select!r} is not one of {', '.join(SELECTIONS)} (paper: the paper's selection)"
            )
        if self.distinct and self.select not in MASS_SELECTIONS:
            raise ConfigError(
                f"scope.distinct=true keeps one hit per span of the middle by fused mass: it needs "
                f"--scope.select=mass or mass_shared, not {self.select!r}"
            )
        for name in ("sink", "topk", "recall_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"scope.{name}={getattr(self, name)} must be >= 0")
        if self.chunk <= 0:
            raise ConfigError(f"scope.chunk={self.chunk} must be > 0 (e.g. --scope.chunk=512)")
        if self.slab < 0:
            raise ConfigError(f"scope.slab={self.slab} must be >= 0 (0 picks 16 on a GPU, 1 on a CPU)")
        if self.span <= 0:
            raise ConfigError(f"scope.span={self.span} must be > 0")
        if self.local < self.chunk:
            raise ConfigError(
                f"scope.local={self.local} must be >= scope.chunk={self.chunk}: the local window holds the current chunk"
            )
        if self.sink > self.local:
            raise ConfigError(
                f"scope.sink={self.sink} is above scope.local={self.local}: the sink is a few first tokens "
                f"(paper: 32), the local window the recent context; lower --scope.sink or raise --scope.local"
            )
        if self.scoring not in SCORES:
            raise ConfigError(
                f"scope.scoring={self.scoring!r} is not one of {', '.join(SCORES)} (exact: the default)"
            )
        if self.fp8_margin < 0:
            raise ConfigError(
                f"scope.fp8_margin={self.fp8_margin} must be >= 0 (extra tiles per row; default 4)"
            )
        from .kernels import MAX_TOPK  # here, not at import: it brings torch and triton
        from .kernels.fp8 import MAX_KEEP

        if self.scoring == "fp8" and self.topk + self.fp8_margin > MAX_KEEP:
            fix = (
                f"--scope.fp8_margin <= {MAX_KEEP - self.topk}"
                if self.topk <= MAX_KEEP
                else f"--scope.topk <= {MAX_KEEP}"
            )
            raise ConfigError(
                f"scope.topk={self.topk} + scope.fp8_margin={self.fp8_margin} is above the FP8 kernel's "
                f"{MAX_KEEP} tiles per row: use {fix} (or --scope.scoring=exact)"
            )

        if self.topk > MAX_TOPK:
            raise ConfigError(
                f"scope.topk={self.topk} is above the score kernel's limit {MAX_TOPK}: use --scope.topk <= "
                f"{MAX_TOPK} (a wider --scope.span retrieves more context per hit)"
            )

    def slab_on(self, device_type: str) -> int:
        """Chunks per prefill forward on a ``cuda`` or ``cpu`` device."""
        return self.slab or (16 if device_type == "cuda" else 1)

    def max_scope(self) -> int:
        """Upper bound on the scope length of one step (sink + clipped spans + local), whatever the mode."""
        return self.sink + self.recall_clip * self.span + self.local

    def max_positions(self) -> int:
        """The most tokens one step's scope holds in this mode: :meth:`max_scope` where the mode
        retrieves (``reattention``, ``topk`` > 0), ``sink + local`` where it does not."""
        return self.max_scope() if self.mode == "reattention" and self.topk else self.sink + self.local

    def check_window(self, window: int, context: int) -> None:
        """A ConfigError when a step's scope can outgrow the model's trained ``window`` in a context of
        ``context`` tokens. The scope's tokens take positions 0, 1, ... in order (the step's own
        last), so its widest, ``sink + recall_clip * span + local`` (``sink + local`` where nothing is
        retrieved), must fit, unless the whole context does. ``full`` attends every token at its own
        position (the baseline, beyond the window too): not checked."""
        widest = self.max_positions()
        if self.mode == "full" or min(widest, context) <= window:
            return
        if widest > self.sink + self.local:
            terms = f"{self.sink} + {self.recall_clip} * {self.span} + {self.local}"
            what = f"scope.sink + scope.recall_clip * scope.span + scope.local = {terms}"
            fix = "lower --scope.recall_clip, --scope.span or --scope.local"
        else:
            what, fix = f"scope.sink + scope.local = {self.sink} + {self.local}", "lower --scope.local"
        raise ConfigError(
            f"{what} = {widest} positions, beyond the model's trained window of "
            f"{window}: {fix} so that it fits"
        )


@dataclass(frozen=True)
class ScopeLimits:
    """The widest scope an engine serves, fixed when it is built: the replicated window of recent
    tokens (several ranks) holds ``sink + local + chunk * slab`` rows, a step at most
    ``chunk * slab`` tokens, and the cache keeps the score keys of one kind (``score_norm``). Every
    call's scope is checked against these, on any number of ranks."""

    sink: int
    local: int
    chunk: int
    slab: int
    """Chunks per forward, resolved for the device (never 0)."""
    score_norm: int = 0
    """The value norm the cache's score keys are weighted by (``SCORE_NORMS[select]``; 0: plain keys)."""
    fp8: bool = False
    """Whether the cache also keeps the score keys in FP8 (``scope.scoring=fp8`` in any scope it serves)."""

    @classmethod
    def of(cls, scopes, device_type: str) -> ScopeLimits:
        """The limits that serve every scope of ``scopes`` on a ``cuda`` or ``cpu`` device; a
        ConfigError if they need score keys of different kinds (one cache keeps one)."""
        scopes = list(scopes)
        norms = {SCORE_NORMS.get(s.select, 0): s.select for s in scopes}
        if len(norms) > 1:
            raise ConfigError(
                f"scope.select={' and '.join(sorted(norms.values()))} keep different score keys and one "
                "engine keeps one kind: run them as separate jobs (or loads)"
            )
        return cls(
            max(s.sink for s in scopes),
            max(s.local for s in scopes),
            max(s.chunk for s in scopes),
            max(s.slab_on(device_type) for s in scopes),
            next(iter(norms)),
            any(s.scoring == "fp8" for s in scopes),
        )

    def check(self, scope: ScopeConfig, device_type: str) -> ScopeConfig:
        """``scope``, validated; a ConfigError naming the first limit it exceeds, if any."""
        scope.validate()
        wanted = {"sink": scope.sink, "local": scope.local, "chunk": scope.chunk}
        wanted["slab"] = scope.slab_on(device_type)
        for name, value in wanted.items():
            if value > getattr(self, name):
                raise ConfigError(
                    f"scope.{name}={value} is above this engine's limit {name}={getattr(self, name)}, fixed "
                    f"when it was built: build it for the wider scope, e.g. dist_reattn.load(..., scope={{'{name}': {value}}})"
                )
        if SCORE_NORMS.get(scope.select, 0) != self.score_norm:
            raise ConfigError(
                f"scope.select={scope.select!r} needs other score keys than this engine keeps (score_norm="
                f"{self.score_norm}), fixed when it was built: build it for that selection, e.g. "
                f"dist_reattn.load(..., scope={{'select': {scope.select!r}}})"
            )
        if scope.scoring == "fp8" and not self.fp8:
            raise ConfigError(
                "scope.scoring='fp8' needs the FP8 keys this engine's cache does not keep, fixed when it was "
                "built: build it for that scoring, e.g. dist_reattn.load(..., scope={'scoring': 'fp8'})"
            )
        return scope


@dataclass
class CacheConfig:
    page: int = 1
    """Tokens per cache page; page p lives on rank p mod P. One token (the default) bounds the rows
    any rank holds of a scope at about 1/P of it, which sizes the scope K/V exchange; larger pages
    make that exchange closer to dense."""


@dataclass
class DebugConfig:
    record_selection: bool = False
    """Keep every step's scope (global token indices) per layer, for equivalence checks."""
    check_consensus: bool = False
    """Compare a checksum of every step's scope across ranks and fail loudly on disagreement."""


@dataclass
class ParallelConfig:
    layout: str = "sequence"
    """How several ranks share a prefill: ``sequence`` (every rank holds the whole model and runs
    norms, projections, MLPs, selection and attention for its own chunks of each slab; scoring is
    sharded by KV owner) or ``tensor`` (DeepSpeed AutoTP splits the heads and MLPs over the ranks,
    every rank runs every chunk; the way for a model that does not fit one device). Decode steps
    run the model on every rank in ``sequence``."""
    decode: str = "lse"
    """How decode attends: ``lse`` (the static step, ``dist_reattn.decode.StaticStep``, the one a CUDA
    graph replays: each rank attends over the scope tokens it owns, partial outputs merged by
    log-sum-exp) or ``gather`` (the prefill's step with one token: scope K/V assembled on every rank;
    with one process too, where it is the reference the static step is tested against)."""


@dataclass
class GenerateConfig:
    graph: bool = True
    """Decode greedy tokens as CUDA graph replays where they apply (CUDA devices, no tensor
    parallelism, ``parallel.decode=lse``, a bounded scope, no debug records:
    ``dist_reattn.decode.graph_reason``); elsewhere, and with False, step by step."""


@dataclass
class DistConfig:
    timeout_s: float = 600.0
    """A collective waiting longer than this (a dead or hung rank) ends the whole job."""
    backend: str = "auto"
    """``auto`` (NCCL with GPUs, gloo without), ``nccl`` or ``gloo``."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def validate(self) -> None:
        self.scope.validate()
        if self.cache.page <= 0:
            raise ConfigError(f"cache.page={self.cache.page} must be > 0")
        if self.model.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"model.dtype={self.model.dtype!r}: use auto, bf16, fp16 or fp32")
        if self.dist.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"dist.backend={self.dist.backend!r}: use auto, nccl or gloo")
        if not (math.isfinite(self.dist.timeout_s) and self.dist.timeout_s > 0):
            raise ConfigError(
                f"dist.timeout_s={self.dist.timeout_s} must be a finite number of seconds > 0, e.g. 600"
            )
        if self.parallel.layout not in ("sequence", "tensor"):
            raise ConfigError(f"parallel.layout={self.parallel.layout!r}: use sequence or tensor")
        if self.parallel.decode not in ("lse", "gather"):
            raise ConfigError(f"parallel.decode={self.parallel.decode!r}: use lse or gather")
        if self.model.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"model.device={self.model.device!r}: use auto, cpu or cuda")


def _coerce(value, tp, where: str):
    """Converts a YAML or command-line value to the field's declared type."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str}[tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = args[0]
    if isinstance(value, (list, dict)):
        raise ConfigError(f"{where}={value!r} must be a single value, not a list or mapping")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int and isinstance(value, str):
            m = _INT.match(value)
            if not m:
                raise ValueError(value)
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
        if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
            # YAML's 4.7 (or true) would become 4 (or 1) through int(): refused, not truncated.
            if not (isinstance(value, float) and value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float and isinstance(value, bool):
            raise ValueError(value)
        return tp(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from e


def _set(cfg: Config, dotted: str, value) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override {dotted!r} must look like section.field, e.g. --scope.topk=8")
    section, name = parts
    sec = getattr(cfg, section, None)
    if sec is None or not dataclasses.is_dataclass(sec):
        sections = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"unknown config section {section!r}; sections are {sections}")
    fields = {f.name: f for f in dataclasses.fields(sec)}
    if name not in fields:
        raise ConfigError(f"unknown field {dotted!r}; {section} has {', '.join(fields)}")
    value = _coerce(value, fields[name].type, dotted)
    if type(sec).__dataclass_params__.frozen:  # the scope section: a new value, never a mutation
        setattr(cfg, section, dataclasses.replace(sec, **{name: value}))
    else:
        setattr(sec, name, value)


def apply_dict(cfg: Config, data: dict, source: str) -> None:
    """Applies a nested ``{section: {field: value}}`` mapping (a YAML preset) onto ``cfg``."""
    if data is None:
        return
    if not isinstance(data, dict):
        found = "a list" if isinstance(data, list) else f"the single value {str(data)[:40]!r}"
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (e.g. 'scope:' then '  topk: 8'), "
            f"found {found}"
        )
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for name, value in values.items():
            try:
                _set(cfg, f"{section}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def parse_args_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parses a launch script's flags; the ``--section.field=value`` overrides land in ``args.overrides``.

    Any other unknown argument is an argparse error (usage line, exit 2).
    """
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "." in r.split("=")[0])]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = rest
    return args


def preset_path(name: str) -> Path | None:
    """The YAML preset of that name in ``configs/``, if there is one."""
    p = CONFIG_DIR / f"{name}.yaml"
    return p if p.is_file() else None


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "smollm2-135m") -> None:
    """The launch scripts' ``--model`` and ``--config`` flags (see :func:`config_for_model`)."""
    parser.add_argument(
        "--model",
        default=default_model,
        help="bundled name, HF directory, .gguf file, or random:SHAPE (configs/random/, random weights)",
    )
    parser.add_argument(
        "--config", default=None, help="YAML preset (name in configs/ or path); default: the model's"
    )


def config_for_model(model: str, preset: str | None, overrides: list[str]) -> Config:
    """The run's config: ``preset`` (else the model's own preset, if it has one), ``model.path``, overrides."""
    preset = preset or (model if preset_path(model) else None)
    return load_config(preset, [f"model.path={model}", *overrides])


def _read_yaml(path: Path):
    """A YAML file's data; any unreadable, non-text or non-YAML file is a ConfigError naming it."""
    fix = "give a YAML preset of plain sections, e.g. 'scope:' then '  topk: 8'"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config {str(path)!r} is not UTF-8 text (a binary file?): {fix}") from None
    except OSError as e:
        raise ConfigError(f"config {str(path)!r} cannot be read ({e.strerror}): {fix}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"config {str(path)!r}{where}: not plain YAML ({what}): {fix}") from None


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a validated Config: defaults, then a preset (name in configs/ or a YAML path), then overrides.

    Args:
        preset: preset name (``smollm2-135m``) or path to a YAML file; None for defaults only.
        overrides: ``section.field=value`` strings (leading dashes allowed).
    """
    cfg = Config()
    if preset:
        path = preset_path(preset) or Path(preset)
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
            raise ConfigError(f"config preset {preset!r} not found; presets: {known}; or give a YAML path")
        apply_dict(cfg, _read_yaml(path), str(path))
    for item in overrides or []:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} needs a value: --{key}=VALUE")
        _set(cfg, key, value)
    cfg.validate()
    return cfg


_COUNT = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")
_INT = re.compile(r"^\s*(-?\d+)\s*([kKmM]?)\s*$")
_UNITS = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_count(text: str) -> int:
    """Parses a token count: ``16K`` = 16*1024, ``4M`` = 4*1024*1024, or a plain positive integer."""
    m = _COUNT.match(str(text))
    if not m or int(m.group(1)) <= 0:
        raise ConfigError(f"{text!r} is not a positive token count; use e.g. 16K, 1M or 20000 (K = 1024)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_count(n: int) -> str:
    """Inverse of :func:`parse_count` where exact: 16384 -> ``16K``."""
    for unit, size in (("M", 1024 * 1024), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
