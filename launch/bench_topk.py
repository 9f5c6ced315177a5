"""Benchmark of the score + top-k kernel against its ceilings and baselines, on one GPU.

Measures, in one run: the dense bf16 matmul rate (8192^3, random) and the device copy bandwidth
(bytes read + written), then for SmolLM2 (9/3 heads x 64) and Llama-8B (32/8 x 128) shapes and every
N x c: the kernel (do_bench median), the torch reference (``score_topk_ref`` on the GPU) and SDPA over
the same q and keys. The kernel is timed at topk 4 (the engine's default, the headline table) and
topk 16 (second table); the reference (whose cost hardly depends on topk) and SDPA once, at topk 4.

    python launch/bench_topk.py --out launch/results/bench_topk-H100-2026-11-24.md
    python launch/bench_topk.py --sweep        # tile/split variants at a few points, no table
    python launch/bench_topk.py --variants     # merge variants and the scores-only floor

``--compare FILE`` times only the kernel, for each ``--config`` (overrides such as ``FILTER=0``,
run through the private ``kernels/_variants.py``, inexact baselines ``FILTER=2`` and ``SCORE_ONLY`` included),
at ``--models`` x ``--n`` x ``--c`` x ``--topk``, beside FILE's figures (a table this script wrote)
and the ceilings measured in the same run. The two-pass filters at topk 4, c = 2048 (issue 13;
FILTER 2 is session 4's inexact filter, the same-run baseline), about a minute:

    python launch/bench_topk.py --compare launch/results/bench_topk-twopass-H100-2026-11-24.md \
        --c 2048 --n 262144 1048576 4194304 --topk 4 --config FILTER=2 --config FILTER=1 --config FILTER=0
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import re
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from dist_reattn.cli import run_main
from dist_reattn.config import ConfigError
from dist_reattn.kernels import score_topk, score_topk_ref
from dist_reattn.kernels._variants import score_topk_variant
from dist_reattn.kernels.score_topk import default_config

MODELS = {"SmolLM2": (9, 3, 64), "Llama-8B": (32, 8, 128)}
TOPKS = (4, 16)  # the first is the headline: the engine's default (DESIGN.md section 2)
L2_ROTATE_BYTES = 256 << 20  # inputs smaller than this get several copies, cycled per call


def bench(fn, slow_ms: float = 200.0) -> float:
    """Median ms. Calls slower than ``slow_ms`` (the reference at large sizes) are timed 3 times
    with CUDA events instead of do_bench's 100 ms budget plus estimation runs."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    stop.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(stop)
    if first < slow_ms:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = [first]
    for _ in range(2):
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[1]


def ceilings() -> tuple[float, float]:
    """(dense bf16 matmul TFLOP/s, device copy GB/s counting read + write), measured now."""
    n = 8192
    ab = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    ms = do_bench(lambda: torch.mm(*ab), warmup=50, rep=300, return_mode="median")
    tflops = 2 * n**3 / ms / 1e9
    ab.clear()
    src_dst = [torch.randn(1 << 29, device="cuda", dtype=torch.float32)]  # 2 GiB
    src_dst.insert(0, torch.empty_like(src_dst[0]))
    ms = do_bench(lambda: src_dst[0].copy_(src_dst[1]), warmup=25, rep=200, return_mode="median")
    gbs = 2 * (1 << 29) * 4 / ms / 1e6
    src_dst.clear()
    torch.cuda.empty_cache()
    return tflops, gbs


def sdpa_fn(q, k, v):
    """SDPA over q [c, H, d] and keys k/v [N, Hkv, d], no mask; GQA through enable_gqa (flash)."""
    qq = q.transpose(0, 1).unsqueeze(0)  # [1, H, c, d]
    kk = k.transpose(0, 1).unsqueeze(0)  # [1, Hkv, N, d]
    vv = v.transpose(0, 1).unsqueeze(0)
    return lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)


