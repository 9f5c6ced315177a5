"""launch/batch.py: answers, error records, resume, kill -9, SIGTERM, bad input, two "nodes" = one.

The model is a tiny random Llama (2 layers, hidden 96, 6 query / 3 KV heads) saved with
``save_pretrained`` next to the bundled SmolLM2 tokenizer, with the tokenizer's vocabulary (49152),
so the real chat template and tokenization run while each task costs well under a second. Scope
settings (sink 4, local 128, chunk 64) put every ~300-token prompt past sink + local: retrieval runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
import batch  # noqa: E402  (launch/batch.py, imported to call main() in-process)

SCOPE = ["--scope.sink=4", "--scope.local=128", "--scope.chunk=64", "--scope.topk=2", "--scope.span=4"]
SCOPE += ["--scope.recall_clip=8", "--cache.page=32"]
NEW = 4


def context(i: int, words: int = 220) -> str:
    """A deterministic document of about ``words * 1.3`` tokens that differs per ``i``."""
    rng = random.Random(i)
    nouns = ["river", "stone", "lamp", "forest", "engine", "window", "garden", "letter", "signal", "harbor"]
    return " ".join(f"{rng.choice(nouns)}-{rng.randint(0, 99)}" for _ in range(words // 2))


def write_tasks(folder: Path, n: int, start: int = 0) -> Path:
    path = folder / "tasks.jsonl"
    with open(path, "a") as f:
        for i in range(start, start + n):
            f.write(
                json.dumps({"id": f"t{i}", "context": context(i), "question": f"What is item {i}?"}) + "\n"
            )
    return path


def records(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [json.loads(x) for x in lines]  # raises on a torn or interleaved line


def run_main(*args: str) -> int:
    """batch.main in this process; restores the SIGTERM handler it installs."""
    old = signal.getsignal(signal.SIGTERM)
    try:
        return batch.main(list(args))
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd(model_dir: Path, tasks: Path, out: Path) -> list[str]:
    return [
        "--in",
        str(tasks),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--max-new-tokens",
        str(NEW),
        *SCOPE,
    ]


def spawn(model_dir: Path, tasks: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "launch" / "batch.py"), *cmd(model_dir, tasks, out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_answers(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if out.exists() and out.read_text().count('"answer"') >= n:
            return
        if proc.poll() is not None:
            pytest.fail(
                f"batch.py ended (rc {proc.returncode}) before {n} answers: {proc.stderr.read()[-2000:]}"
            )
        time.sleep(0.05)
    pytest.fail(f"no {n} answers within {timeout} s")


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted run over 5 tasks: {id: answer}."""
    d = tmp_path_factory.mktemp("reference")
    tasks = write_tasks(d, 5)
    assert run_main(*cmd(model_dir, tasks, d / "answers.jsonl")) == 0
    got = records(d / "answers.jsonl")
    assert [r["id"] for r in got] == [f"t{i}" for i in range(5)]
    return {r["id"]: r["answer"] for r in got}


