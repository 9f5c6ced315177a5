"""Collective bandwidth and latency of this job's ranks: the numbers the scaling report's cost model uses.

Measures all_gather_into_tensor, all_to_all_single, all_reduce, reduce_scatter_tensor and broadcast
over a size sweep and reports nccl-tests' algorithm and bus bandwidth (bus bytes per call:
all-gather, all-to-all, reduce-scatter S(P-1)/P, all-reduce 2S(P-1)/P, broadcast S, for S the
size of the whole buffer), then fits ``t = latency + bus_bytes / bus_bandwidth`` per op.

Two H200s over NVLink (NCCL; NVLink multicast off, as on every multi-GPU host of ours):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --standalone --nproc_per_node 2 launch/bench_comm.py --out bench/comm-H200-p2.json

CPU ranks (gloo), small sizes:

    torchrun --standalone --nproc_per_node 2 launch/bench_comm.py --sizes 1K,64K,1M --out /tmp/comm.json

Timing: on GPUs CUDA events around ``--iters`` back-to-back calls after ``--warmup`` untimed ones;
on the CPU a barrier, then wall clock around the calls. The time per call is the slowest rank's.
Rank 0 prints the table and writes the JSON (read by ``launch/scaling.py --comm-bench``).

The process group comes from ``dist_reattn.distributed.init_from_env``; the timed calls go to
``torch.distributed`` directly (not through ``Comm``), on buffers allocated once per size, so the
numbers are the fabric's and not the engine wrapper's allocation and bookkeeping. This is a
benchmark script: the library's rule that only distributed.py calls collectives is about the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.distributed as dist

from dist_reattn.cli import run_main
from dist_reattn.config import ConfigError, parse_count
from dist_reattn.distributed import init_from_env, shutdown
from dist_reattn.report.scaling_model import alpha_beta

OPS = ("all_gather", "all_to_all", "all_reduce", "reduce_scatter", "broadcast")
GPU_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"
CPU_SIZES = "1K,16K,256K,4M"
ENV = (
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
    "NCCL_ALGO",
    "NCCL_PROTO",
)


def bus_factor(op: str, world: int) -> float:
    """Bus bytes per byte of the whole buffer S (nccl-tests)."""
    return {"all_reduce": 2 * (world - 1) / world, "broadcast": 1.0}.get(op, (world - 1) / world)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    p.add_argument(
        "--sizes", default=None, help=f"buffer sizes S in bytes, K/M suffixes (GPU default {GPU_SIZES})"
    )
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--iters", type=int, default=20, help="timed calls per size (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per size before timing (default 5)")
    p.add_argument("--backend", default="auto", help="auto (NCCL with GPUs, gloo without), nccl or gloo")
    p.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default bf16 on GPUs, fp32 on CPUs)")
    return p.parse_args(argv)


def _buffers(op: str, size: int, world: int, dtype, device) -> tuple:
    """(input, output) of one call with a whole buffer of ``size`` bytes (rounded to P elements)."""
    elem = torch.tensor([], dtype=dtype).element_size()
    n = max(world, size // elem // world * world)
    if op == "all_gather":
        return torch.ones(n // world, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
    if op == "reduce_scatter":
        return torch.ones(n, dtype=dtype, device=device), torch.empty(n // world, dtype=dtype, device=device)
    if op == "all_to_all":
        return torch.ones(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
    return torch.ones(n, dtype=dtype, device=device), None  # all_reduce, broadcast: in place


def _call(op: str, inp, out, group):
    # all_gather_single / reduce_scatter_single replace the *_tensor names in newer torch (same arguments)
    if op == "all_gather":
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, inp, group=group)
    elif op == "reduce_scatter":
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, inp, group=group)
    elif op == "all_to_all":
        dist.all_to_all_single(out, inp, group=group)
    elif op == "all_reduce":
        dist.all_reduce(inp, group=group)
    else:
        dist.broadcast(inp, src=0, group=group)


def time_op(op: str, size: int, comm, dtype, device, iters: int, warmup: int) -> tuple[float, int]:
    """(seconds per call, slowest rank; bytes of the whole buffer actually used)."""
    inp, out = _buffers(op, size, comm.world, dtype, device)
    for _ in range(warmup):
        _call(op, inp, out, comm.group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        dist.barrier(group=comm.group)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            _call(op, inp, out, comm.group)
        end.record()
        end.synchronize()
        secs = start.elapsed_time(end) / 1e3 / iters
    else:
        dist.barrier(group=comm.group)
        t0 = time.perf_counter()
        for _ in range(iters):
            _call(op, inp, out, comm.group)
        secs = (time.perf_counter() - t0) / iters
    t = torch.tensor([secs], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.group)
    whole = (out if op in ("all_gather",) else inp).numel() * inp.element_size()
    return float(t.item()), whole


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        ops = [o for o in args.ops.split(",") if o]
        bad = [o for o in ops if o not in OPS]
        if bad:
            raise ConfigError(f"--ops: unknown {', '.join(bad)} (give some of {', '.join(OPS)})")
        if args.iters < 1 or args.warmup < 0:
            raise ConfigError("--iters must be >= 1 and --warmup >= 0")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    comm = init_from_env(backend=args.backend)
    if comm.world < 2:
        print(
            "error: run under torchrun with 2 or more ranks (a single process moves nothing)", file=sys.stderr
        )
        return 2
    backend = dist.get_backend(comm.group)
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = names[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sizes = [
        parse_count(s) for s in (args.sizes or (GPU_SIZES if device.type == "cuda" else CPU_SIZES)).split(",")
    ]
    result = {
        "kind": "bench_comm",
        "world": comm.world,
        "backend": backend,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": platform.node(),
        "torch": torch.__version__,
        "env": {k: os.environ[k] for k in ENV if k in os.environ},
        "iters": args.iters,
        "warmup": args.warmup,
        "ops": {},
        "skipped": {},
    }
    for op in ops:
        points = []
        try:
            for size in sizes:
                secs, whole = time_op(op, size, comm, dtype, device, args.iters, args.warmup)
                bus = whole * bus_factor(op, comm.world)
                points.append(
                    {
                        "bytes": whole,
                        "bus_bytes": bus,
                        "seconds": secs,
                        "algbw_Bps": whole / secs,
                        "busbw_Bps": bus / secs,
                    }
                )
        except (RuntimeError, ValueError) as e:  # an op the backend lacks (gloo reduce_scatter on old torch)
            result["skipped"][op] = str(e).splitlines()[0][:200]
            continue
        entry = {"points": points, "peak_busbw_Bps": max(p["busbw_Bps"] for p in points)}
        if len(points) >= 2:
            entry["latency_s"], entry["busbw_Bps"] = alpha_beta(points)
        else:
            entry["latency_s"], entry["busbw_Bps"] = points[0]["seconds"], points[0]["busbw_Bps"]
        result["ops"][op] = entry
    if comm.rank == 0:
        print(f"{backend}, {comm.world} ranks, {result['device']}, {result['dtype']}, {args.iters} iters")
        print(f"{'op':>15} {'size':>10} {'time us':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}")
        for op, e in result["ops"].items():
            for p in e["points"]:
                print(
                    f"{op:>15} {p['bytes']:>10} {p['seconds'] * 1e6:>10.1f} {p['algbw_Bps'] / 1e9:>11.2f} "
                    f"{p['busbw_Bps'] / 1e9:>11.2f}"
                )
            print(f"{op:>15} fit: latency {e['latency_s'] * 1e6:.1f} us, bus {e['busbw_Bps'] / 1e9:.2f} GB/s")
        for op, why in result["skipped"].items():
            print(f"{op:>15} skipped: {why}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    dist.barrier(group=comm.group)
    shutdown(comm)  # stops the heartbeat thread before the store goes away
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
