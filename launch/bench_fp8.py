"""Benchmark of the FP8-chosen score + top-k against the exact kernel, on one GPU (issue 25).

    timeout 240 python launch/bench_fp8.py --out launch/results/bench_fp8-H100-2026-12-02

Measures, in one run: the dense bf16 (``torch.mm``) and FP8 (``torch._scaled_mm``, e4m3, fp32
accumulate, bf16 out) matmul rates at 8192^3; then for SmolLM2 (9/3 heads x 64) and Llama-8B
(32/8 x 128) shapes, c = 2048, topk 4 and every N (256K to 4M): the exact ``score_topk`` and
``score_topk_fp8`` at ``--margin`` (do_bench median; inputs rotated past L2 where small), their
speedup, TFLOP/s counting ``2 c H N d`` for the score pass, the fp8 path's pass 1 alone (FP8 tile
maxima and the plan, no exact rescoring: where the fp8 time goes), the first call of each (compile and
warm-up) timed apart, the key quantization (``key_center`` + ``key_scale`` + ``quantize_keys``, what a cache pays once
per key) timed apart, and the top-k agreement with the exact kernel on these random keys for every
``--agree-margins`` value: the fraction of rows (token, head) whose fp8 top-k index set equals
the exact one, and the mean fraction of the exact top-k found (recall).

Writes ``OUT/results.jsonl`` (one line per record, flushed as it goes: a run cut short by
``timeout`` keeps what it measured) and ``OUT/README.md`` (the tables, rewritten after every point).
``--fp8-config K=V,...`` (repeatable) also times pass-1 variants at every point (e.g. ``GATE=1``,
``PIPE=1``, ``BLOCK_M=256``; ``FLOOR=1`` is the baseline whose pass 1 keeps only a running row maximum,
wrong results by design: what the per-tile list costs), through the private ``kernels/_variants.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench

from dist_reattn.cli import run_main
from dist_reattn.config import ConfigError
from dist_reattn.kernels import check_fp8, key_center, key_scale, quantize_keys, score_topk, score_topk_fp8
from dist_reattn.kernels._variants import score_topk_fp8_variant
from dist_reattn.kernels.fp8 import _fp8_first_pass, fold_query, fp8_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_topk import bench, parse_config  # noqa: E402  (timing and --config parsing, shared)

MODELS = {"SmolLM2": (9, 3, 64), "Llama-8B": (32, 8, 128)}
L2_ROTATE_BYTES = 256 << 20  # inputs smaller than this get several copies, cycled per call


def first_call_ms(fn) -> float:
    """Wall ms of one call, synchronized: on a fresh shape, compile + warm-up + the call."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def ceilings() -> tuple[float, float]:
    """(dense bf16 matmul TFLOP/s, dense FP8 e4m3 matmul TFLOP/s), 8192^3, measured now."""
    n = 8192
    ab = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    bf16 = 2 * n**3 / do_bench(lambda: torch.mm(*ab), warmup=25, rep=200, return_mode="median") / 1e9
    # e4m3 operands, the second column-major (what _scaled_mm takes), unit scales
    ab = [ab[0].to(torch.float8_e4m3fn), ab[1].to(torch.float8_e4m3fn).t().contiguous().t()]
    one = torch.ones((), device="cuda", dtype=torch.float32)
    mm8 = lambda: torch._scaled_mm(*ab, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
    fp8 = 2 * n**3 / do_bench(mm8, warmup=25, rep=200, return_mode="median") / 1e9
    ab.clear()
    torch.cuda.empty_cache()
    return bf16, fp8


class Output:
    """``OUT/results.jsonl`` appended and flushed per record; ``OUT/README.md`` rewritten per point."""

    def __init__(self, out: str, head: str):
        os.makedirs(out, exist_ok=True)
        self.jsonl = open(os.path.join(out, "results.jsonl"), "a")
        self.md = os.path.join(out, "README.md")
        self.head, self.rows, self.agree = head, [], []

    def record(self, rec: dict) -> None:
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def write(self) -> None:
        text = self.head + "\n## Time, topk 4\n\n" + TIME_HEADER + "\n" + "\n".join(self.rows) + "\n"
        text += "\n## Top-k agreement with the exact kernel (random keys), topk 4\n\n" + AGREE_HEADER + "\n"
        text += "\n".join(self.agree) + "\n"
        with open(self.md, "w") as f:
            f.write(text)


TIME_HEADER = (
    "| model | c | N | margin | config | exact ms | fp8 ms | speedup | exact TFLOP/s | fp8 TFLOP/s | "
    "exact % bf16 mm | fp8 % fp8 mm | pass 1 ms | first call exact / fp8 ms | quantize ms |\n"
    "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)
AGREE_HEADER = "| model | c | N | margin | rows equal | recall |\n|---|---:|---:|---:|---:|---:|"


def run_point(args, out, name, c, N, mm_bf16, mm_fp8):
    H, Hkv, d = MODELS[name]
    topk = 4
    gen = torch.Generator(device="cuda").manual_seed(N + c)
    k_bytes = N * Hkv * d * 3  # bf16 keys + e4m3 keys
    copies = max(1, -(-L2_ROTATE_BYTES // k_bytes))
    free, _ = torch.cuda.mem_get_info()
    if copies * k_bytes * 1.5 > free:
        print(
            f"skip {name} N={N}: {copies * k_bytes / 1e9:.1f} GB of keys, {free / 1e9:.1f} GB free",
            flush=True,
        )
        return
    sets = []
    for _ in range(copies):
        q = torch.randn(c, H, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(N, Hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        sets.append([q, k, None, None])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in sets:
        mu = key_center(s[1])  # as the cache does: keys centred per channel, then scaled
        s[3] = key_scale(s[1], center=mu)
        s[2] = quantize_keys(s[1], s[3], center=mu)
    torch.cuda.synchronize()
    t_quant = (time.perf_counter() - t0) * 1e3 / copies
    flops = 2 * c * H * N * d

    def rot(f):
        it = iter(range(1 << 62))
        return lambda: f(*sets[next(it) % copies])

    exact = lambda q, k, k8, sc: score_topk(q, k, 0, N, topk)  # noqa: E731
    first_exact = first_call_ms(lambda: exact(*sets[0]))
    t_exact = bench(rot(exact))
    configs = [("default", None)] + [(c_, parse_config(c_)) for c_ in args.fp8_config]
    for label, cfg in configs:
        if cfg is None:
            fn = lambda q, k, k8, sc: score_topk_fp8(q, k, k8, sc, 0, N, topk, args.margin)  # noqa: E731
        else:
            fn = lambda q, k, k8, sc, cfg=cfg: score_topk_fp8_variant(  # noqa: E731
                q, k, k8, sc, 0, N, topk, args.margin, config=cfg, inexact=True
            )
        full = {**fp8_config(H // Hkv * c, d), **(cfg or {})}
        pass1 = lambda q, k, k8, sc, full=full: _fp8_first_pass(  # noqa: E731
            fold_query(q, sc), k8, 0, N, topk + args.margin, None, full
        )
        try:
            first_fp8 = first_call_ms(lambda fn=fn: fn(*sets[0]))
            t_fp8 = bench(rot(fn))
            t_pass1 = bench(rot(pass1))
        except Exception as e:  # a variant out of resources: say so, keep going
            print(f"{name} N={N} {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            out.record(
                {"model": name, "c": c, "N": N, "config": label, "error": f"{type(e).__name__}: {e}"[:500]}
            )
            continue
        rec = {"kind": "time", "model": name, "H": H, "Hkv": Hkv, "d": d, "c": c, "N": N, "topk": topk,
               "margin": args.margin, "config": label, "exact_ms": t_exact, "fp8_ms": t_fp8,
               "speedup": t_exact / t_fp8, "pass1_ms": t_pass1,
               "exact_tflops": flops / t_exact / 1e9, "fp8_tflops": flops / t_fp8 / 1e9,
               "mm_bf16_tflops": mm_bf16, "mm_fp8_tflops": mm_fp8, "first_call_exact_ms": first_exact,
               "first_call_fp8_ms": first_fp8, "quantize_ms": t_quant}  # fmt: skip
        out.record(rec)
        row = (
            f"| {name} | {c} | {N // 1024}K | {args.margin} | {label} | {t_exact:.3f} | {t_fp8:.3f} | "
            f"{t_exact / t_fp8:.2f}x | {rec['exact_tflops']:.0f} | {rec['fp8_tflops']:.0f} | "
            f"{100 * rec['exact_tflops'] / mm_bf16:.0f}% | {100 * rec['fp8_tflops'] / mm_fp8:.0f}% | "
            f"{t_pass1:.3f} | {first_exact:.0f} / {first_fp8:.0f} | {t_quant:.1f} |"
        )
        out.rows.append(row)
        print(row, flush=True)
        out.write()

    q, k, k8, sc = sets[0]
    _, ei = exact(q, k, k8, sc)
    ei = ei.sort(-1).values
    for m in args.agree_margins:
        _, i = score_topk_fp8(q, k, k8, sc, 0, N, topk, m)
        i = i.sort(-1).values
        equal = (i == ei).all(-1).float().mean().item()
        recall = (ei[..., :, None] == i[..., None, :]).any(-1).float().mean().item()
        out.record({"kind": "agree", "model": name, "c": c, "N": N, "topk": topk, "margin": m,
                    "rows_equal": equal, "recall": recall})  # fmt: skip
        line = f"| {name} | {c} | {N // 1024}K | {m} | {equal:.4f} | {recall:.4f} |"
        out.agree.append(line)
        print("agree " + line, flush=True)
        out.write()
    sets.clear()
    del q, k, k8, sc
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (results.jsonl, README.md)")
    p.add_argument("--n", type=int, nargs="+", default=[1 << 18, 1 << 20, 1 << 22])
    p.add_argument("--c", type=int, nargs="+", default=[2048])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--margin", type=int, default=4, help="margin of the timed fp8 calls")
    p.add_argument("--agree-margins", type=int, nargs="*", default=[0, 1, 2, 4, 8, 12])
    p.add_argument("--fp8-config", action="append", default=[], metavar="K=V[,K=V]",
                   help="also time this pass-1/pass-2 config of the fp8 path (repeatable)")  # fmt: skip
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise ConfigError("bench_fp8.py needs a CUDA GPU and none is visible: run it on a GPU machine")
    check_fp8("cuda")  # one line naming the GPU where it has no FP8 tensor cores
    dev = torch.cuda.get_device_name()
    mm_bf16, mm_fp8 = ceilings()
    print(
        f"{dev}: dense bf16 matmul {mm_bf16:.0f} TFLOP/s, dense fp8 matmul {mm_fp8:.0f} TFLOP/s", flush=True
    )
    head = (
        f"# score_topk_fp8 vs score_topk, {dev}\n\n"
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}\n"
        f"- command: `{' '.join([sys.executable.split('/')[-1]] + sys.argv)}`\n"
        f"- ceilings measured in this run (8192^3): dense bf16 matmul (torch.mm) {mm_bf16:.0f} TFLOP/s; "
        f"dense fp8 e4m3 matmul (torch._scaled_mm, bf16 out) {mm_fp8:.0f} TFLOP/s\n"
        f"- random bf16 q and keys, keys [0, N); TFLOP/s counts 2*c*H*N*d (the score pass) for both; ms is "
        f"do_bench's median, inputs rotated past L2; first call = compile + warm-up + one call (wall); "
        f"quantize = key_center + key_scale + quantize_keys per key set (not in the fp8 ms)\n"
    )
    out = Output(args.out, head)
    out.record({"kind": "ceilings", "device": dev, "mm_bf16_tflops": mm_bf16, "mm_fp8_tflops": mm_fp8,
                "torch": torch.__version__, "triton": triton.__version__, "argv": sys.argv})  # fmt: skip
    out.write()
    for name in args.models:
        for N in args.n:
            for c in args.c:
                try:
                    run_point(args, out, name, c, N, mm_bf16, mm_fp8)
                except torch.cuda.OutOfMemoryError as e:
                    print(f"OOM at {name} N={N} c={c}: {str(e).splitlines()[0]}", flush=True)
                    out.record({"model": name, "c": c, "N": N, "error": "OutOfMemoryError"})
                    torch.cuda.empty_cache()
    print(open(out.md).read())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
