"""Scaling reports (dist_reattn.report.scaling*, launch/scaling.py) on synthetic NIAH records in the
exact format launch/niah.py writes, plus one record copied from a real 2-rank CPU run."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dist_reattn.report.results import append_record
from dist_reattn.report.scaling import (
    ScalingError,
    Source,
    auto_series,
    collectives,
    compress_sources,
    explicit_series,
    load_points,
    memory,
    phases,
    rank_phases,
    scoring_pairs,
    sqrt_length,
    telemetry,
)

ROOT = Path(__file__).resolve().parent.parent
REAL = Path(__file__).resolve().parent / "data" / "niah_record_cpu_p2.jsonl"  # P=2, 1500 tokens, CPU
K = 1024


def brute_pairs(n, sink=32, local=4096, chunk=512):
    """Scored q.k pairs counted token by token: query t (0-based) sits in the chunk that ends at e, and
    is scored against the middle [sink, e - local) of the cache after that chunk's append."""
    total = 0
    for t in range(n):
        e = min((t // chunk + 1) * chunk, n)
        total += max(e - sink - local, 0)
    return total


def _load_launcher():
    spec = importlib.util.spec_from_file_location("scaling_launcher", ROOT / "launch" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(world, target, prefill_s, *, depth=0.5, trial=0, decode="lse", gpu=False, kv_heads=3, shares=None):
    """A NIAH record as launch/niah.py writes it; phase times add up to ``prefill_s`` on every rank.

    ``shares``: {phase: share of prefill_s} for the compute phases (default scoring 0.3, ...).
    """
    n = target - 2  # prompts come out a few tokens short of the requested length
    comm = {"topk_candidates": 0.1, "qkv_heads": 0.05, "scope_kv": 0.05} if world > 1 else {}
    compute = shares or {"scoring": 0.3, "selection": 0.1, "attention": 0.1, "kv_fetch": 0.02, "append": 0.03}
    compute = {**compute, "model": 1.0 - sum(compute.values()) - sum(comm.values())}
    seconds = {**compute, **{f"comm:{k}": v for k, v in comm.items()}}

    def profile(scale):
        pre = {k: v * prefill_s * scale for k, v in seconds.items()}
        return {
            "prefill": {"seconds": pre, "total_s": sum(pre.values()), "steps": n // 512 + 1, "tokens": n},
            "decode": {"seconds": {"model": 1.0}, "total_s": 1.0, "steps": 15, "tokens": 15},
        }

    colls = {
        k: {"calls": 100, "bytes": 1000 * (i + 1) * world, "seconds": v}
        for i, (k, v) in enumerate(comm.items())
    }
    kv = -(-n // world) * 30 * 3 * 64 * 2 * 4
    plan = {"device": "cpu", "kv_bytes": kv, "weight_bytes": 538060032, "activation_bytes": 71288832}
    ranks = []
    for r in range(world):
        if gpu:
            tele = {
                "gpu": "NVIDIA H100",
                "index": r,
                "samples": 50,
                "seconds": prefill_s,
                "memory_used_max_bytes": 2 * 2**30,
            }
            tele.update(power_w_mean=300.0 + r, power_w_max=400.0, util_mean_pct=80.0)
        else:
            tele = {"gpu": None, "note": "no GPU telemetry: CPU run"}
        # Rank 1's phases take 10% longer: the per-rank table shows it, the chart shows rank 0.
        ranks.append(
            {
                "rank": r, "kv_bytes": kv, "peak_memory_bytes": (2 + r) * 2**30, "profile": profile(1.1 if r == 1 else 1.0),
                "collectives": colls, "telemetry": tele,
            }
        )  # fmt: skip
    return {
        "mode": "reattention", "len": n, "target_len": target, "depth": depth, "trial": trial, "seed": 0,
        "needle": "1234567", "correct": True, "answer": " 1234567.", "seconds": prefill_s + 2.0,
        "prefill_seconds": prefill_s, "decode_seconds": 2.0, "prefill_tok_s": round(n / prefill_s, 1),
        "sink": 32, "local": 4096, "topk": 4, "span": 32, "recall_clip": 127, "chunk": 512,
        "model": "smollm2-135m", "haystack": "noise", "device": "cuda:0" if gpu else "cpu",
        "dtype": "bfloat16" if gpu else "float32", "world": world, "tensor_parallel": 1 < world <= kv_heads,
        "decode": decode, "memory_plan": {**plan, "available_bytes": 16 * 2**30},
        "profile": ranks[0]["profile"], "decode_ms_per_token": 133.3, "kv_bytes_per_rank": kv,
        "peak_memory_bytes": ranks[0]["peak_memory_bytes"], "collectives": colls,
        "telemetry": ranks[0]["telemetry"], "ranks": ranks,
    }  # fmt: skip


def write_run(path: Path, records: list[dict]) -> Path:
    path.mkdir(parents=True)
    for r in records:
        append_record(path / "results.jsonl", r)
    return path


@pytest.fixture
def runs(tmp_path):
    """Strong 16K at P=1/2/4 (T = 100, mean(55, 65) = 60, 40 s), weak 8K per rank (P=1 8K 50 s, P=2 = the
    16K run, P=4 32K 80 s), a P=2 16K run with the gather decode path, and a full-mode record to skip."""
    d = tmp_path / "runs"
    return {
        "p1": write_run(
            d / "cpu16k-p1",
            [record(1, 16 * K, 100.0), {**record(1, 16 * K, 1.0, depth=0.9), "prefill_seconds": 0.0}],
        ),
        "p2": write_run(d / "cpu16k-p2", [record(2, 16 * K, 55.0), record(2, 16 * K, 65.0, depth=0.9)]),
        "p4": write_run(
            d / "cpu16k-p4", [{**record(4, 16 * K, 40.0), "mode": "full"}, record(4, 16 * K, 40.0)]
        ),
        "w1": write_run(d / "cpu8k-p1", [record(1, 8 * K, 50.0)]),
        "w4": write_run(d / "cpu32k-p4", [record(4, 32 * K, 80.0)]),
        "gather": write_run(d / "cpu16k-p2-gather", [record(2, 16 * K, 61.0, decode="gather")]),
    }


def test_compress_sources():
    s = [Source("a.jsonl", i) for i in (5, 1, 2, 3, 7, 8)] + [Source("b.jsonl", 4)]
    assert compress_sources(s) == "a.jsonl:1-3,5,7-8; b.jsonl:4"


def test_strong_and_weak_efficiency(runs):
    points, notes = load_points(list(runs.values()))
    assert [p.id for p in points] == ["p1-8K", "p1-16K", "p2-16K-gather", "p2-16K-lse", "p4-16K", "p4-32K"]
    # The zero-second record and the full-mode record are skipped, and say so.
    assert any("prefill_seconds 0.0" in n for n in notes) and any("mode full" in n for n in notes)
    series, more = auto_series(points)
    assert [(s.kind, s.growth, [p.id for p in s.points]) for s in series] == [
        ("strong", None, ["p1-16K", "p2-16K-lse", "p4-16K"]),
        ("weak", "sqrt", ["p1-8K", "p4-16K"]),  # N = X * sqrt(P): 8K -> 16K at P = 4
        ("weak", "sqrt", ["p1-16K", "p4-32K"]),
        ("weak", "linear", ["p1-8K", "p2-16K-lse", "p4-32K"]),
    ]
    assert "p2-16K-gather" in more[0]  # the other decode path stays out of the series
    strong, weak = series[0], series[3]
    # P=4 runs without tensor parallelism (3 KV heads) and still belongs to the series.
    assert [p.tensor_parallel for p in strong.points] == [False, True, False]

    rows = strong.rows()
    assert rows[1]["point"].prefill_s == pytest.approx(60.0)  # mean of the two P=2 trials
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 100 / 60, 100 / 40])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 100 / (2 * 60), 100 / (4 * 40)])
    assert rows[0]["point"].throughput == pytest.approx((16 * K - 2) / 100.0)

    rows = weak.rows()
    assert [r["raw"] for r in rows] == pytest.approx([1.0, 50 / 60, 50 / 80])  # not normalised
    tput = [(8 * K - 2) / 50, (16 * K - 2) / 60, (32 * K - 2) / 80]
    assert [r["ratio"] for r in rows] == pytest.approx([t / tput[0] for t in tput])
    # Normalised by work: the baseline's profile puts 30% in scoring (quadratic), 70% elsewhere (linear).
    ns = [8 * K - 2, 16 * K - 2, 32 * K - 2]
    work = [0.3 * brute_pairs(n) / brute_pairs(ns[0]) + 0.7 * n / ns[0] for n in ns]
    assert [r["work"] for r in rows] == pytest.approx(work)
    assert [r["efficiency"] for r in rows] == pytest.approx(
        [w * 50 / (p * t) for w, p, t in zip(work, (1, 2, 4), (50, 60, 80), strict=True)]
    )
    assert rows[2]["work_per_rank"] > 1.5  # N ~ P more than doubles the work per rank at P = 4


def test_baseline_without_p1(tmp_path):
    """A series without P=1 is measured against its smallest P: efficiency = P_b T_b / (P T_P)."""
    a = write_run(tmp_path / "a", [record(2, 16 * K, 60.0)])
    b = write_run(tmp_path / "b", [record(4, 16 * K, 40.0)])
    points, _ = load_points([a, b])
    (s,) = auto_series(points)[0]
    assert [r["efficiency"] for r in s.rows()] == pytest.approx([1.0, 2 * 60 / (4 * 40)])


def test_explicit_series_are_checked(runs):
    points, _ = load_points(list(runs.values()))
    s = explicit_series("strong", points, [str(runs["p1"]), str(runs["gather"])])
    assert [p.id for p in s.points] == ["p1-16K", "p2-16K-gather"]
    with pytest.raises(ScalingError, match="not one length"):
        explicit_series("strong", points, [str(runs["p1"]), str(runs["w4"])])
    # 16K at P = 1 and 32K at P = 4: N = 16K * sqrt(P), constant scoring work per rank.
    assert explicit_series("weak", points, [str(runs["p1"]), str(runs["w4"])]).growth == "sqrt"
    assert explicit_series("weak", points, [str(runs["w1"]), str(runs["w4"])]).growth == "linear"
    with pytest.raises(ScalingError, match="not one length per rank"):
        explicit_series("weak", points, [str(runs["p1"]), str(runs["p4"])])
    with pytest.raises(ScalingError, match="several points at one P"):
        explicit_series("strong", points, [str(runs["p2"]), str(runs["gather"]), str(runs["p1"])])
    with pytest.raises(ScalingError, match="two or more P"):
        explicit_series("weak", points, [str(runs["w1"])])


def test_phases_collectives_memory_of_a_point(runs):
    points, _ = load_points([runs["p2"]])
    (p,) = points
    ph = phases(p)
    assert list(ph)[:4] == ["scoring", "selection", "attention", "model"]
    # Rank 0, mean over the trials of 55 and 65 s; rank 1's phases are 10% longer.
    assert sum(ph.values()) == pytest.approx(60.0)
    assert ph["attention"] == pytest.approx(60.0 * 0.15)  # attention + kv_fetch + append
    assert ph["comm:topk_candidates"] == pytest.approx(6.0)
    per = rank_phases(p)
    assert list(per) == [0, 1] and per[0] == ph and sum(per[1].values()) == pytest.approx(66.0)
    c = collectives(p)
    assert c["scope_kv"]["bytes_rank0"] == 6000 and c["scope_kv"]["bytes_all"] == 12000
    assert c["scope_kv"]["per_call"] == pytest.approx(120.0)
    m = memory(p)
    assert [x["rank"] for x in m] == [0, 1] and m[1]["peak_bytes"] == 3 * 2**30
    assert m[0]["planned_bytes"] == m[0]["kv_bytes"] + 538060032 + 71288832
    assert telemetry(p) == {"gpu": None, "note": "no GPU telemetry: CPU run"}


def test_real_record(tmp_path):
    """A record from a real 2-rank CPU run: every measure reads it, phases add up to the profile."""
    run = tmp_path / "real"
    run.mkdir()
    shutil.copy(REAL, run / "results.jsonl")
    raw = json.loads(REAL.read_text())
    (p,) = load_points([run])[0]
    assert (p.world, p.length, p.decode, p.tensor_parallel) == (2, 1500, "lse", True)
    assert sum(phases(p).values()) == pytest.approx(raw["profile"]["prefill"]["total_s"])
    assert sum(rank_phases(p)[1].values()) == pytest.approx(raw["ranks"][1]["profile"]["prefill"]["total_s"])
    assert {"scoring", "selection", "attention", "model", "comm:scope_kv"} <= set(phases(p))
    c = collectives(p)
    assert set(c) == set(raw["collectives"])
    assert c["qkv_heads"]["bytes_all"] == sum(r["collectives"]["qkv_heads"]["bytes"] for r in raw["ranks"])
    assert [m["kv_bytes"] for m in memory(p)] == [raw["kv_bytes_per_rank"]] * 2
    assert telemetry(p)["gpu"] is None and "no GPU telemetry" in telemetry(p)["note"]


def _expand(cell: str) -> set[tuple[str, int]]:
    """``a.jsonl:1-3,5; b.jsonl:2`` -> {(a.jsonl, 1), ...}."""
    out = set()
    for part in cell.split("; "):
        path, lines = part.rsplit(":", 1)
        for run in lines.split(","):
            lo, _, hi = run.partition("-")
            out |= {(path, i) for i in range(int(lo), int(hi or lo) + 1)}
    return out


def test_report_names_every_source(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # sources are shown relative to the working directory
    out = tmp_path / "report"
    launcher = _load_launcher()
    assert launcher.main(["--from", *map(str, runs.values()), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    for name in ("scaling.png", "phases.png", "collectives.png", "memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and f"]({name})" in text

    # Every table row of a measured point names records, and every record used is named.
    used = set()
    for line in text.splitlines():
        if re.match(r"\| p\d", line):
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert re.search(r"results\.jsonl:\d", cells[-1]), line
            used |= _expand(cells[-1])
    expected = {
        ("runs/cpu16k-p1/results.jsonl", 1), ("runs/cpu16k-p2/results.jsonl", 1),
        ("runs/cpu16k-p2/results.jsonl", 2), ("runs/cpu16k-p4/results.jsonl", 2),
        ("runs/cpu8k-p1/results.jsonl", 1), ("runs/cpu32k-p4/results.jsonl", 1),
        ("runs/cpu16k-p2-gather/results.jsonl", 1),
    }  # fmt: skip
    assert used == expected

    assert "### Strong scaling at 16K (efficiency = P_b * T_b / (P * T_P)" in text
    assert (
        "### Weak scaling at 8K per rank, N proportional to P (efficiency = (W_P / W_b) * P_b * T_b / (P * T_P), work-normalised"
        in text
    )
    assert "### Weak scaling at constant work per rank, N = 8K x sqrt(P) (efficiency = (W_P / W_b)" in text
    assert "T_b/T_P (not normalised)" in text and "### Which phases divide" in text
    divide = text.split("### Which phases divide")[1].split("**Weak")[0]
    assert "| scoring | 30.00 | 18.00 (x1.67) | 12.00 (x2.50) |" in divide  # 0.3 * T_P, rank 0
    strong = text.split("### Strong scaling")[1].split("###")[0]
    assert (
        "| p4-16K | 4 | 16,382 | 1 | 40.0 [40.0-40.0] | 409.6 | 2.50 | 0.62 | 1/1 | runs/cpu16k-p4/results.jsonl:2 |"
        in strong
    )
    assert "no GPU telemetry: CPU run" in text and "GPU power" in text
    every_rank = text.split("Every rank, same units:")[1].split("##")[0]
    assert "| p4-16K | 1 | 44.0 | " in every_rank and "| p4-16K | 3 | 40.0 | " in every_rank  # rank 1: +10%
    assert "python launch/niah.py --model smollm2-135m --len 16K --mode reattention" in text
    assert "torchrun --standalone --nproc_per_node 4 launch/niah.py" in text
    assert "--parallel.decode=gather" in text and "skipped 1 record(s)" in text


def test_gpu_telemetry_table(tmp_path):
    a = write_run(tmp_path / "g1", [record(1, 16 * K, 10.0, gpu=True)])
    b = write_run(tmp_path / "g2", [record(2, 16 * K, 6.0, gpu=True)])
    out = tmp_path / "report"
    assert _load_launcher().main(["--from", str(a), str(b), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    section = text.split("## GPU power and utilization")[1].split("##")[0]
    assert "| p2-16K | 1 | NVIDIA H100 | 301 | 400 | 80 | 2.00 GiB |" in section
    assert "no GPU telemetry" not in section


def test_records_without_profiles(tmp_path):
    """Records from before the profile (no ranks, profile, collectives) still give the scaling tables."""
    old = {
        k: v
        for k, v in record(1, 16 * K, 100.0).items()
        if k not in ("ranks", "profile", "collectives", "telemetry")
    }
    a = write_run(tmp_path / "old1", [old])
    b = write_run(tmp_path / "new2", [record(2, 16 * K, 50.0)])
    out = tmp_path / "report"
    assert _load_launcher().main(["--from", str(a), str(b), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| p2-16K | 2 | 16,382 | 1 | 50.0 [50.0-50.0] | 327.6 | 2.00 | 1.00 |" in text
    assert "p1-16K: no GPU telemetry: telemetry not recorded" in text


def test_dry_run_commands(tmp_path, capsys):
    launcher = _load_launcher()
    argv = ["--strong-len", "16K", "--weak-len-per-rank", "8K", "--ranks", "1,2,4", "--depths", "0.1,0.9"]
    assert launcher.main([*argv, "--scope.chunk=256", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # Weak: N = 8K * sqrt(P) rounded to 512 tokens (8K, 11776, 16K); 16K at P=4 is in both series, runs once.
    assert [line.split(":")[0] for line in lines] == [
        "P=1 len 16K", "P=2 len 16K", "P=4 len 16K", "P=1 len 8K", "P=2 len 11776",
    ]  # fmt: skip
    assert "torch.distributed.run --standalone --nproc_per_node 4" in lines[2]
    assert (
        "torch.distributed.run" not in lines[0] and "launch/niah.py --len 16K --mode reattention" in lines[0]
    )
    assert f"--depths 0.1,0.9 --scope.chunk=256 --out {tmp_path}/runs/len16K-p2" in lines[1]
    assert not (tmp_path / "runs").exists()
    assert launcher.main([*argv, "--weak-growth", "linear", "--dry-run", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines][3:] == ["P=1 len 8K", "P=4 len 32K"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--from", "/no/such/run"], "/no/such/run: no results.jsonl there"),
        (["--strong-len", "16K", "--ranks", "2"], "two or more distinct counts"),
        (["--strong-len", "16Q"], "'16Q' is not a positive token count"),
        (["--strong-len", "16K", "--len", "8K"], "--len is set by launch/scaling.py"),
        (["--from", "x", "--depths", "0.5"], "unrecognized arguments: --depths 0.5"),
        ([], "nothing to report"),
        (["--from", "x", "--mode", "full,reattention"], "one mode per report"),
        (["--from", "x", "--project", "4M"], "give MODEL=LEN"),
        (["--from", "x", "--comm-op", "scope_kv=sendrecv"], "give KIND=OP"),
        (["--from", "x", "--comm-bench", "/no/such.json"], "--comm-bench /no/such.json: cannot read it"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "scaling.py"), *args, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr


def test_no_usable_record_is_an_error(tmp_path):
    a = write_run(tmp_path / "a", [{**record(1, 16 * K, 10.0), "mode": "full"}])
    with pytest.raises(ScalingError, match=r"no usable reattention records .*mode full \(1\)"):
        load_points([a])


def test_run_mode_launches_niah_and_passes_its_error_on(tmp_path):
    """The run mode really starts launch/niah.py (which stops once the tokenizer says that 50 tokens
    cannot hold the needle: a check scaling.py's up-front validation of niah's flags cannot make):
    its command and log land in the run directory and its one-line error comes back with exit 2."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "scaling.py"), "--strong-len", "50", "--ranks", "1,2"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: P=1 len 50 failed (exit 2; "), r.stderr
    assert "--len 50 is too short to hold the needle and question" in lines[0]
    run = tmp_path / "runs" / "len50-p1"
    assert "launch/niah.py --len 50 --mode reattention --out" in (run / "command.txt").read_text()
    assert "error: --len 50 is too short" in (run / "niah.log").read_text()
    assert not (tmp_path / "runs" / "len50-p2").exists()  # stopped at the first failure


# ---- weak scaling at constant work, the cost model, bench_comm ----------------------------------


def test_scoring_pairs_match_a_token_by_token_count():
    for n, sink, local, chunk in [(8 * K, 32, 4096, 512), (5000, 4, 1000, 300), (4000, 32, 4096, 512)]:
        assert scoring_pairs(n, sink, local, chunk) == brute_pairs(n, sink, local, chunk)
    assert scoring_pairs(4000, 32, 4096, 512) == 0  # the whole prompt fits sink + local: nothing scored
    assert (
        sqrt_length(8 * K, 2) == 11776 and sqrt_length(8 * K, 4) == 16 * K and sqrt_length(8 * K, 1) == 8 * K
    )


def test_weak_at_constant_work_per_rank_has_efficiency_one(tmp_path):
    """P=2 at sqrt(2)*N with the same per-rank work (T_2 = T_1 * W(N_2) / (2 W(N_1))) is efficiency 1.0;
    the same T_2 at 2N (length ~ P) is not flattered into 1.0 by T_1/T_2."""
    shares = {"scoring": 0.79}  # the baseline's profile: 79% scoring, 21% model (linear in N)
    n1 = 256 * K
    n2 = sqrt_length(n1, 2)
    assert n2 == 370688  # 256K * 1.414 = 370,727 -> a multiple of 512

    def work(n):  # the work model, built independently: scoring share ~ pairs, the rest ~ tokens
        return 0.79 * brute_pairs(n - 2) / brute_pairs(n1 - 2) + 0.21 * (n - 2) / (n1 - 2)

    t2 = 100.0 * work(n2) / 2  # rank time proportional to the work per rank: the same as at P = 1
    a = write_run(tmp_path / "a", [record(1, n1, 100.0, shares=shares)])
    b = write_run(tmp_path / "b", [record(2, n2, t2, shares=shares)])
    points, _ = load_points([a, b])
    (s,) = [s for s in auto_series(points)[0] if s.kind == "weak"]
    assert s.growth == "sqrt"
    assert s.title.startswith("weak scaling at constant work per rank, N = 256K x sqrt(P)")
    rows = s.rows()
    assert rows[1]["efficiency"] == pytest.approx(1.0, rel=1e-9)
    assert rows[1]["work_per_rank"] == pytest.approx(work(n2) / 2)
    assert 0.9 < rows[1]["work_per_rank"] < 1.0  # sqrt(P) holds the scoring per rank, not the linear part
    # Length ~ P: 2N at P=2 in the same time as P=1 does ~4x the scoring: efficiency ~2, not T_1/T_2 = 1.
    c = write_run(tmp_path / "c", [record(2, 2 * n1, 100.0, shares=shares)])
    (s,) = [s for s in auto_series(load_points([a, c])[0])[0] if s.kind == "weak"]
    assert s.growth == "linear" and s.rows()[1]["raw"] == pytest.approx(1.0)
    assert s.rows()[1]["efficiency"] == pytest.approx(work(2 * n1) / 2) and s.rows()[1]["efficiency"] > 1.7


# Known cost model: compute phases t = a * w / P + b * w (w = scored pairs for scoring, N otherwise).
TRUE = {"scoring": (2e-10, 0.0), "selection": (0.0, 3e-6), "attention": (4e-6, 1e-6), "model": (1e-6, 5e-7)}
# Collectives: rank 0's bytes and calls per prompt token at each P (the reference counts them at 2, 4, 8).
BYTES = {2: {"topk_candidates": 100.0, "scope_kv": 800.0}, 4: {"topk_candidates": 100.0, "scope_kv": 1200.0},
         8: {"topk_candidates": 100.0, "scope_kv": 1400.0}}  # fmt: skip
CALLS = 30 / 512  # one call per layer (30) and chunk (512 tokens)


def model_record(world, target, *, device="cuda:0", dtype="bfloat16", comm_s=1.0, scale=1.0):
    """A record whose phases follow TRUE exactly (times ``scale``) and whose collectives follow BYTES."""
    n = target
    ph = {}
    for name, (a, b) in TRUE.items():
        w = brute_pairs(n) if name == "scoring" else n
        ph[name] = scale * (a * w / world + b * w)
    colls = {}
    if world > 1:
        for kind, per in BYTES[world].items():
            colls[kind] = {"calls": round(CALLS * n), "bytes": round(per * n), "seconds": comm_s}
            ph[f"comm:{kind}"] = comm_s
    prof = {"prefill": {"seconds": ph, "total_s": sum(ph.values()), "steps": n // 512, "tokens": n}}
    return {
        "mode": "reattention", "len": n, "target_len": target, "depth": 0.5, "trial": 0, "correct": True,
        "prefill_seconds": sum(ph.values()), "world": world, "sink": 32, "local": 4096, "topk": 4, "span": 32,
        "recall_clip": 127, "chunk": 512, "model": "smollm2-135m", "haystack": "noise", "device": device,
        "dtype": dtype, "decode": "lse", "tensor_parallel": False, "profile": prof, "collectives": colls,
        "ranks": [{"rank": 0, "profile": prof, "collectives": colls}],
    }  # fmt: skip


def write_bench(path, world, lat=20e-6, bw=200e9):
    """A bench_comm result with exact t = lat + bus / bw at four sizes for each op."""
    ops = {}
    for op in ("all_gather", "all_to_all", "all_reduce", "broadcast"):
        pts = [
            {"bytes": s, "bus_bytes": s / 2, "seconds": lat + s / 2 / bw}
            for s in (2**10, 2**16, 2**22, 2**28)
        ]
        ops[op] = {"points": pts, "latency_s": lat, "busbw_Bps": bw, "peak_busbw_Bps": bw}
    path.write_text(
        json.dumps({"kind": "bench_comm", "world": world, "backend": "nccl", "device": "H200", "ops": ops})
    )
    return path


def test_alpha_beta_recovers_latency_and_bandwidth():
    from dist_reattn.report.scaling_model import alpha_beta

    pts = [{"bus_bytes": s, "seconds": 15e-6 + s / 300e9} for s in (2**10, 2**14, 2**20, 2**26)]
    lat, bw = alpha_beta(pts)
    assert lat == pytest.approx(15e-6, rel=1e-6) and bw == pytest.approx(300e9, rel=1e-6)


def test_cost_model_recovers_coefficients_and_projects(tmp_path, monkeypatch):
    from dist_reattn.report.scaling_model import load_bench, project
    from dist_reattn.report.scaling_model_report import fits_of, projections

    monkeypatch.chdir(tmp_path)
    gpu = [
        write_run(tmp_path / f"gpu-{n // K}k-p{p}", [model_record(p, n)])
        for n in (64 * K, 128 * K)
        for p in (1, 2)
    ]
    held = write_run(tmp_path / "gpu-128k-p4", [model_record(4, 128 * K, scale=1.1)])  # 10% slower compute
    ref = [
        write_run(tmp_path / f"cpu-p{p}", [model_record(p, 8 * K, device="cpu", dtype="float32")])
        for p in (2, 4, 8)
    ]
    points, _ = load_points([*gpu, held, *ref])
    benches = load_bench(
        [write_bench(tmp_path / "b2.json", 2), write_bench(tmp_path / "b4.json", 4, bw=150e9)]
    )
    fits, notes = fits_of(points, {"fit_ranks": [1, 2], "benches": benches})
    assert notes == ["smollm2-135m, cpu, float32: no cost model, profiled points at fewer than two of P=1,2"]
    (f,) = [f for f in fits if f.tag == "smollm2-135m, cuda, bfloat16"]
    assert [p.id for p in f.points] == ["p1-64K-c1", "p2-64K-c1", "p1-128K-c1", "p2-128K-c1"]
    got = {ph.phase: (ph.divides, ph.repeats) for ph in f.phases}
    for name, (a, b) in TRUE.items():
        assert got[name][0] == pytest.approx(a, rel=1e-6, abs=1e-15), name
        assert got[name][1] == pytest.approx(b, rel=1e-6, abs=1e-15), name
    assert f.label == "projection (cost model fitted on P=1,2)"

    # Compute at P = 8, 1M; collectives from the bench at P=4 (no P=8 bench) and bytes scaled by the
    # gloo reference: scope_kv 800 B/token at P=2 (measured) x 1400 / 800 (reference P=8 / P=2).
    n = 1024 * K
    pr = project(f, n, 8)
    for name, (a, b) in TRUE.items():
        w = brute_pairs(n) if name == "scoring" else n
        assert pr["phases"][name] == pytest.approx(a * w / 8 + b * w, rel=1e-6)
    c = pr["comm"]["scope_kv"]
    assert c["bytes"] == pytest.approx(1400 * n) and c["bus_bytes"] == pytest.approx(1400 * n)  # all_to_all
    assert c["calls"] == pytest.approx(round(CALLS * 64 * K) / (64 * K) * n, rel=1e-3)
    assert c["seconds"] == pytest.approx(c["calls"] * 20e-6 + 1400 * n / 150e9)
    ag = pr["comm"]["topk_candidates"]
    assert ag["bus_bytes"] == pytest.approx(100 * n * 7)  # all-gather: (P - 1) x what each rank puts in
    assert "reference" in c["rates"] and "P=4" in c["bandwidth"]

    # The held-out P=4 point at 128K is shown beside the projection with the model's error.
    rows = projections(points, f, 128 * K, [1, 2, 4, 8])
    m = rows[2]["measured"]
    assert not m["in_fit"] and m["seconds"] == pytest.approx(
        points[[p.id for p in points].index("p4-128K-c1")].prefill_s
    )
    assert m["error"] == pytest.approx((rows[2]["model"]["total"] - m["seconds"]) / m["seconds"])
    assert m["error"] < -0.05  # the record is 10% slower in compute than the model
    assert rows[0]["measured"]["error"] == pytest.approx(0.0, abs=1e-9)  # a fit point, exact model
    assert "measured" not in rows[3]


def test_report_labels_projections(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dirs = [write_run(tmp_path / f"gpu-p{p}", [model_record(p, 128 * K)]) for p in (1, 2)]
    dirs.append(write_run(tmp_path / "gpu-p4", [model_record(4, 128 * K)]))
    bench = write_bench(tmp_path / "b2.json", 2)
    out = tmp_path / "report"
    args = ["--from", *map(str, dirs), "--comm-bench", str(bench), "--project", "smollm2-135m=128K,1M"]
    assert _load_launcher().main([*args, "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert (out / "projection.png").read_bytes()[:4] == b"\x89PNG" and "](projection.png)" in text
    section = text.split("## Cost model and projection")[1].split("## Memory per rank")[0]
    assert "#### smollm2-135m, cuda, bfloat16 at 1M: projection (cost model fitted on P=1,2)" in section
    rows = [
        line
        for line in section.splitlines()
        if line.startswith("| projection (cost model fitted on P=1,2) |")
    ]
    assert len(rows) == 8  # P = 1, 2, 4, 8 at 128K and at 1M: every projected row says what it is
    p4 = [r for r in rows if r.startswith("| projection (cost model fitted on P=1,2) | 4 |")][0]
    assert "(held out)" in p4 and "gpu-p4/results.jsonl:1" in p4  # measured beside the projection
    assert "| all_gather | 2 | nccl | H200 | 20.0 | 200.0 |" in section  # the benchmark, as read
    # Measured tables never carry projected numbers: the strong series has only P = 1, 2, 4 rows.
    strong = text.split("### Strong scaling")[1].split("\n#")[0]
    assert "projection" not in strong and len([x for x in strong.splitlines() if re.match(r"\| p\d", x)]) == 3


def test_committed_cpu_report_regenerates(tmp_path):
    """The committed CPU report's command still runs on its records, now with the work-normalised weak
    tables and a cost model fitted on P=1,2 (P=4 held out)."""
    s = ROOT / "launch" / "results" / "scaling-cpu-2026-11-24" / "runs"
    dirs = [
        s / d for d in ("cpu16k-p1", "cpu16k-p2", "cpu16k-p4", "cpu8k-p1", "cpu32k-p4", "cpu16k-p2-gather")
    ]
    out = tmp_path / "report"
    assert _load_launcher().main(["--from", *map(str, dirs), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "### Strong scaling at 16K" in text and "N proportional to P (efficiency = (W_P / W_b)" in text
    assert "#### smollm2-135m, cpu, float32 at 16K: projection (cost model fitted on P=1,2)" in text
    assert "(held out)" in text


def test_bench_comm_on_two_gloo_ranks(tmp_path):
    from dist_reattn.report.scaling_model import load_bench

    out = tmp_path / "comm.json"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "launch" / "bench_comm.py"), "--sizes", "1K,64K", "--iters", "2", "--warmup", "1",
         "--ops", "all_gather,all_to_all,all_reduce,broadcast", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert (data["kind"], data["world"], data["backend"]) == ("bench_comm", 2, "gloo")
    assert set(data["ops"]) == {"all_gather", "all_to_all", "all_reduce", "broadcast"}
    for op, e in data["ops"].items():
        assert [p["bytes"] for p in e["points"]] == [1024, 65536], op
        for p in e["points"]:
            factor = 1.0 if op in ("all_gather", "all_to_all") else 2.0  # (P-1)/P vs 2(P-1)/P, bcast: 1
            if op == "broadcast":
                factor = 2.0
            assert p["bus_bytes"] == pytest.approx(p["bytes"] * factor / 2) and p["seconds"] > 0
        assert e["latency_s"] >= 0 and e["busbw_Bps"] > 0
    assert "all_gather" in r.stdout and "fit: latency" in r.stdout
    (b,) = load_bench([out])
    assert b.world == 2 and b.ops["all_to_all"]["busbw_Bps"] > 0


def test_layouts_make_series_of_their_own(tmp_path):
    """P=2 runs in the sequence and the tensor layout: one strong series each, sharing P=1; the kind
    names the records use (here a new one, qkv_slab) flow through as they are."""
    a = write_run(tmp_path / "p1", [record(1, 16 * K, 100.0)])
    seq = {**record(2, 16 * K, 52.0), "layout": "sequence"}
    seq["collectives"] = {"qkv_slab": {"calls": 10, "bytes": 4096, "seconds": 0.5}}
    seq["ranks"] = [{**rr, "collectives": seq["collectives"]} for rr in seq["ranks"]]
    b = write_run(tmp_path / "seq", [seq])
    c = write_run(tmp_path / "ten", [{**record(2, 16 * K, 70.0), "parallel": {"layout": "tensor"}}])
    points, _ = load_points([a, b, c])
    assert [p.id for p in points] == ["p1-16K", "p2-16K-sequence", "p2-16K-tensor"]
    strong = [s for s in auto_series(points)[0] if s.kind == "strong"]
    assert [[p.id for p in s.points] for s in strong] == [
        ["p1-16K", "p2-16K-sequence"],
        ["p1-16K", "p2-16K-tensor"],
    ]
    assert [round(s.rows()[1]["efficiency"], 3) for s in strong] == [round(100 / 104, 3), round(100 / 140, 3)]
    assert set(collectives(points[1])) == {"qkv_slab"}
    out = tmp_path / "report"
    assert _load_launcher().main(["--from", str(a), str(b), str(c), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| p2-16K-sequence | 2 | on | sequence | lse |" in text
    assert "| p2-16K-sequence | qkv_slab | 10 |" in text


def test_comm_rates_prefer_per_stage_counts(tmp_path):
    """Where a record splits its collectives by stage (``profile.prefill.collectives``), the model uses
    the prefill's; else the trial's totals, and says they include the decode."""
    from dist_reattn.report.scaling_model import comm_rates

    r = model_record(2, 64 * K)
    plain = write_run(tmp_path / "plain", [r])
    staged = dict(r, profile={"prefill": {**r["profile"]["prefill"], "collectives": {
        "scope_kv": {"calls": 60, "bytes": 64 * K * 500, "seconds": 0.5, "op": "all_gather"}}}})  # fmt: skip
    staged = write_run(tmp_path / "staged", [staged])
    (p,) = load_points([plain])[0]
    rates = comm_rates(p)
    assert (
        rates["scope_kv"]["bytes_per_token"] == pytest.approx(800.0) and not rates["scope_kv"]["prefill_only"]
    )
    (q,) = load_points([staged])[0]
    rates = comm_rates(q)
    assert set(rates) == {"scope_kv"} and rates["scope_kv"]["prefill_only"]
    assert (
        rates["scope_kv"]["bytes_per_token"] == pytest.approx(500.0)
        and rates["scope_kv"]["op"] == "all_gather"
    )


def test_reference_ratio_at_one_length_and_sequence_candidates_are_all_to_all(tmp_path, monkeypatch):
    """Byte references at P=2 and P=8 are paired at one length (a P=2 reference at a second, longer
    length must not enter the ratio), and in the sequence layout topk_candidates is an all-to-all:
    its bus bytes at P=8 are what the rank sent, not 7 times it."""
    from dist_reattn.report.scaling_model import project
    from dist_reattn.report.scaling_model_report import fits_of

    monkeypatch.chdir(tmp_path)

    def seq(r):
        return {**r, "layout": "sequence"}

    gpu = [write_run(tmp_path / f"gpu-p{p}", [seq(model_record(p, 128 * K))]) for p in (1, 2)]
    ref = [
        write_run(tmp_path / f"cpu-p{p}", [seq(model_record(p, 8 * K, device="cpu", dtype="float32"))])
        for p in (2, 8)
    ]
    longer = seq(model_record(2, 16 * K, device="cpu", dtype="float32"))
    for c in longer["collectives"].values():
        c["bytes"] *= 3  # a length with other rates per token: mixed into the ratio, it would show
    ref.append(write_run(tmp_path / "cpu-p2-16k", [longer]))
    points, _ = load_points([*gpu, *ref])
    (f,) = [f for f in fits_of(points, {"fit_ranks": [1, 2]})[0] if f.tag.startswith("smollm2-135m, cuda")]
    assert f.comm.ops["topk_candidates"] == "all_to_all" and f.comm.ops["scope_kv"] == "all_to_all"
    n = 1024 * K
    c = project(f, n, 8)["comm"]
    assert c["scope_kv"]["bytes"] == pytest.approx(800 * n * 1400 / 800)  # the 8K pair, not 16K at P=2
    assert "p2-8K" in c["scope_kv"]["rates"] and "p8-8K" in c["scope_kv"]["rates"]
    assert c["topk_candidates"]["bus_bytes"] == pytest.approx(100 * n)


def test_bytes_reference_flag_stands_in_for_a_model(tmp_path, monkeypatch):
    """--bytes-reference MODEL=DIR: records of a shallower copy of MODEL's shape count as its byte
    reference; they appear in the Byte reference table and in no measured table."""
    monkeypatch.chdir(tmp_path)
    dirs = [write_run(tmp_path / f"gpu-p{p}", [model_record(p, 128 * K)]) for p in (1, 2)]
    shallow = []
    for p in (2, 4):
        r = model_record(p, 8 * K, device="cpu", dtype="float32")
        r["model"] = "random:/x/smol-1layer"
        for c in r["collectives"].values():
            c["bytes"] //= 30  # one layer of 30
        shallow.append(write_run(tmp_path / f"shallow-p{p}", [r]))
    out = tmp_path / "report"
    args = ["--from", *map(str, dirs), "--project", "smollm2-135m=1M", "--project-ranks", "2,4"]
    args += ["--bytes-reference", *(f"smollm2-135m={d}" for d in shallow), "--out", str(out)]
    assert _load_launcher().main(args) == 0
    text = (out / "report.md").read_text()
    assert "### Byte reference" in text and "random:/x/smol-1layer (for smollm2-135m)" in text
    assert "P=2 measured x reference ref-p4-8K / ref-p2-8K" in text
    assert "ref-p" not in text.split("## Cost model and projection")[0]  # not a measured point
    row = [x for x in text.splitlines() if x.startswith("| 4 | scope_kv |")][0]
    assert f"| {1200 * 1024 * K / 2**20:,.1f} |" in row  # 800 B/token x 1200 / 800, depth cancelled
