"""Tensor parallelism of the HF model's linear layers through DeepSpeed AutoTP, applied from outside.

AutoTP splits q/k/v column-wise by heads (unevenly where the ranks do not divide them: SmolLM2's 3
KV heads on 2 ranks are 2 + 1), and o_proj and the MLP's down projection row-wise with an
all-reduce. Our attention then sees only this rank's heads; :func:`head_layout` says which.
"""

from __future__ import annotations

import torch

from ..distributed import Comm


def shard(model, comm: Comm):
    """Shards ``model`` over ``comm``'s ranks with AutoTP; returns the sharded HF model."""
    if comm.world == 1:
        return model
    import deepspeed

    dtype = next(model.parameters()).dtype
    engine = deepspeed.init_inference(
        model, tensor_parallel={"tp_size": comm.world}, replace_with_kernel_inject=False, dtype=dtype
    )
    return engine.module


def local_heads(model, head_dim: int) -> tuple[int, int]:
    """(query heads, KV heads) this rank's attention computes, read off the sharded projections."""
    attn = model.model.layers[0].self_attn
    return attn.q_proj.weight.shape[0] // head_dim, attn.k_proj.weight.shape[0] // head_dim


def head_layout(model, head_dim: int, comm: Comm) -> list[tuple[int, int]]:
    """Every rank's (query heads, KV heads), in rank order; AutoTP gives each rank a contiguous range."""
    mine = torch.tensor(
        local_heads(model, head_dim), dtype=torch.int64, device=next(model.parameters()).device
    )
    return [tuple(x) for x in comm.all_gather(mine, "head_layout").cpu().tolist()]
