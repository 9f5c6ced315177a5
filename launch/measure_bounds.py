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
* **Quantized first pass, a-posteriori bound** (``--quant int8,fp8``). Keys scaled per channel, then
  rounded per token; the bound per pair is two rank-1 terms from the actual rounding residuals
  (:func:`first_pass`). Reported: rows certified by top-k' (as above), and for a two-pass scan with a
  quantized first pass (``--tiles``) the fraction of tiles that must be rescored exactly.

Writes ``OUT/results.jsonl`` (one line per layer and setting) and ``OUT/README.md`` (the command
and the table averaged over layers). CPU or GPU; a CPU run at 32K takes minutes. ``--rows R`` measures
the last R query tokens of the chunk only (memory: a few [R x heads/KV head, N] fp32 matrices).
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


def quantize(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` ``[n, d]`` rounded to ``kind`` (``int8`` or ``fp8``) with one scale per row, dequantized (fp32)."""
    if kind == "fp8":
        return fp8(x, -1)[0]
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127.0
    return torch.round(x / scale).clamp(-127, 127) * scale


def first_pass(q: torch.Tensor, k: torch.Tensor, kind: str, ref: int) -> tuple[torch.Tensor, ...]:
    """A quantized first pass and its a-posteriori error bound, for one KV head.

    Keys are divided per channel by a fixed scale ``c`` (the channel's max |k| over the first ``ref``
    keys, as an engine would fix it at its first slab) and the queries multiplied by it, so
    ``q . k = (q c) . (k / c)``; then each key and each query is rounded to ``kind`` with its own
    scale. With ``q' = q c``, ``k' = k / c``, their roundings ``q^``, ``k^`` and the residuals
    ``e = q' - q^``, ``r = k' - k^``: ``q . k - q^ . k^ = q' . r + e . k^``, so by Cauchy-Schwarz
    ``|q . k - q^ . k^| <= |q'| |r| + |e| |k^|``: two rank-1 terms from one float per key (|r|, |k^|)
    and two per query row, all known at append and load time.

    Returns:
        ``approx [R, N]`` (q^ . k^), and the bound's factors ``a, c [R]`` and ``b, dd [N]``:
        ``|exact - approx| <= a b + c dd + margin``, where the margin ``2^-16 |q'| (|k^| + |r|)``
        covers the fp32 rounding of both the exact scores and the approximate ones, and for FP8 an
        accumulation allowance ``ACC |q^| |k^|`` (the tensor cores' FP8 accumulation is not exact
        fp32, an assumption); int8 accumulates exactly in int32.
    """
    if kind.startswith("rank"):
        return low_rank_pass(q, k, int(kind[4:]), ref)
    ch = k[:ref].abs().amax(0).clamp_min(1e-12)  # [d]
    qs, ks = q * ch, k / ch
    qh, kh = quantize(qs, kind), quantize(ks, kind)
    approx = qh @ kh.T
    a, c = qs.norm(dim=-1), (qs - qh).norm(dim=-1)
    b, dd = (ks - kh).norm(dim=-1), kh.norm(dim=-1)
    extra = 2.0**-16 * a[:, None] * (dd + b)[None, :]
    if kind == "fp8":
        extra = extra + ACC * qh.norm(dim=-1)[:, None] * dd[None, :]
    return approx, a, c, b, dd, extra


def low_rank_pass(q: torch.Tensor, k: torch.Tensor, r: int, ref: int) -> tuple[torch.Tensor, ...]:
    """A first pass in ``r`` of the ``d`` dimensions, its values in bf16, and its error bound.

    The keys' mean ``m`` and top-``r`` principal directions ``P`` (``[d, r]``, orthonormal) come from
    the first ``ref`` keys (fixed at the first slab, as an engine would). With ``x = P^T q``,
    ``y = P^T (k - m)``, their bf16 roundings ``x~``, ``y~`` and the residual ``k_perp = (k - m) -
    P y`` (orthogonal to P): ``q . k = q . m + x~ . y~ + (x - x~) . y~ + x . (y - y~) + q_perp .
    k_perp``, so ``|q . k - (q . m + x~ . y~)| <= |q_perp| |k_perp| + |x - x~| |y~| + |x| |y - y~|``.
    Same return convention as :func:`first_pass` (``a b + c dd + extra``).
    """
    m = k[:ref].mean(0)
    basis = torch.linalg.svd(k[:ref] - m, full_matrices=False).Vh[:r].T  # [d, r]
    x, y = q @ basis, (k - m) @ basis
    xb, yb = x.bfloat16().float(), y.bfloat16().float()
    approx = (q @ m)[:, None] + xb @ yb.T
    a = (q - x @ basis.T).norm(dim=-1)  # |q_perp|
    b = (k - m - y @ basis.T).norm(dim=-1)  # |k_perp|
    c, dd = (x - xb).norm(dim=-1), yb.norm(dim=-1)
    extra = x.norm(dim=-1)[:, None] * (y - yb).norm(dim=-1)[None, :]
    extra = extra + 2.0**-16 * q.norm(dim=-1)[:, None] * k.norm(dim=-1)[None, :]
    return approx, a, c, b, dd, extra


def tiles_of(x: torch.Tensor, t: int, fill: float) -> torch.Tensor:
    """``x [..., N]`` padded with ``fill`` to a multiple of ``t`` and viewed as ``[..., N / t, t]``."""
    n = x.shape[-1]
    pad = (-n) % t
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.view(*x.shape[:-1], -1, t)


def union16(listed: torch.Tensor) -> float:
    """Mean fraction of tiles listed by any row of each block of 16 consecutive rows ``[R, T]``."""
    r = listed.shape[0] // 16 * 16
    return float(listed[:r].view(-1, 16, listed.shape[-1]).any(1).float().mean())


def by_head(rows: torch.Tensor, g: int) -> torch.Tensor:
    """Rows ``[c * g, ...]`` (token-major, the g query heads of a KV head inner) reordered head-major."""
    return rows.view(-1, g, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def measure_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    topk: int,
    blocks: list[int],
    kprimes: list[int],
    tiles: tuple[int, ...] = (),
    quants: tuple[str, ...] = (),
    ref: int = 8192,
) -> dict:
    """Block-bound, FP8-certificate and quantized-first-pass figures for one layer.

    Args:
        q: ``[c, H, d]`` un-rotated queries; k: ``[N, Hkv, d]`` the middle keys.
        tiles: tile sizes (keys) of a scan whose first pass is quantized: per row and tile, an
            upper bound ``U`` (the tile's max approximate score plus the tile's largest error bound)
            and a lower bound ``L`` (max approximate minus it). Round 1 rescores exactly the k tiles
            with the best approximate max; the k-th best exact score found there, or the k-th
            largest ``L`` if higher, is a floor under the exact k-th score (k distinct keys reach
            it), so round 2 must rescore only the tiles whose ``U`` reaches it. Reported: the
            fraction of tiles rescored in both rounds.
        quants: first passes to measure: ``int8`` / ``fp8`` (:func:`first_pass`), ``rankR``
            (:func:`low_rank_pass`).
    """
    c, H, d = q.shape
    N, Hkv, _ = k.shape
    g = H // Hkv
    out: dict = {"rows": c * H, "keys": N}
    acc: dict = {}

    def add(key: str, value: float) -> None:
        acc[key] = acc.get(key, 0.0) + value / Hkv

    for h in range(Hkv):  # one KV head at a time: [R, N] fp32 score matrices
        qf = q[:, h * g : (h + 1) * g].float().reshape(c * g, d)  # rows: token-major, heads inner
        kf = k[:, h].float()
        s = qf @ kf.T  # exact (fp32 of the stored values)
        t = s.topk(topk, dim=-1).values[:, -1:]  # the exact k-th best
        for b in blocks:
            nb = N // b
            kb = kf[: nb * b].view(nb, b, d)
            # sum_i max(q_i kmax_i, q_i kmin_i) = q+ . kmax + q- . kmin: two matmuls
            bound = qf.clamp_min(0) @ kb.amax(1).T + qf.clamp_max(0) @ kb.amin(1).T
            add(f"blocks_kept_B{b}", float((bound >= t).float().mean()))
        q8, sq = fp8(qf, -1)
        k8, sk = fp8(kf, -1)
        s8 = q8 @ k8.T
        err = (2 * U + U * U + ACC) * qf.norm(dim=-1)[:, None] * kf.norm(dim=-1)[None, :]
        err = err + SUB * (sk.view(1, -1) * qf.abs().sum(-1)[:, None] + sq * k8.abs().sum(-1)[None, :])
        for kp in kprimes:
            cand = s8.topk(kp, dim=-1).indices
            t_c = s.gather(-1, cand).topk(topk, dim=-1).values[:, -1:]
            others = (s8 + err).scatter(-1, cand, float("-inf")).amax(-1, keepdim=True)
            add(f"certified_k{kp}", float((others < t_c).float().mean()))
            add(f"contains_k{kp}", float((t_c >= t).float().mean()))
        del s8, err
        for tt in tiles:  # today's exact two-pass: each row's k best tiles by exact tile max
            best = tiles_of(s, tt, float("-inf")).amax(-1).topk(topk, dim=-1).indices
            listed = torch.zeros(s.shape[0], -(-N // tt), dtype=torch.bool, device=s.device)
            add(f"exact_tiles_T{tt}_blk16", union16(listed.scatter_(-1, best, True)))
        for kind in quants:
            approx, a, cq, b, dd, extra = first_pass(qf, kf, kind, ref)
            err = a[:, None] * b[None, :] + cq[:, None] * dd[None, :] + extra
            hi = approx + err
            assert bool((s <= hi).all() and (s >= approx - err).all()), f"{kind} bound violated"
            for kp in kprimes:
                cand = hi.topk(kp + 1, dim=-1)
                t_c = s.gather(-1, cand.indices[:, :kp]).topk(topk, dim=-1).values[:, -1]
                add(f"{kind}_certified_k{kp}", float((cand.values[:, kp] < t_c).float().mean()))
            del hi
            for tt in tiles:
                top = tiles_of(approx, tt, float("-inf")).amax(-1)  # [R, T]
                e_t = (
                    a[:, None] * tiles_of(b, tt, 0.0).amax(-1)[None, :]
                    + cq[:, None] * tiles_of(dd, tt, 0.0).amax(-1)[None, :]
                    + tiles_of(extra, tt, 0.0).amax(-1)
                )
                # round 1 rescores each row's k tiles with the best approximate max exactly; the
                # k-th best exact score among them (k distinct keys reach it), or the k-th largest
                # tile floor if higher, bounds the k-th winner from below; round 2 rescores the
                # tiles whose upper bound reaches it
                first = top.topk(topk, dim=-1).indices
                listed = torch.zeros_like(top, dtype=torch.bool).scatter_(-1, first, True)
                exact_in = tiles_of(s, tt, float("-inf"))[listed.nonzero(as_tuple=True)].view(len(s), -1)
                floor = torch.maximum(
                    exact_in.topk(topk, dim=-1).values[:, -1:], (top - e_t).topk(topk, dim=-1).values[:, -1:]
                )
                listed |= top + e_t >= floor
                add(f"{kind}_tiles_T{tt}_row", float(listed.float().mean()))
                add(f"{kind}_tiles_T{tt}_blk16", union16(listed))
                add(f"{kind}_tiles_T{tt}_blk16h", union16(by_head(listed, g)))
            del approx, err, extra
    out.update(acc)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--len", default="32K", help="prompt tokens (K = 1024)")
    p.add_argument("--haystack", default="prose", choices=HAYSTACKS)
    p.add_argument("--blocks", default="32,64,128", help="block sizes for the bounds, comma list")
    p.add_argument("--kprime", default="8,16,32,64", help="FP8 candidates per row, comma list")
    p.add_argument("--tiles", default="64,128,256", help="tile sizes of the quantized two-pass, comma list")
    p.add_argument(
        "--quant",
        default="int8,fp8",
        help="cheaper first passes to measure: int8, fp8 (quantized), rankR (R principal directions, bf16)",
    )
    p.add_argument(
        "--rows", default="0", help="measure only the last ROWS query tokens of the chunk (0: all)"
    )
    p.add_argument("--layers", default="all", help="'all' or a comma list of layer indices")
    p.add_argument("--out", required=True, help="output directory")
    args = parse_args_with_overrides(p, argv)
    n = parse_count(args.len)
    blocks = [int(x) for x in args.blocks.split(",")]
    kprimes = [int(x) for x in args.kprime.split(",")]
    tiles = tuple(int(x) for x in args.tiles.split(",") if x)
    quants = tuple(x for x in args.quant.split(",") if x)
    if any(x not in ("int8", "fp8") and not (x.startswith("rank") and x[4:].isdigit()) for x in quants):
        raise ConfigError(f"--quant {args.quant!r}: give a comma list of int8, fp8 and rankR (R < head_dim)")
    nrows = parse_count(args.rows) if args.rows != "0" else 0
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
        r = measure_layer(
            q[-nrows:] if nrows else q, engine.cache.k[layer, lo:hi], sc.topk, blocks, kprimes, tiles, quants
        )
        r.update(layer=layer, len=len(ids), topk=sc.topk, haystack=args.haystack, model=cfg.model.path)
        append_record(out / "results.jsonl", r)
        rows.append(r)
        print(r)
    keys = [f"blocks_kept_B{b}" for b in blocks]
    keys += [f"{what}_k{kp}" for what in ("certified", "contains") for kp in kprimes]
    keys += [f"exact_tiles_T{t}_blk16" for t in tiles]
    keys += [f"{kind}_certified_k{kp}" for kind in quants for kp in kprimes]
    keys += [f"{kind}_tiles_T{t}_{w}" for kind in quants for t in tiles for w in ("row", "blk16", "blk16h")]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    lines = [
        f"# Block bounds, FP8 certificates and quantized first passes on {cfg.model.path}'s keys, {datetime.date.today()}",
        "",
        "```",
        "python launch/measure_bounds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        f"{len(ids):,} tokens ({args.haystack} haystack), middle keys per layer {rows[0]['keys']:,}, "
        f"{rows[0]['rows']:,} rows (query tokens x heads) of the last chunk per layer, topk {sc.topk}, "
        f"{prep.dtype}, torch {torch.__version__}, Python {platform.python_version()}, {prep.device}.",
        "",
        "| measure | mean over layers | min | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    for k in keys:
        vals = [r[k] for r in rows]
        lines.append(f"| {k} | **{mean[k]:.4f}** | {min(vals):.4f} | {max(vals):.4f} |")
    lines += [
        "",
        "Per layer: `results.jsonl`. `blocks_kept_B*`: fraction of key blocks whose bound reaches the "
        "row's exact k-th score (branch and bound scores at least these); `certified_k*`: fraction of "
        "rows whose FP8 top-k' provably holds the exact top-k under an a-priori bound (u = 2^-4, "
        "accumulation 2^-12 (assumed), subnormal 2^-10); `contains_k*`: the exact top-k inside FP8's "
        "top-k'. `exact_tiles_T*_blk16`: the tiles today's exact two-pass kernel revisits (each row's "
        "k best tiles, union over 16 rows). `<q>_certified_k*`: rows whose top-k' by a quantized "
        "(`<q>` = int8 / fp8, channel-scaled) first pass plus its a-posteriori bound provably holds "
        "the exact top-k; `<q>_tiles_T*_row` / `_blk16`: fraction of tiles a quantized two-pass must "
        "rescore exactly, per row / per block of 16 rows (token-major: 16 / g tokens x g heads; `blk16h`: "
        "16 tokens of one head) (see `first_pass` and `measure_layer`). "
        f"Scoring every key costs 1.0; {math.ceil(rows[0]['keys'] / 64):,} blocks of 64 per row here.",
    ]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_main(main))