def test_answers_are_the_engines_and_resume_skips_done_ids(model_dir, reference, tmp_path):
    from transformers import AutoTokenizer

    from dist_reattn.config import load_config
    from dist_reattn.engine import Engine
    from dist_reattn.models.adapter import ReAttnModel
    from dist_reattn.models.load import load_model, resolve
    from dist_reattn.tasks.batch import prompt_parts

    # The record is what the engine generates for the documented prompt, not just any string.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head, tail = prompt_parts(tokenizer, "What is item 3?")
    ids = head + tokenizer.encode(context(3), add_special_tokens=False) + tail
    cfg = load_config(None, [s.lstrip("-") for s in SCOPE])
    engine = Engine(
        ReAttnModel(load_model(resolve(str(model_dir)), torch.float32, torch.device("cpu"))), cfg.scope, 1000
    )
    tokens = engine.generate(ids, NEW).tokens
    assert reference["t3"] == tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(set(reference.values())) > 1  # different contexts, different answers

    tasks = write_tasks(tmp_path, 3)
    out = tmp_path / "answers.jsonl"
    assert run_main(*cmd(model_dir, tasks, out)) == 0
    first = records(out)
    assert [r["id"] for r in first] == ["t0", "t1", "t2"]
    r = first[0]
    assert (
        r["prompt_tokens"]
        == len(head)
        + len(tokenizer.encode(context(0), add_special_tokens=False))
        + len(prompt_parts(tokenizer, "What is item 0?")[1])
        and r["prompt_tokens"] > 128 + 4
    )  # beyond sink + local: the retrieval step ran
    assert (r["new_tokens"], r["local"], r["chunk"], r["mode"], r["world"]) == (
        NEW,
        128,
        64,
        "reattention",
        1,
    )
    assert r["seconds"] > 0 and r["prefill_tok_s"] > 0 and r["model"] == str(model_dir)

    write_tasks(tmp_path, 2, start=3)  # the file grows; only the new ids run
    assert run_main(*cmd(model_dir, tasks, out)) == 0
    second = records(out)
    assert second[:3] == first
    assert [r["id"] for r in second] == [f"t{i}" for i in range(5)]
    assert {r["id"]: r["answer"] for r in second} == reference
    assert run_main(*cmd(model_dir, tasks, out)) == 0  # all done: nothing appended
    assert records(out) == second


def test_malformed_lines_get_error_records_and_the_job_goes_on(model_dir, reference, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "c1.txt").write_text(context(1))
    good = {"question": "What is item 1?"}
    lines = [
        json.dumps({"id": "t0", "context": context(0), "question": "What is item 0?"}),
        "{not json",
        json.dumps({"context": "x", "question": "q"}),  # no id
        json.dumps({"id": "noq", "context": "x"}),
        json.dumps({"id": "both", "context": "x", "context_file": "docs/c1.txt", **good}),
        json.dumps({"id": "neither", **good}),
        json.dumps({"id": "nofile", "context_file": "docs/missing.txt", **good}),
        json.dumps({"id": "t1", "context_file": "docs/c1.txt", **good}),  # relative to the task file
        json.dumps({"id": "model", "context": "x", "overrides": {"model.dtype": "bf16"}, **good}),
        json.dumps({"id": "chunk", "context": "x", "overrides": {"scope.chunk": 0}, **good}),
        json.dumps({"id": "frac", "context": "x", "overrides": {"scope.topk": 2.5}, **good}),
        json.dumps({"id": "passwd", "context_file": "/etc/passwd", **good}),  # outside the context root
        json.dumps({"id": "typo", "context": "x", "questoin": "q", **good}),
        json.dumps({"id": "t1", "context": "x", **good}),  # duplicate id
        json.dumps({"id": "wide", "context": "lamp " * 9000, "overrides": {"scope.span": 1100}, **good}),
        json.dumps(
            {
                "id": 7,
                "context": context(2),
                "question": "What is item 2?",
                "overrides": {"scope.mode": "full"},
            }
        ),
    ]
    (tmp_path.parent / "outside.txt").write_text(context(3))  # exists, but not under the root
    lines.append(json.dumps({"id": "up", "context_file": "../outside.txt", **good}))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    assert run_main(*cmd(model_dir, tasks, out)) == 0
    got = {str(r["id"]): r for r in records(out)}
    assert len(got) == len(records(out)) == len(lines)  # one record per line, no id twice
    for i in ("t0", "t1", "7"):
        assert "answer" in got[i] and "error" not in got[i], got[i]
    assert got["t0"]["answer"] == reference["t0"] and got["t1"]["answer"] == reference["t1"]
    assert got["7"]["mode"] == "full" and got["t0"]["mode"] == "reattention"
    expected = {
        "line:2": "not valid JSON",
        "line:3": "id missing",
        "noq": "question missing",
        "both": "exactly one of context or context_file",
        "neither": "exactly one of context or context_file",
        "nofile": "docs/missing.txt' not found",
        "model": "only scope.* may vary per task",
        "chunk": "scope.chunk=0 must be > 0",
        "frac": "scope.topk='2.5' is not a valid int",
        "passwd": "context_file '/etc/passwd' is outside the context root",
        "up": "context_file '../outside.txt' is outside the context root",
        "typo": "unknown field(s) questoin",
        "line:14": "duplicate id 't1' (first on line 8)",
        "wide": "4 + 8 * 1100 + 128 = 8932 positions, beyond the model's trained window of 8192",
    }
    for rid, message in expected.items():
        assert message in got[rid].get("error", ""), (rid, got[rid])
    # Error records count as done: a re-run appends nothing and does not retry the bad lines.
    before = out.read_text()
    assert run_main(*cmd(model_dir, tasks, out)) == 0
    assert out.read_text() == before


