"""Could a cheaper first pass skip most of the exact scoring? Measured on a real model's keys.

    python launch/measure_bounds.py --model smollm2-135m --len 32K --haystack prose \
        --out launch/results/bounds-cpu-2026-12-01

Issue 17's "measure each route before you build it", on the pre-RoPE keys and queries the engine
really scores: a NIAH prompt of ``--len`` tokens is prefilled, and the queries of its last chunk
(every layer, every head) are scored against every middle key ``[sink, n - local)`` of their layer.
For each row (query token, head), with ``t`` its exact k-th best score:

* **Block bounds.** Keys in blocks of ``B`` consecutive tokens; per block and channel the max and
  min of k give ``max_k q.k <= sum_i max(q_i kmax_i, q_i kmin_i)``. Branch and bound must score every
  block whose bound reaches ``t`` (it finds ``t`` only by scoring, so this is a lower bound on its
  work). Reported: the fraction of blocks (= of keys) whose bound reaches ``t``.
* **FP8 certificate.** q (per row) and k (per token and KV head) scaled to e4m3's range and rounded;
  the top-k' by FP8 score rescored exactly; the row is certified when every other key's FP8 score
  plus an a-priori error bound stays below the exact k-th score of the rescored set. The bound per
  pair: ``(2u + u^2 + acc) |q| |k| + 2^-10 (s_k |q|_1 + s_q |k8|_1)`` with ``u = 2^-4`` (e4m3's
  rounding), ``acc = 2^-12`` (an allowance for the tensor cores' FP8 accumulation, an assumption)
  and the subnormal floor of each scale ``s``. Reported: the certified fraction per k'.

Writes ``OUT/results.jsonl`` (one line per layer and setting) and ``OUT/README.md`` (the command
and the table averaged over layers). CPU or GPU; a CPU run at 32K takes minutes.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys

import torch

from dist_reattn.cli import check_out_dir, run_main
from dist_reattn.config import (
    ConfigError,
    add_model_args,
    config_for_model,
    parse_args_with_overrides,
    parse_count,
)
from dist_reattn.distributed import Comm
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel
from dist_reattn.models.load import load_model, load_tokenizer
from dist_reattn.report.results import append_record
from dist_reattn.runtime import prepare
from dist_reattn.tasks.niah import HAYSTACKS, build_sample

E4M3_MAX = 448.0
U = 2.0**-4  # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4
ACC = 2.0**-12  # allowance for the FP8 tensor-core accumulation (an assumption, see the docstring)
SUB = 2.0**-10  # half of e4m3's smallest subnormal step (2^-9), relative to the scale


class RecordingEngine(Engine):
    """The engine, keeping the un-rotated queries of the last retrieval of every layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_queries: dict[int, tuple[torch.Tensor, int]] = {}

    def scopes_for(self, layer, q, n, mine, per_rank):
        self.last_queries[layer] = (q[-1], n + (q.shape[0] - 1) * q.shape[1])  # last chunk, its end
        return super().scopes_for(layer, q, n, mine, per_rank)


