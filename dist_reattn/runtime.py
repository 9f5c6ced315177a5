"""From a Config to a ready Engine: device and dtype, memory plan, model load. Shared by the launch scripts."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, ConfigError, ScopeConfig
from .distributed import Comm
from .engine import Engine
from .models.load import ModelSource, load_model, load_spec, resolve
from .models.spec import ModelSpec
from .plan import MemoryPlan, check_memory, plan_for_scope
from .report.results import read_records
from .select import check_fp8_scoring, retrieval_heads

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda but no CUDA GPU is visible; use --model.device=cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass
class Prepared:
    """What is known before weights load: the model's source and shape, and the memory plan."""

    source: ModelSource
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    plan: MemoryPlan


def prepare(cfg: Config, capacity: int, comm: Comm) -> Prepared:
    """Resolves the model and plans memory for ``capacity`` tokens; raises ConfigError if it cannot fit."""
    source = resolve(cfg.model.path)
    spec = load_spec(source)
    # a retrieval-heads file made with another model is refused here, before the weights load
    retrieval_heads(cfg.scope.heads, len(spec.cache_layers), spec.heads, torch.device("cpu"))
    device = pick_device(cfg.model.device)
    if cfg.scope.scoring == "fp8":  # on a GPU without FP8 tensor cores: refused here, one line
        check_fp8_scoring(device)
    dtype = pick_dtype(cfg.model.dtype, device)
    plan = plan_for_scope(spec, cfg.scope, capacity, dtype, device, comm.world, cfg.cache.page)
    check_memory(plan, capacity, comm.world)
    return Prepared(source, spec, device, dtype, plan)


def check_windows(scope: ScopeConfig, modes, window: int, context: int) -> None:
    """``scope`` under each of ``modes`` keeps every position inside the model's trained ``window`` in
    a context of ``context`` tokens (:meth:`~dist_reattn.config.ScopeConfig.check_window`): a
    launch script calls it after :func:`prepare` (which plans for the widest mode), before the
    weights load."""
    for mode in modes:
        dataclasses.replace(scope, mode=mode).check_window(window, context)


def build_engine(cfg: Config, prep: Prepared, capacity: int, comm: Comm) -> Engine:
    """Loads the weights and builds the engine."""
    return new_engine(cfg, load_adapted(cfg, prep, comm), capacity, comm)


def load_adapted(cfg: Config, prep: Prepared, comm: Comm):
    """Loads the weights and swaps in our attention (and AutoTP under ``parallel.layout=tensor``)."""
    from .models.adapter import ReAttnModel

    model = load_model(prep.source, prep.dtype, prep.device)
    return ReAttnModel(model, comm, tensor_parallel=cfg.parallel.layout == "tensor")


def new_engine(cfg: Config, model, capacity: int, comm: Comm) -> Engine:
    """An engine over loaded weights: a cache of ``capacity`` tokens, limits from ``cfg.scope``."""
    return Engine(
        model,
        cfg.scope,
        capacity,
        comm=comm,
        page=cfg.cache.page,
        record_selection=cfg.debug.record_selection,
        check_consensus=cfg.debug.check_consensus,
        decode=cfg.parallel.decode,
        graph=cfg.generate.graph,
    )


SCOPE_RECORD_FIELDS = (
    "sink", "local", "topk", "span", "recall_clip", "chunk", "select", "heads", "scoring", "fp8_margin"
)  # fmt: skip


def resume_settings(cfg: Config, prep: Prepared) -> dict:
    """The recorded fields that decide a run's answers: a results file resumes only under the same."""
    return {
        "model": cfg.model.path,
        "dtype": str(prep.dtype).replace("torch.", ""),
        **{f: getattr(cfg.scope, f) for f in SCOPE_RECORD_FIELDS},
    }


def plan_resume(
    comm: Comm, out: str, wanted: list, key: Callable[[dict], tuple], item_key, settings: dict | None = None
) -> tuple[Path, list]:
    """What is left to run, decided by rank 0 (it alone reads the results file) and shared with all.

    Args:
        comm: the process group.
        out: the output folder (created on rank 0); its ``results.jsonl`` is read.
        wanted: every item of the run, in order.
        key: a recorded line's key.
        item_key: an item's key, comparable with ``key``'s.
        settings: recorded fields every earlier record must match (:func:`resume_settings`); a
            record without a field is not checked on it.

    Returns:
        (output folder, the items of ``wanted`` with no record yet), the same on every rank.

    Raises:
        ConfigError: on every rank, when an earlier record was made with other settings.
    """
    plan = None
    if comm.rank == 0:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        records = read_records(folder / "results.jsonl")
        clash = next(
            ((f, r[f], v) for r in records for f, v in (settings or {}).items() if f in r and r[f] != v),
            None,
        )
        error = None
        try:
            done = {key(r) for r in records}
        except KeyError as missing:  # another script's records (a NIAH run's folder given to RULER...)
            done = set()
            error = f"--out {folder} holds another script's results (a record without {missing}): give another --out"
        todo = [w for w in wanted if item_key(w) not in done]
        if len(todo) < len(wanted) and clash is None:
            log.info(
                f"resuming {folder / 'results.jsonl'}: {len(wanted) - len(todo)} trials already recorded"
            )
        if error is None and clash is not None:
            f, was, now = clash
            error = (
                f"--out {folder} holds results made with {f}={was} (this run: {now}): "
                "give another --out, or the same settings to resume"
            )
        plan = (str(folder), todo, error)
    folder, todo, error = comm.broadcast_object(plan)
    if error is not None:
        raise ConfigError(error)
    return Path(folder), todo