def rotating(make, nbytes):
    """A callable cycling over enough input copies that together they overflow L2."""
    copies = max(1, -(-L2_ROTATE_BYTES // max(nbytes, 1)))
    sets = [make() for _ in range(copies)]
    it = itertools.cycle(sets)
    return lambda f: lambda: f(*next(it))


def run_table(args, mm_tflops, copy_gbs):
    """Rows ``(model, c, N, {topk: kernel ms}, ref ms, SDPA ms)``, printed as they come."""
    rows = []
    free, _ = torch.cuda.mem_get_info()
    for name, (H, Hkv, d) in MODELS.items():
        for N in args.n:
            for c in args.c:
                kv_bytes = 2 * N * Hkv * d * 2  # k and v, bf16
                if kv_bytes * 1.3 > free:
                    print(f"skip {name} N={N} c={c}: k+v need {kv_bytes / 1e9:.1f} GB, {free / 1e9:.1f} free")
                    continue
                gen = torch.Generator(device="cuda").manual_seed(N + c)

                def make(c=c, N=N, H=H, Hkv=Hkv, d=d, gen=gen):
                    q = torch.randn(c, H, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                    k = torch.randn(N, Hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
                    return q, k

                rot = rotating(make, N * Hkv * d * 2)
                t_kern = {tk: bench(rot(lambda q, k, N=N, tk=tk: score_topk(q, k, 0, N, tk))) for tk in TOPKS}
                if c == 1:  # decode calls are short enough for the host to set the pace
                    t_gpu = {
                        tk: gpu_ms(rot(lambda q, k, N=N, tk=tk: score_topk(q, k, 0, N, tk))) for tk in TOPKS
                    }
                    t_kern = {tk: (t_kern[tk], t_gpu[tk]) for tk in TOPKS}
                t_ref = None
                if not args.no_ref:
                    t_ref = bench(rot(lambda q, k, N=N: score_topk_ref(q, k, 0, N, TOPKS[0])))
                q, k = make()
                v = torch.randn_like(k)
                try:
                    t_sdpa = bench(sdpa_fn(q, k, v))
                except RuntimeError as e:  # no fused backend for this shape
                    print(f"SDPA failed for {name} N={N} c={c}: {str(e).splitlines()[0]}")
                    t_sdpa = None
                del q, k, v, rot
                torch.cuda.empty_cache()
                rows.append((name, c, N, t_kern, t_ref, t_sdpa, H, Hkv, d))
                for tk in TOPKS:
                    print(f"topk {tk}: " + fmt_row(rows[-1], tk, mm_tflops, copy_gbs), flush=True)
    return rows


HEADER = (
    "| model | c | N | kernel ms | TFLOP/s | % matmul | GB/s (c=1) | % copy | GPU-only ms (c=1) | GPU-only % copy "
    "| ref ms | vs ref | SDPA ms | kernel/SDPA |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def gpu_ms(fn, reps: int = 50) -> float:
    """GPU time per call of the kernels ``fn`` launches (profiler), host gaps between them left out."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / reps / 1e3


def fmt_row(r, topk, mm_tflops, copy_gbs):
    name, c, N, t_kern, t_ref, t_sdpa, H, Hkv, d = r
    t, t_gpu = t_kern[topk] if c == 1 else (t_kern[topk], None)
    tflops = 2 * c * N * H * d / t / 1e9
    k_bytes = N * Hkv * d * 2
    bw = "- | - | - | -"
    if c == 1:
        gbs, gpu_gbs = k_bytes / t / 1e6, k_bytes / t_gpu / 1e6
        bw = f"{gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {t_gpu:.3f} | {100 * gpu_gbs / copy_gbs:.0f}%"
    ref = f"{t_ref:.3f} | {t_ref / t:.1f}x" if t_ref else "- | -"
    sd = f"{t_sdpa:.3f} | {t / t_sdpa:.2f}" if t_sdpa else "- | -"
    pct = 100 * tflops / mm_tflops
    return f"| {name} | {c} | {N // 1024}K | {t:.3f} | {tflops:.1f} | {pct:.0f}% | {bw} | {ref} | {sd} |"


def time_kernel(q, k, N, topk, splits, cfg):
    # inexact: the variants include the scores-only floor, whose results are meaningless
    return do_bench(
        lambda: score_topk_variant(q, k, 0, N, topk, splits=splits, config=cfg, inexact=True),
        warmup=10,
        rep=40,
        return_mode="median",
    )


def random_qk(name: str, c: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 queries ``[c, H, d]`` and keys ``[N, Hkv, d]`` of a model's shapes, on the GPU."""
    H, Hkv, d = MODELS[name]
    q = torch.randn(c, H, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(N, Hkv, d, device="cuda", dtype=torch.bfloat16)
    return q, k


def variants():
    """The default kernel vs its variants at a few points. Prefill: the one-pass kernel (v3) with its
    packed merge (MERGE 0) and two-pass merge (MERGE 1), v2's tiles (128 x 128, 4 warps) and its
    scores-only floor (dot + row max, no top-k); at topk <= 4 the default is the two-pass path.
    Decode: MERGE 0 against MERGE 1 (the default)."""
    points = [("Llama-8B", 2048, 256 << 10), ("SmolLM2", 2048, 256 << 10), ("Llama-8B", 1, 1 << 20),
              ("Llama-8B", 1, 256 << 10), ("SmolLM2", 1, 256 << 10)]  # fmt: skip
    for name, c, N in points:
        H, Hkv, d = MODELS[name]
        q, k = random_qk(name, c, N)
        for topk in TOPKS:
            if c == 1:
                labels = [("default", None), ("MERGE 0", {"MERGE": 0}), ("MERGE 1", {"MERGE": 1})]
            else:
                one = default_config(c * H // Hkv, d, topk, two_pass=False)
                v2 = {"TWO_PASS": False, "BLOCK_M": 128, "BLOCK_N": 128 if d >= 128 else 32, "num_warps": 4,
                      "num_stages": 2}  # fmt: skip
                labels = [("default", None), ("one-pass", one), ("one-pass MERGE 1", {**one, "MERGE": 1}),
                          ("v2 tiles", v2), ("one-pass scores only", {**one, "SCORE_ONLY": True})]  # fmt: skip
            for label, cfg in labels:
                t = time_kernel(q, k, N, topk, None, cfg)
                tflops, gbs = 2 * c * N * H * d / t / 1e9, N * Hkv * d * 2 / t / 1e6
                print(
                    f"{name} c={c} N={N} topk={topk} {label}: {t:.3f} ms {tflops:.0f} TFLOP/s {gbs:.0f} GB/s",
                    flush=True,
                )
        del q, k
        torch.cuda.empty_cache()


def sweep():
    """Kernel time per tile config / split count at a few points (for tuning; prints only)."""
    points = [("Llama-8B", 2048, 256 << 10), ("SmolLM2", 2048, 256 << 10), ("Llama-8B", 1, 1 << 20),
              ("SmolLM2", 1, 1 << 20), ("Llama-8B", 512, 256 << 10)]  # fmt: skip
    for name, c, N in points:
        H, Hkv, d = MODELS[name]
        q, k = random_qk(name, c, N)
        if c == 1:
            cfgs = [dict(BLOCK_M=16, BLOCK_N=bn, num_warps=w, num_stages=s) for bn in (64, 128, 256)
                    for w in (4, 8) for s in (3, 4)]  # fmt: skip
        else:
            cfgs = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, TWO_PASS=tp) for bm in (64, 128, 256)
                    for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3) for tp in (False, True)]  # fmt: skip
        for topk in TOPKS:
            for cfg in cfgs:
                if cfg.get("TWO_PASS") and topk > 4:
                    continue
                for sp in (None, 1, 4):
                    tag = f"{name} c={c} N={N} topk={topk} {cfg} splits={sp}"
                    try:
                        t = time_kernel(q, k, N, topk, sp, cfg)
                    except Exception as e:  # out of resources for this config
                        print(f"{tag}: {type(e).__name__}")
                        continue
                    tflops, gbs = 2 * c * N * H * d / t / 1e9, N * Hkv * d * 2 / t / 1e6
                    print(f"{tag}: {t:.3f} ms {tflops:.0f} TFLOP/s {gbs:.0f} GB/s", flush=True)
        del q, k
        torch.cuda.empty_cache()


def parse_config(text: str) -> dict:
    """``"FILTER=0,BLOCK_M2=32"`` -> ``{"FILTER": 0, "BLOCK_M2": 32}`` (ints, True/False); ``""`` -> {}."""
    cfg = {}
    for item in filter(None, text.split(",")):
        key, _, val = (x.strip() for x in item.partition("="))
        cfg[key] = {"True": True, "False": False}[val] if val in ("True", "False") else int(val)
    return cfg


def read_table(path: str) -> tuple[float | None, dict]:
    """A table this script wrote: ``(matmul TFLOP/s of its run, {(topk, model, c, N in K): kernel ms})``."""
    text = open(path).read()
    m = re.search(r"dense bf16 matmul 8192\^3 (\d+(?:\.\d+)?) TFLOP/s", text)
    figures, topk = {}, None
    for line in text.splitlines():
        if line.startswith("## topk "):
            topk = int(line.split()[2])
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        if topk is not None and len(cells) > 3 and cells[0] in MODELS and cells[2].endswith("K"):
            figures[(topk, cells[0], int(cells[1]), int(cells[2][:-1]))] = float(cells[3])
    return (float(m.group(1)) if m else None), figures


def compare(args, mm_tflops):
    """Kernel ms per ``--config`` at every point, beside the figures of ``args.compare``."""
    old_tflops, old = read_table(args.compare)
    configs = [(c or "default", parse_config(c)) for c in (args.config or [""])]
    head = "| model | c | N | topk | committed ms | committed % matmul |"
    rule = "|---|---:|---:|---:|---:|---:|"
    for label, _ in configs:
        head += f" {label} ms | vs committed | % matmul |"
        rule += "---:|---:|---:|"
    lines = []
    print(head + "\n" + rule, flush=True)
    for name in args.models:
        H, Hkv, d = MODELS[name]
        for N in args.n:
            for c in args.c:

                def make(c=c, N=N, H=H, Hkv=Hkv, d=d):
                    q = torch.randn(c, H, d, device="cuda", dtype=torch.bfloat16)
                    k = torch.randn(N, Hkv, d, device="cuda", dtype=torch.bfloat16)
                    return q, k

                rot = rotating(make, N * Hkv * d * 2)
                flops = 2 * c * N * H * d
                for topk in args.topk:
                    ref = old.get((topk, name, c, N // 1024))
                    ref_pct = f"{100 * flops / ref / 1e9 / old_tflops:.0f}%" if ref and old_tflops else "-"
                    row = f"| {name} | {c} | {N // 1024}K | {topk} | {ref if ref else '-'} | {ref_pct} |"
                    for _, cfg in configs:
                        t = bench(  # inexact: FILTER=2 is a same-run baseline
                            rot(
                                lambda q, k, N=N, tk=topk, cfg=cfg: score_topk_variant(
                                    q, k, 0, N, tk, config=cfg, inexact=True
                                )
                            )
                        )
                        vs = f"{t / ref:.3f}" if ref else "-"
                        row += f" {t:.3f} | {vs} | {100 * flops / t / 1e9 / mm_tflops:.0f}% |"
                    lines.append(row)
                    print(row, flush=True)
                del rot
                torch.cuda.empty_cache()
    return (
        f"- compared with `{args.compare}` (its matmul ceiling {old_tflops} TFLOP/s); vs committed = "
        f"this run's ms / the committed ms; % matmul against each run's own ceiling\n\n"
        + "\n".join([head, rule] + lines)
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1 << 16, 1 << 18, 1 << 20, 1 << 22])
    p.add_argument("--c", type=int, nargs="+", default=[1, 512, 2048])
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.add_argument("--sweep", action="store_true", help="time tile/split variants instead")
    p.add_argument("--variants", action="store_true", help="time the kernel's variants instead")
    p.add_argument("--no-ref", action="store_true", help="skip the (slow) torch reference")
    p.add_argument(
        "--compare", metavar="FILE", help="time the kernel only, per --config, beside FILE's table"
    )
    p.add_argument(
        "--config",
        action="append",
        metavar="K=V[,K=V]",
        help="with --compare: kernel config overrides to time (repeatable; default: the defaults)",
    )
    p.add_argument("--topk", type=int, nargs="+", default=list(TOPKS), help="with --compare: topks to time")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="with --compare")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise ConfigError("bench_topk.py needs a CUDA GPU and none is visible: run it on a GPU machine")
    if args.sweep or args.variants:
        sweep() if args.sweep else variants()
        return 0
    dev = torch.cuda.get_device_name()
    mm_tflops, copy_gbs = ceilings()
    print(f"{dev}: dense bf16 matmul {mm_tflops:.0f} TFLOP/s, d2d copy {copy_gbs:.0f} GB/s", flush=True)
    if args.compare:
        table = compare(args, mm_tflops)
        text = (
            f"# score_topk comparison, {dev}\n\n"
            f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
            f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}\n"
            f"- command: `{' '.join([sys.executable.split('/')[-1]] + sys.argv)}`\n"
            f"- ceilings measured in this run: dense bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s; "
            f"d2d copy {copy_gbs:.0f} GB/s (read + write)\n"
            f"- bf16 inputs, keys [0, N); kernel ms is wall time on the stream (do_bench median, inputs "
            f"rotated past L2)\n{table}\n"
        )
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return
    rows = run_table(args, mm_tflops, copy_gbs)
    head = (
        f"# score_topk benchmark, {dev}\n\n"
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}\n"
        f"- torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}\n"
        f"- command: `{' '.join([sys.executable.split('/')[-1]] + sys.argv)}`\n"
        f"- ceilings measured in this run: dense bf16 matmul 8192^3 {mm_tflops:.0f} TFLOP/s; "
        f"d2d copy {copy_gbs:.0f} GB/s (read + write)\n"
        f"- bf16 inputs, keys [0, N); TFLOP/s counts 2*c*N*H*d; GB/s counts reading K once "
        f"(N*Hkv*d*2 bytes); kernel ms is wall time on the stream (do_bench: CUDA events), GPU-only ms "
        f"(c = 1) the kernels' own time summed (torch profiler), without the host's launch gaps; vs ref = ref time (score_topk_ref on the GPU, topk {TOPKS[0]}) / kernel time; "
        f"kernel/SDPA = kernel time / SDPA time (SDPA over the same q and keys)\n"
    )
    tables = []
    for tk in TOPKS:
        title = f"## topk {tk}" + (" (the engine's default)" if tk == TOPKS[0] else "")
        tables.append("\n".join([title, "", HEADER] + [fmt_row(r, tk, mm_tflops, copy_gbs) for r in rows]))
    text = head + "\n" + "\n\n".join(tables) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
