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
    telemetry,
)

ROOT = Path(__file__).resolve().parent.parent
REAL = Path(__file__).resolve().parent / "data" / "niah_record_cpu_p2.jsonl"  # P=2, 1500 tokens, CPU
K = 1024


def _load_launcher():
    spec = importlib.util.spec_from_file_location("scaling_launcher", ROOT / "launch" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(world, target, prefill_s, *, depth=0.5, trial=0, decode="lse", gpu=False, kv_heads=3):
    """A NIAH record as launch/niah.py writes it; phase times add up to ``prefill_s`` on every rank."""
    n = target - 2  # prompts come out a few tokens short of the requested length
    comm = {"topk_candidates": 0.1, "qkv_heads": 0.05, "scope_kv": 0.05} if world > 1 else {}
    compute = {"scoring": 0.3, "selection": 0.1, "attention": 0.1, "kv_fetch": 0.02, "append": 0.03}
    compute["model"] = 1.0 - sum(compute.values()) - sum(comm.values())
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
    assert [(s.kind, [p.id for p in s.points]) for s in series] == [
        ("strong", ["p1-16K", "p2-16K-lse", "p4-16K"]),
        ("weak", ["p1-8K", "p2-16K-lse", "p4-32K"]),
    ]
    assert "p2-16K-gather" in more[0]  # the other decode path stays out of the series
    strong, weak = series
    # P=4 runs without tensor parallelism (3 KV heads) and still belongs to the series.
    assert [p.tensor_parallel for p in strong.points] == [False, True, False]

    rows = strong.rows()
    assert rows[1]["point"].prefill_s == pytest.approx(60.0)  # mean of the two P=2 trials
    assert [r["speedup"] for r in rows] == pytest.approx([1.0, 100 / 60, 100 / 40])
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 100 / (2 * 60), 100 / (4 * 40)])
    assert rows[0]["point"].throughput == pytest.approx((16 * K - 2) / 100.0)

    rows = weak.rows()
    assert [r["efficiency"] for r in rows] == pytest.approx([1.0, 50 / 60, 50 / 80])
    tput = [(8 * K - 2) / 50, (16 * K - 2) / 60, (32 * K - 2) / 80]
    assert [r["ratio"] for r in rows] == pytest.approx([t / tput[0] for t in tput])


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
    with pytest.raises(ScalingError, match="not one length per rank"):
        explicit_series("weak", points, [str(runs["p1"]), str(runs["w4"])])
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
    assert "### Weak scaling at 8K per rank (efficiency = T_b / T_P at length proportional to P" in text
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
    # 16K at P=2 is in both series and runs once.
    assert [line.split(":")[0] for line in lines] == [
        "P=1 len 16K", "P=2 len 16K", "P=4 len 16K", "P=1 len 8K", "P=4 len 32K",
    ]  # fmt: skip
    assert "torch.distributed.run --standalone --nproc_per_node 4" in lines[2]
    assert (
        "torch.distributed.run" not in lines[0] and "launch/niah.py --len 16K --mode reattention" in lines[0]
    )
    assert f"--depths 0.1,0.9 --scope.chunk=256 --out {tmp_path}/runs/len16K-p2" in lines[1]
    assert not (tmp_path / "runs").exists()


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
