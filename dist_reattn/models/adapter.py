"""Plugs our attention into a Hugging Face decoder from the outside, keeping its weights, norms and MLPs.

Two swaps, no forked modeling code:

* the model's rotary module is replaced by one that rotates by zero, so the q and k that HF hands
  to its attention function are the un-rotated (pre-RoPE) vectors, after any q/k norm (Qwen3);
* our function is registered through ``AttentionInterface`` and selected as the model's attention
  implementation; it forwards each layer's q, k, v to the engine's current step, passed as the
  ``reattn_step`` keyword of the model's forward.

The original rotary module is kept to compute cos/sin (with the model's rope scaling) at scope
positions. Gemma3's rotary module serves two layer types (``full_attention``: theta 1e6 with the
model's rope scaling; ``sliding_attention``: theta 1e4) and takes the type as an argument:
:meth:`ReAttnModel.rope` passes it through, ``full_attention`` for the cached (global) layers.
"""

from __future__ import annotations

import inspect
import logging

import torch

from ..distributed import Comm
from . import tp
from .load import spec_from_hf_config

ATTN_NAME = "dist_reattn"
log = logging.getLogger(__name__)


class _ZeroRotation(torch.nn.Module):
    """Returns cos = 1, sin = 0: HF's ``apply_rotary_pos_emb`` then leaves q and k unchanged."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        # *args: Gemma3 passes the layer type
        shape = (*position_ids.shape, self.head_dim)
        return x.new_ones(shape), x.new_zeros(shape)


def _attention(module, query, key, value, attention_mask, scaling=None, reattn_step=None, **kwargs):
    """HF attention-interface entry. q ``[1, H, c, d]``, k/v ``[1, Hkv, c, d]``, all un-rotated."""
    if reattn_step is None:
        raise RuntimeError(
            "dist_reattn attention called outside an engine step; run the model through Engine"
        )
    out = reattn_step.attend(module.layer_idx, query[0], key[0], value[0], scaling)  # [c, H, d]
    return out[None], None


def _no_mask(*args, **kwargs):
    # Our attention builds its own causal mask over the scope; HF's mask would be wasted work.
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, _no_mask)


class ReAttnModel:
    """An HF causal LM whose attention layers defer to a step object supplied per forward.

    Args:
        model: the HF ``*ForCausalLM``, whole (not yet sharded).
        comm: the ranks to shard over; with several ranks and ``tensor_parallel``, the linear layers
            are split by DeepSpeed AutoTP and each rank's attention gets only its own heads;
            otherwise every rank holds the whole model (sequence groups).
    """

    def __init__(self, model, comm: Comm | None = None, tensor_parallel: bool = False):
        _register()
        comm = comm or Comm.single()
        self.spec = spec_from_hf_config(model.config)
        # AutoTP splits whole KV heads: with more ranks than KV heads every rank keeps the whole
        # model and the engine uses sequence groups instead.
        self.tensor_parallel = tensor_parallel and 1 < comm.world <= self.spec.kv_heads
        if tensor_parallel and comm.world > self.spec.kv_heads:
            log.warning(
                f"tensor parallelism off: {comm.world} ranks > {self.spec.kv_heads} KV heads; "
                "using sequence groups (parallel.layout=sequence)"
            )
        if self.tensor_parallel:
            model = tp.shard(model, comm)
            # (query heads, KV heads) of every rank, in rank order
            self.layout = tp.head_layout(model, self.spec.head_dim, comm)
        else:
            self.layout = [(self.spec.heads, self.spec.kv_heads)] * comm.world
        self.hf = model
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        model.set_attn_implementation(ATTN_NAME)
        base = model.model
        if not isinstance(base.rotary_emb, _ZeroRotation):
            self.rotary = base.rotary_emb
            base.rotary_emb = _ZeroRotation(self.spec.head_dim)
        # Rotary modules that serve several layer types (Gemma3) take the type as an argument.
        self.typed_rope = "layer_type" in inspect.signature(self.rotary.forward).parameters
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if eos is not None else model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    @torch.no_grad()
    def rope(self, positions: torch.Tensor, sliding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[m, d]`` in the model dtype for integer ``positions [m]``, rope scaling included.

        Args:
            sliding: the rotation of the sliding-window layers (Gemma3's local rope) instead of the
                global layers'.
        """
        x = torch.empty(1, dtype=self.dtype, device=self.device)
        args = (("sliding_attention" if sliding else "full_attention"),) if self.typed_rope else ()
        assert self.typed_rope or not sliding, "this model has one rotary for every layer"
        cos, sin = self.rotary(x, positions[None].to(self.device), *args)
        return cos[0], sin[0]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, step) -> torch.Tensor:
        """Runs one chunk ``ids [c]`` through the model; returns the last token's logits ``[vocab]``."""
        out = self.hf(
            input_ids=ids[None].to(self.device), use_cache=False, logits_to_keep=1, reattn_step=step
        )
        return out.logits[0, -1]
