"""From a Config to a ready Engine: device and dtype, memory plan, model load. Shared by the launch scripts."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import Config
from .distributed import Comm
from .engine import Engine
from .models.load import ModelSource, load_model, load_spec, resolve
from .models.spec import ModelSpec
from .plan import MemoryPlan, check_memory, plan_for_scope

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError

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
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    plan = plan_for_scope(spec, cfg.scope, capacity, dtype, device, comm.world, cfg.cache.page)
    check_memory(plan, capacity, comm.world)
    return Prepared(source, spec, device, dtype, plan)


def build_engine(cfg: Config, prep: Prepared, capacity: int, comm: Comm):
    """Loads the weights and builds the engine."""
    from .models.adapter import ReAttnModel

    model = load_model(prep.source, prep.dtype, prep.device)
    return Engine(
        ReAttnModel(model, comm, tensor_parallel=cfg.parallel.layout == "tensor"),
        cfg.scope,
        capacity,
        comm=comm,
        page=cfg.cache.page,
        record_selection=cfg.debug.record_selection,
        check_consensus=cfg.debug.check_consensus,
        decode=cfg.parallel.decode,
        graph=cfg.generate.graph,
    )