def test_a_task_that_does_not_fit_stops_the_job_and_records_nothing(model_dir, tmp_path, capsys):
    # Whether a task fits depends on the run (dtype, ranks, memory free now), not on the task: the
    # job stops before any task, and no record (not even the bad JSON line's) makes a re-run skip it.
    good = {"context": "x", "question": "q"}
    lines = ["{not json", json.dumps({"id": "huge", "max_new_tokens": 10**13, **good})]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(lines) + "\n")
    out = tmp_path / "sub" / "answers.jsonl"
    assert run_main(*cmd(model_dir, tasks, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tasks}:2: task 'huge' does not fit this run: "), err
    assert "nothing was recorded" in err[0]
    assert not out.parent.exists()


def test_context_root_flag(model_dir, reference, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "c1.txt").write_text(context(1))
    (tmp_path / "jobs").mkdir()
    tasks = tmp_path / "jobs" / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t1", "context_file": "c1.txt", "question": "What is item 1?"}) + "\n")
    out = tmp_path / "answers.jsonl"
    assert run_main(*cmd(model_dir, tasks, out), "--context-root", str(tmp_path / "docs")) == 0
    (got,) = records(out)
    assert got["answer"] == reference["t1"]


def test_out_in_a_folder_not_yet_there(model_dir, reference, tmp_path):
    # Job scripts name a fresh folder per job (OUT=runs/batch-<job id>): the first answer creates it.
    tasks = write_tasks(tmp_path, 1)
    out = tmp_path / "job-17" / "answers.jsonl"
    assert run_main(*cmd(model_dir, tasks, out), "--check") == 0  # what the job scripts run first
    assert not out.parent.exists()  # --check creates nothing
    assert run_main(*cmd(model_dir, tasks, out)) == 0
    assert [(r["id"], r["answer"]) for r in records(out)] == [("t0", reference["t0"])]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--in", "/no/such/tasks.jsonl", "--out", "x.jsonl"], "--in '/no/such/tasks.jsonl': no such file"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
        (["--scope.chunk=0"], "scope.chunk=0 must be > 0"),
        (["--model", "/no/such/model"], "model '/no/such/model' not found"),
        (["--out", "{dir}"], "is a directory"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    tasks = write_tasks(tmp_path, 1)
    base = {"--in": str(tasks), "--out": str(tmp_path / "a.jsonl")}
    given = [a.replace("{dir}", str(tmp_path)) for a in args]
    for flag, value in base.items():
        if flag not in given:
            given += [flag, value]
    assert run_main(*given) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "a.jsonl").exists()


# The signal tests run the 5 reference tasks and LONG - 5 more: a task takes ~0.1 s on a fast CPU,
# so the run must outlast the test's 50 ms polling and the signal's delivery by a wide margin.
LONG = 40


def test_kill_9_mid_run_then_resume_gives_each_id_once_and_the_same_answers(model_dir, reference, tmp_path):
    tasks = write_tasks(tmp_path, LONG)
    out = tmp_path / "answers.jsonl"
    proc = spawn(model_dir, tasks, out)
    wait_for_answers(out, 2, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    killed = records(out)
    assert 2 <= len(killed) < LONG, "the kill must land before the run finished"
    assert run_main(*cmd(model_dir, tasks, out)) == 0
    final = records(out)
    assert final[: len(killed)] == killed
    assert sorted(r["id"] for r in final) == sorted(f"t{i}" for i in range(LONG))  # every id once
    assert {r["id"]: r["answer"] for r in final if r["id"] in reference} == reference


def test_sigterm_stops_keeping_the_records_and_says_how_to_resume(model_dir, reference, tmp_path):
    tasks = write_tasks(tmp_path, LONG)
    out = tmp_path / "answers.jsonl"
    proc = spawn(model_dir, tasks, out)
    wait_for_answers(out, 1, proc)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10, "SIGTERM must stop the job promptly"
    assert proc.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGTERM: ") and "re-run the same command to resume" in last, last
    kept = records(out)
    assert 1 <= len(kept) < LONG and [r["id"] for r in kept] == [f"t{i}" for i in range(len(kept))]
    assert all(reference[r["id"]] == r["answer"] for r in kept if r["id"] in reference)
    assert f"{len(kept)} of {LONG} tasks answered this run" in last, last


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_give_the_same_answers_as_one_node(model_dir, reference, tmp_path):
    # 4 ranks > 3 KV heads: tensor parallelism switches itself off, every rank runs the whole model
    # and the KV cache and scoring are sharded 4 ways, across the two "nodes" or within one.
    tasks = write_tasks(tmp_path, 3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]
    script = [str(ROOT / "launch" / "batch.py"), "--debug.check_consensus=true"]
    one = subprocess.run(
        [
            *run,
            "--standalone",
            "--nproc_per_node",
            "4",
            *script,
            *cmd(model_dir, tasks, tmp_path / "one.jsonl"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    rdzv = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "batch-test"]
    nodes = [
        subprocess.Popen(
            [
                *run,
                "--nnodes",
                "2",
                "--nproc_per_node",
                "2",
                *rdzv,
                *script,
                *cmd(model_dir, tasks, tmp_path / "two.jsonl"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    a, b = records(tmp_path / "one.jsonl"), records(tmp_path / "two.jsonl")
    assert [r["id"] for r in a] == [r["id"] for r in b] == ["t0", "t1", "t2"]  # one writer: no duplicates
    assert [r["answer"] for r in a] == [r["answer"] for r in b] == [reference[r["id"]] for r in a]
    assert {r["world"] for r in a + b} == {4}


def _batch_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    from test_distributed import torchrun_env

    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    assert batch.main(argv) == 0


def test_a_task_with_a_wider_scope_gets_the_same_answer_on_two_ranks(model_dir, tmp_path):
    # Issue #26: the job's scope (local 128) sized the replicated window of recent tokens; a task
    # that raises scope.local past it must not read stale ring rows on two ranks. ~500-token prompts
    # run retrieval past sink + 320; the ring of an engine built for local 128 holds 4 + 128 + 64.
    import torch.multiprocessing as mp

    lines = [
        {"id": "base", "context": context(5, words=400), "question": "What is item 5?", "max_new_tokens": 8},
        {
            "id": "wide",
            "context": context(6, words=400),
            "question": "What is item 6?",
            "max_new_tokens": 8,
            "overrides": {"scope.local": 320},
        },
    ]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(x) + "\n" for x in lines))
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run_main(*cmd(model_dir, tasks, one)) == 0
    mp.spawn(_batch_rank, args=(2, _free_port(), cmd(model_dir, tasks, two)), nprocs=2, join=True)
    a, b = records(one), records(two)
    assert [(r["id"], r["local"], r["world"]) for r in a] == [("base", 128, 1), ("wide", 320, 1)]
    assert [(r["id"], r["local"], r["world"]) for r in b] == [("base", 128, 2), ("wide", 320, 2)]
    assert a[1]["prompt_tokens"] > 4 + 320 + 64  # past sink + local: the wide task retrieves
    assert [r["answer"] for r in b] == [r["answer"] for r in a]
