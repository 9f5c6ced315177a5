"""launch/niah.py: bad input fails fast with one line and exit status 2; a short real run writes its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def niah(*args, tmp_path=None):
    out = ["--out", str(tmp_path / "run")] if tmp_path else []
    return subprocess.run(
        [sys.executable, str(ROOT / "launch" / "niah.py"), *args, *out],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--len", "4Q"], "'4Q' is not a positive token count"),
        (["--len", "-1"], "'-1' is not a positive token count"),
        (["--len", "0"], "'0' is not a positive token count"),
        (["--depths", "0.5,1.5"], "every depth must be in [0, 1]"),
        (["--depths", "half"], "give fractions in [0, 1]"),
        (["--mode", "full,dense"], "'dense' is not one of"),
        (["--scope.chunk=0"], "scope.chunk=0 must be > 0"),
        (["--scope.topk=-1"], "scope.topk=-1 must be >= 0"),
        (["--scope.slab=-1"], "scope.slab=-1 must be >= 0 (0 picks 16 on a GPU, 1 on a CPU)"),
        (["--model", "/no/such/model"], "model '/no/such/model' not found"),
        (["--len", "50"], "too short to hold the needle and question: use >= "),
        (
            ["--model", "random:no-such-shape"],
            "no shape 'no-such-shape'; use random:NAME with NAME one of llama-3.1-8b",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    r = niah(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_unsupported_architecture_is_one_line(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    r = niah("--model", str(d))
    assert r.returncode == 2 and "supported: llama, mistral, qwen2, qwen3" in r.stderr, r.stderr


def test_memory_plan_refuses_before_loading():
    r = niah("--len", "60M", "--mode", "reattention")
    assert r.returncode == 2, r.stderr
    assert "does not fit: 62914576 tokens need per rank on cpu: KV" in r.stderr and "available" in r.stderr


@pytest.mark.slow
def test_short_run_writes_results_and_resumes(tmp_path):
    args = [
        "--len",
        "600",
        "--depths",
        "0.5",
        "--mode",
        "full,reattention",
        "--scope.local=256",
        "--scope.chunk=128",
    ]
    r = niah(*args, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [x["mode"] for x in records] == ["full", "reattention"]
    for x in records:
        assert x["target_len"] == 600 and 592 <= x["len"] <= 600 and x["depth"] == 0.5
        assert isinstance(x["correct"], bool) and x["local"] == 256 and x["chunk"] == 128 and x["seconds"] > 0
    assert (tmp_path / "run" / "heatmap.png").stat().st_size > 1000
    prof = records[1]["profile"]["prefill"]  # reattention: 600 tokens > sink + local, retrieval runs
    assert {"scoring", "selection", "attention", "model"} <= set(prof["seconds"]) and prof[
        "tokens"
    ] == records[1]["len"]
    assert 0.5 * records[1]["prefill_seconds"] < prof["total_s"] <= 1.01 * records[1]["prefill_seconds"]
    assert records[1]["telemetry"] == {"gpu": None, "note": "no GPU telemetry: CPU run"}
    assert [r["rank"] for r in records[1]["ranks"]] == [0] and records[1]["peak_memory_bytes"] > 0
    profiles = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert [p["key"]["mode"] for p in profiles] == ["full", "reattention"]
    assert "full" in r.stdout and "reattention" in r.stdout
    r = niah(*args, tmp_path=tmp_path)  # everything recorded: nothing re-run, nothing duplicated
    assert r.returncode == 0 and "2 trials already recorded" in r.stderr
    assert len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_two_ranks_give_the_same_answers_as_one(tmp_path):
    # SmolLM2 beyond sink + local (1.5K prompt, local 256): the retrieval step runs on both shards.
    args = [
        str(ROOT / "launch" / "niah.py"),
        "--len", "1500", "--depths", "0.3,0.7", "--mode", "reattention,streaming",
        "--scope.local=256", "--scope.chunk=128", "--scope.recall_clip=16", "--cache.page=64",
        "--debug.check_consensus=true",
    ]  # fmt: skip
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "p1")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "p2")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = [json.loads(x) for x in (tmp_path / "p1" / "results.jsonl").read_text().splitlines()]
    r2 = [json.loads(x) for x in (tmp_path / "p2" / "results.jsonl").read_text().splitlines()]
    assert len(r1) == len(r2) == 4
    for a, b in zip(r1, r2, strict=True):
        assert (a["mode"], a["depth"], a["answer"], a["correct"]) == (
            b["mode"],
            b["depth"],
            b["answer"],
            b["correct"],
        )
        assert (a["world"], b["world"]) == (1, 2)
        # 1516 tokens in 64-token pages: 24 pages, 12 per rank.
        assert b["kv_bytes_per_rank"] * 2 == a["kv_bytes_per_rank"]
    assert r2[0]["collectives"]["topk_candidates"]["calls"] > 0
    assert r2[0]["collectives"]["decode_partials"]["calls"] > 0 and "scope_kv" in r2[0]["collectives"]
    assert [r["rank"] for r in r2[0]["ranks"]] == [0, 1]


def test_random_weight_model_runs_a_trial(tmp_path):
    # random:DIR builds the config.json's shape with random weights and the bundled tokenizer: the
    # run completes and records its trial (the answer is noise). The shipped Llama-3.1-8B shape
    # resolves to its published numbers without building it.
    shape = tmp_path / "shape"
    shape.mkdir()
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 256,
        "eos_token_id": 2, "bos_token_id": 1,
    }  # fmt: skip
    (shape / "config.json").write_text(json.dumps(config))
    r = niah("--model", f"random:{shape}", "--len", "600", "--mode", "reattention", "--scope.local=128",
             "--scope.chunk=64", "--max-new-tokens", "2", tmp_path=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert record["mode"] == "reattention" and record["len"] >= 590 and record["model"].startswith("random:")

    from dist_reattn.models.load import load_spec, resolve

    spec = load_spec(resolve("random:llama-3.1-8b"))
    assert (spec.layers, spec.heads, spec.kv_heads, spec.head_dim, spec.vocab) == (32, 32, 8, 128, 128256)
