"""Decode speed: the CUDA-graph step against the plain step, the memory roofline and the HF model.

    python launch/bench_decode.py --model smollm2-135m --len 128K,1M --out launch/results/bench_decode-H200-2026-12-01
    torchrun --standalone --nproc_per_node 2 launch/bench_decode.py --model smollm2-135m --len 4M --out DIR

Under torchrun every rank holds its striped share of the cache and the whole model (the
``sequence`` layout's decode): the graph holds the candidate exchange and the log-sum-exp merge of
the per-owner partials (NCCL), and rank 0 writes the results.

For every length the KV cache is filled with random pre-RoPE keys and values (what a token reads, and
so the time, does not depend on their values; a prefill of 1M tokens would take a minute), then,
from the same state:

* ``graph``: greedy tokens by CUDA graph replay (:class:`~dist_reattn.decode.GreedyDecoder`); its
  warm-up (eager steps with compilation, and the capture) is timed apart;
* ``plain``: the prefill's step (``Engine.step``) fed one token at a time, first step (compilation)
  apart; how many leading tokens it shares with the graph's is recorded (its attention is SDPA, the
  graph's an fp32 softmax: they can part at a near-tie);
* ``hf``: the unmodified Hugging Face model's own decode, full attention through SDPA, its
  ``DynamicCache`` filled with random keys and values of the same length (where it fits; one
  process only: the HF model does not shard its cache);
* at the longest length, ``--same-tokens`` tokens by replay against the same static step run eagerly
  (uncaptured): the tokens must be identical.

Ceilings measured in the same run: the device-to-device copy rate (bytes read + written per second of
a large ``copy_``), and the roofline of one token: the bytes it must read at least (every middle key
of every layer for the scoring, the scope's keys and values, every weight once) over that rate; with
P ranks, the bytes of the busiest rank (its share of the middle keys and of the scope, every weight).
Writes ``OUT/results.jsonl`` (one line per length) and ``OUT/README.md`` (the table and the command).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import platform
import sys
import time

import torch

from dist_reattn.cli import check_out_dir, run_main
from dist_reattn.config import (
    ConfigError,
    add_model_args,
    config_for_model,
    format_count,
    parse_args_with_overrides,
    parse_count,
)
from dist_reattn.decode import GreedyDecoder, graph_reason
from dist_reattn.distributed import init_from_env, shutdown
from dist_reattn.engine import Engine
from dist_reattn.models.adapter import ReAttnModel
from dist_reattn.models.load import load_model
from dist_reattn.report.results import append_record
from dist_reattn.runtime import prepare
from dist_reattn.select import fuses_mass


def copy_rate(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device ``copy_`` of ``nbytes``: bytes read + written per second (the best of ``reps``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) / 1e3)
    return 2 * nbytes / best


def token_bytes(engine: Engine, n: int, weight_bytes: int) -> int:
    """The bytes one decode token at ``n`` cached tokens must read on one rank: its share of the
    middle keys (scored) and of the scope's keys and values, each counted as 1/P rounded up plus one
    page (the most any rank holds of the middle, one run of striped pages; the scope's several runs
    can put up to a page per run more on one rank, which this count leaves out), every weight (each
    rank runs the whole model). ``scope.select=mass`` / ``mass_shared`` score every row of the
    rank's cache (``mass_candidates``); ``mass_shared`` reads the scope and the weights twice."""
    cfg, c = engine.scope, engine.cache
    layers, rows, hkv, d = c.k.shape
    row = hkv * d * c.k.element_size()  # one token's K (or V) of one layer
    middle = max(n - cfg.sink - cfg.local, 0) if cfg.mode == "reattention" and cfg.topk else 0
    scope = cfg.max_scope() if cfg.mode == "reattention" else cfg.sink + cfg.local
    share = lambda m: min(m, -(-m // c.world) + c.page)  # noqa: E731
    scored = rows if middle and fuses_mass(cfg, 1) else share(middle)
    passes = 2 if middle and cfg.select == "mass_shared" else 1
    return layers * row * (scored + passes * 2 * share(scope)) + passes * weight_bytes


def fill_cache(engine: Engine, n: int, seed: int) -> None:
    """Random pre-RoPE K/V for tokens ``[0, n)`` of every layer (this rank's rows of them); the
    engine then holds ``n`` tokens."""
    gen = torch.Generator(device=engine.cache.k.device).manual_seed(seed + engine.comm.rank)
    rows = engine.cache.local_count(n)
    for t in (engine.cache.k, engine.cache.v):
        for layer in range(t.shape[0]):
            t[layer, :rows].normal_(generator=gen)
    engine.reset()
    engine.n = n


def hf_decode(hf, n: int, tokens: int, first: int) -> float:
    """ms/token of the unmodified model's greedy decode after a random ``DynamicCache`` of ``n`` tokens
    (full attention, SDPA), the first step untimed."""
    from transformers import DynamicCache

    cfg = hf.config
    hkv = cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, hkv, n, d, dtype=hf.dtype, device=hf.device)
        cache.update(k, torch.randn_like(k), layer)
    ids = torch.tensor([[first]], device=hf.device)
    # transformers >= 5.24 names the cache argument ``cache`` (``past_key_values`` is deprecated there)
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    t0 = None
    for i in range(tokens + 1):
        if i == 1:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        pos = torch.tensor([[n + i]], device=hf.device)
        out = hf(input_ids=ids, position_ids=pos, cache_position=pos[0], use_cache=True, **{name: cache})
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / tokens


def plain_steps(engine: Engine, first: int, tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens by the prefill's step, one token per step: (tokens, seconds of the first step,
    ms per step after it)."""
    out, t = [first], [time.perf_counter()]
    for i in range(tokens):
        out.append(int(engine.step(torch.tensor([out[-1]]), stage="decode").argmax()))
        if i in (0, tokens - 1):
            torch.cuda.synchronize()
            t.append(time.perf_counter())
    return out, t[1] - t[0], 1e3 * (t[-1] - t[1]) / max(tokens - 1, 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--len", default="128K,1M", help="comma list of cached tokens (K = 1024, M = 1024 K)")
    p.add_argument("--tokens", type=int, default=64, help="timed tokens per path and length")
    p.add_argument(
        "--same-tokens",
        type=int,
        default=1024,
        help="tokens compared replayed vs eager at the longest length",
    )
    p.add_argument("--no-plain", action="store_true", help="skip the plain step (slow at long lengths)")
    p.add_argument(
        "--no-hf", action="store_true", help="skip the unmodified HF model (always skipped with P > 1)"
    )
    p.add_argument("--out", required=True, help="output directory")
    args = parse_args_with_overrides(p, argv)
    if not torch.cuda.is_available():
        raise ConfigError("bench_decode.py needs a CUDA GPU and none is visible: run it on a GPU machine")
    if args.tokens < 2 or args.same_tokens < 0:
        raise ConfigError("--tokens must be >= 2 and --same-tokens >= 0")
    lengths = [parse_count(x) for x in args.len.split(",")]
    cfg = config_for_model(args.model, args.config, args.overrides)
    if cfg.scope.mode == "full":
        raise ConfigError("--scope.mode=full has no bounded scope to capture: use reattention or streaming")
    if cfg.parallel.layout == "tensor":
        raise ConfigError(
            "--parallel.layout=tensor has no graph decode: bench_decode.py runs the sequence layout"
        )
    out = check_out_dir(args.out)
    comm = init_from_env(cfg.dist.timeout_s, cfg.dist.backend)
    try:
        return bench(args, argv, cfg, lengths, out, comm)
    finally:
        shutdown(comm)


def bench(args, argv, cfg, lengths: list[int], out, comm) -> int:
    room = max(args.tokens, args.same_tokens) + 4
    capacity = max(lengths) + room
    prep = prepare(cfg, capacity, comm)
    lead = comm.rank == 0
    say = print if lead else (lambda *a, **k: None)
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    hf = load_model(prep.source, prep.dtype, prep.device)
    weight_bytes = sum(t.numel() * t.element_size() for t in hf.parameters())
    run_hf = not args.no_hf and comm.world == 1
    plain_hf = copy.deepcopy(hf) if run_hf else None  # before the adapter changes hf in place
    if plain_hf is not None:
        plain_hf.set_attn_implementation("sdpa")
    engine = Engine(
        ReAttnModel(hf, comm), cfg.scope, capacity, comm=comm, page=cfg.cache.page, decode=cfg.parallel.decode
    )
    gpu = torch.cuda.get_device_name()
    rate = copy_rate()
    say(f"{gpu} x {comm.world}, torch {torch.__version__}, {prep.dtype}; copy ceiling {rate / 1e9:,.0f} GB/s")
    rows = []
    for n in lengths:
        row: dict = {"len": n}
        fill_cache(engine, n, seed=n)
        reason = graph_reason(engine.view())
        if reason:
            raise ConfigError(f"--len {format_count(n)}: no CUDA graph decode here ({reason})")
        first = 7  # any token id: the state is random anyway
        g = GreedyDecoder(engine.view()).run(first, args.tokens + 3, eos=set())  # 2 warm-up steps, replays
        row.update(graph_ms=g.ms_per_token, graph_warmup_s=g.warmup_seconds, captured=g.graph)
        if not args.no_plain:
            tokens, row["plain_warmup_s"], row["plain_ms"] = plain_steps(engine, first, args.tokens + 1)
            engine.n = n
            row["plain_common_prefix"] = common_prefix(tokens, g.tokens)
            row["plain_compared"] = min(len(tokens), len(g.tokens))
        if run_hf:
            try:
                torch.cuda.empty_cache()
                row["hf_ms"] = hf_decode(plain_hf, n, args.tokens, first)
            except torch.OutOfMemoryError:
                row["hf_ms"] = None
                row["hf_note"] = "out of memory"
            torch.cuda.empty_cache()
        b = token_bytes(engine, n, weight_bytes)
        row.update(
            bytes_per_token=b,
            roofline_ms=1e3 * b / rate,
            graph_gb_s=b / (row["graph_ms"] / 1e3) / 1e9,
        )
        if n == max(lengths) and args.same_tokens:
            rep = GreedyDecoder(engine.view()).run(first, args.same_tokens, eos=set())
            eager = GreedyDecoder(engine.view(), capture=False).run(first, args.same_tokens, eos=set())
            row.update(
                same_tokens=args.same_tokens,
                replay_equals_eager=rep.tokens == eager.tokens,
                replay_eager_common_prefix=common_prefix(rep.tokens, eager.tokens),
                eager_ms=eager.ms_per_token,
            )
        rows.append(row)
        if lead:
            append_record(
                out / "results.jsonl",
                {**row, "gpu": gpu, "world": comm.world, "dtype": str(prep.dtype), "scope": vars(cfg.scope)},
            )
        say(json.dumps(row))
    if not lead:
        return 0
    launcher = "python" if comm.world == 1 else f"torchrun --standalone --nproc_per_node {comm.world}"
    lines = [
        f"# Decode: CUDA-graph step, plain step, HF model; {comm.world} x {gpu}, {datetime.date.today()}",
        "",
        "```",
        f"{launcher} launch/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "```",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {prep.dtype}, model {cfg.model.path}; "
        f"scope {vars(cfg.scope)}. Cache filled with random K/V; {args.tokens} timed tokens per path, "
        "warm-up (compilation, capture) apart.",
        f"Copy ceiling (this run, rank 0's GPU): {rate / 1e9:,.0f} GB/s read + written. Roofline: the bytes "
        "a token must read on one rank (its share of the middle keys of every layer and of the scope's "
        "K/V, every weight) at that rate.",
        "",
        "| cached tokens | graph ms/token | plain ms/token | HF full attention ms/token | GB/token | "
        "roofline ms | graph GB/s | graph / roofline | graph warm-up s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['len']:,} | {r['graph_ms']:.2f} | {fmt(r.get('plain_ms'))} | "
            f"{fmt(r.get('hf_ms')) if 'hf_note' not in r else r['hf_note']} | {r['bytes_per_token'] / 1e9:.2f} | "
            f"{r['roofline_ms']:.2f} | {r['graph_gb_s']:,.0f} | {r['graph_ms'] / r['roofline_ms']:.2f} | "
            f"{r['graph_warmup_s']:.1f} |"
        )
    lines.append("")
    for r in rows:
        if "plain_common_prefix" in r:
            lines.append(
                f"* {r['len']:,}: the plain step's first {r['plain_common_prefix']} of {r['plain_compared']} "
                "tokens equal the graph's (its attention is SDPA in bf16, the graph's fp32 softmax: "
                "random K/V make near-ties, where rounding can flip a token)"
            )
        if "same_tokens" in r:
            lines.append(
                f"* {r['len']:,}: {r['same_tokens']} tokens replayed equal the same step run eagerly "
                f"({r['eager_ms']:.1f} ms/token): {r['replay_equals_eager']}"
            )
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(run_main(main))