def fp8(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` rounded to e4m3 with one scale per slice along ``dim`` (dequantized, fp32), and the scales."""
    scale = x.abs().amax(dim, keepdim=True).clamp_min(1e-30) / E4M3_MAX
    return (x / scale).to(torch.float8_e4m3fn).float() * scale, scale


def measure_layer(q: torch.Tensor, k: torch.Tensor, topk: int, blocks: list[int], kprimes: list[int]) -> dict:
    """Block-bound and FP8-certificate figures for one layer.

    Args:
        q: ``[c, H, d]`` un-rotated queries; k: ``[N, Hkv, d]`` the middle keys.
    """
    c, H, d = q.shape
    N, Hkv, _ = k.shape
    g = H // Hkv
    out: dict = {"rows": c * H, "keys": N}
    qf = q.float().reshape(c, Hkv, g, d).permute(1, 0, 2, 3).reshape(Hkv, c * g, d)  # [Hkv, R, d]
    kf = k.float().permute(1, 0, 2)  # [Hkv, N, d]
    s = qf @ kf.transpose(1, 2)  # [Hkv, R, N] exact (fp32 of the stored values)
    t = s.topk(topk, dim=-1).values[..., -1:]  # [Hkv, R, 1] the exact k-th best
    for b in blocks:
        nb = N // b
        kb = kf[:, : nb * b].reshape(Hkv, nb, b, d)
        kmax, kmin = kb.amax(2), kb.amin(2)  # [Hkv, nb, d]
        # sum_i max(q_i kmax_i, q_i kmin_i) = q+ . kmax + q- . kmin: two matmuls
        bound = qf.clamp_min(0) @ kmax.transpose(1, 2) + qf.clamp_max(0) @ kmin.transpose(
            1, 2
        )  # [Hkv, R, nb]
        out[f"blocks_kept_B{b}"] = float((bound >= t).float().mean())
    q8, sq = fp8(qf, -1)  # per row
    k8, sk = fp8(kf, -1)  # per token and KV head
    s8 = q8 @ k8.transpose(1, 2)
    err = (2 * U + U * U + ACC) * qf.norm(dim=-1)[..., None] * kf.norm(dim=-1)[:, None]  # [Hkv, R, N]
    err = err + SUB * (sk.squeeze(-1)[:, None] * qf.abs().sum(-1)[..., None] + sq * k8.abs().sum(-1)[:, None])
    for kp in kprimes:
        cand = s8.topk(kp, dim=-1).indices  # [Hkv, R, k']
        t_c = s.gather(-1, cand).topk(topk, dim=-1).values[..., -1:]  # exact k-th of the rescored set
        others = (s8 + err).scatter(-1, cand, float("-inf")).amax(-1, keepdim=True)
        out[f"certified_k{kp}"] = float((others < t_c).float().mean())
        # what a perfect bound could certify: the exact top-k inside the FP8 top-k'
        out[f"contains_k{kp}"] = float((t_c >= t).float().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--len", default="32K", help="prompt tokens (K = 1024)")
    p.add_argument("--haystack", default="prose", choices=HAYSTACKS)
    p.add_argument("--blocks", default="32,64,128", help="block sizes for the bounds, comma list")
    p.add_argument("--kprime", default="8,16,32,64", help="FP8 candidates per row, comma list")
    p.add_argument("--layers", default="all", help="'all' or a comma list of layer indices")
    p.add_argument("--out", required=True, help="output directory")
    args = parse_args_with_overrides(p, argv)
    n = parse_count(args.len)
    blocks = [int(x) for x in args.blocks.split(",")]
    kprimes = [int(x) for x in args.kprime.split(",")]
    cfg = config_for_model(args.model, args.config, args.overrides)
    if cfg.scope.mode != "reattention" or cfg.scope.topk < 1:
        raise ConfigError(
            "measure_bounds.py measures the retrieval step: keep --scope.mode=reattention, topk >= 1"
        )
    if n <= cfg.scope.sink + cfg.scope.local + cfg.scope.chunk:
        raise ConfigError(f"--len {n} leaves no middle keys: use more than sink + local + chunk tokens")
    if min(kprimes) < cfg.scope.topk or min(blocks) < 1:
        raise ConfigError(f"--kprime values must be >= scope.topk={cfg.scope.topk} and --blocks >= 1")
    out = check_out_dir(args.out)
    comm = Comm.single()
    prep = prepare(cfg, n, comm)
    out.mkdir(parents=True, exist_ok=True)
    engine = RecordingEngine(
        ReAttnModel(load_model(prep.source, prep.dtype, prep.device)), cfg.scope, n, comm
    )
    tok = load_tokenizer(prep.source)
    ids = build_sample(tok, n, 0.5, seed=0, haystack=args.haystack).input_ids
    with torch.no_grad():
        engine.generate(ids, 1)
    sc = cfg.scope
    layers = sorted(engine.last_queries) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    rows = []
    for layer in layers:
        q, end = engine.last_queries[layer]
        lo, hi = sc.sink, end - sc.local  # the middle of the last chunk (one rank: rows = tokens)
        r = measure_layer(q, engine.cache.k[layer, lo:hi], sc.topk, blocks, kprimes)
        r.update(layer=layer, len=len(ids), topk=sc.topk, haystack=args.haystack, model=cfg.model.path)
        append_record(out / "results.jsonl", r)
        rows.append(r)
        print(r)
    keys = [f"blocks_kept_B{b}" for b in blocks]
    keys += [f"{what}_k{kp}" for what in ("certified", "contains") for kp in kprimes]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    lines = [
        f"# Block bounds and FP8 certificates on {cfg.model.path}'s keys, {datetime.date.today()}",
        "",
        "```",
        "python launch/measure_bounds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        f"{len(ids):,} tokens ({args.haystack} haystack), middle keys per layer {rows[0]['keys']:,}, "
        f"{rows[0]['rows']:,} rows (query tokens x heads) of the last chunk per layer, topk {sc.topk}, "
        f"{prep.dtype}, torch {torch.__version__}, Python {platform.python_version()}, {prep.device}.",
        "",
        "| layer | " + " | ".join(keys) + " |",
        "| ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for r in rows:
        lines.append(f"| {r['layer']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    lines.append("| mean | " + " | ".join(f"**{mean[k]:.3f}**" for k in keys) + " |")
    lines += [
        "",
        "`blocks_kept_B*`: fraction of key blocks whose bound reaches the row's exact k-th score (branch "
        "and bound scores at least these); `certified_k*`: fraction of rows whose FP8 top-k' provably "
        f"holds the exact top-k (bound constants: u = 2^-4, accumulation 2^-12 (assumed), subnormal 2^-10). "
        f"Scoring every key costs 1.0; {math.ceil(rows[0]['keys'] / 64):,} blocks of 64 per row here.",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_main(main))
