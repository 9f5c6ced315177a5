"""RULER tasks: generators against hand-checked properties, lengths with the real SmolLM2 tokenizer,
the scoring functions, bad input, and one short launch/ruler.py run on a tiny random model."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from dist_reattn.tasks.ruler import (
    CWE_INSTRUCTION,
    NIAH_TASKS,
    TASKS,
    VT_INSTRUCTION,
    answer_tokens,
    build_sample,
    min_length,
    score,
    string_match_all,
    string_match_part,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def samples(tokenizer):
    return {t: build_sample(tokenizer, t, 4096, seed=5) for t in TASKS}


@pytest.mark.parametrize("length", [4096, 16 * 1024])
def test_lengths_within_one_percent_never_above(tokenizer, length):
    for task in TASKS:
        s = build_sample(tokenizer, task, length, seed=1)
        total = s.prompt_tokens + s.max_new_tokens
        assert 0.99 * length <= total <= length, (task, total)
        assert s.input_ids == tokenizer.encode(
            tokenizer.decode(s.input_ids), add_special_tokens=False, verbose=False
        )


def test_task_configs_are_rulers():
    got = {
        n: (s.haystack, s.key_kind, s.value_kind, s.num_keys, s.num_values, s.num_queries)
        for n, s in TASKS.items()
    }
    assert got["niah_single_1"] == ("noise", "words", "numbers", 1, 1, 1)
    assert got["niah_single_2"] == ("essay", "words", "numbers", 1, 1, 1)
    assert got["niah_single_3"] == ("essay", "words", "uuids", 1, 1, 1)
    assert got["niah_multikey_1"] == ("essay", "words", "numbers", 4, 1, 1)
    assert got["niah_multikey_2"] == ("needle", "words", "numbers", 1, 1, 1)
    assert got["niah_multikey_3"] == ("needle", "uuids", "uuids", 1, 1, 1)
    assert got["niah_multivalue"] == ("essay", "words", "numbers", 1, 4, 1)
    assert got["niah_multiquery"] == ("essay", "words", "numbers", 4, 1, 4)  # num_needle_k = max(k, q)
    assert {n: s.max_new_tokens for n, s in TASKS.items() if s.kind != "niah"} == {
        "vt": 30,
        "cwe": 120,
        "fwe": 50,
    }
    assert all(TASKS[n].max_new_tokens == 128 and TASKS[n].metric == "all" for n in NIAH_TASKS)


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_needles_keys_values_queries(samples, task):
    s, spec = samples[task], TASKS[task]
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: ([\w-]+)\.", s.context)
    real = [(k, v) for k, v in needles if v in s.answers]
    # Every answer is written once, as a needle of a key the question asks about.
    assert len(s.answers) == spec.num_values * spec.num_queries
    assert len(real) == len(s.answers) and {v for _, v in real} == set(s.answers)
    for key, value in real:
        assert s.context.count(value) == 1 and s.context.count(f" for {key} is:") == spec.num_values
        assert key in s.question and key in s.answer_prefix
    if spec.haystack == "needle":
        assert len(needles) == s.units + 1  # distractors, each with another key
    else:
        assert len(needles) == spec.num_keys * spec.num_values
        assert len({k for k, _ in needles}) == spec.num_keys
    kinds = {
        "numbers": r"[1-9]\d{6}",
        "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}",
    }
    assert all(re.fullmatch(kinds[spec.value_kind], a) for a in s.answers)
    singular = len(s.answers) == 1
    assert s.context.startswith("A special magic" if singular else "Some special magic")
    assert s.answer_prefix.endswith("text is" if singular else "text are")
    if spec.haystack == "noise":
        assert s.context.count("The grass is green.") == s.units
    if spec.haystack == "essay":
        assert "The grass is green" not in s.context and "Python" in s.context


@pytest.mark.parametrize("task", [*NIAH_TASKS, "vt"])
def test_answer_tokens_spell_every_occurrence(tokenizer, samples, task):
    s = samples[task]
    found = answer_tokens(tokenizer, s)
    runs, run = [], [found[0]]
    for i in found[1:]:  # split into runs of consecutive tokens, one per occurrence
        if i == run[-1] + 1:
            run.append(i)
        else:
            runs.append(run)
            run = [i]
    runs.append(run)
    texts = [tokenizer.decode([s.input_ids[i] for i in r]) for r in runs]
    occurrences = sum(s.context.count(a) for a in s.answers)
    assert len(runs) == occurrences, texts  # vt: a name and its next hop never touch
    assert all(any(a in x for a in s.answers) for x in texts), texts
    # the tokens cover no more than the answer: without either end token, the answer is gone
    assert all(
        not any(a in tokenizer.decode([s.input_ids[i] for i in r[1:]]) for a in s.answers) for r in runs
    )
    assert all(
        not any(a in tokenizer.decode([s.input_ids[i] for i in r[:-1]]) for a in s.answers) for r in runs
    )
    assert max(found) < s.prompt_tokens - len(tokenizer.encode(s.question, add_special_tokens=False))


def test_vt_chain_resolves_to_the_answers(samples):
    s = samples["vt"]
    body = s.context.split(VT_INSTRUCTION)[-1]  # after the solved example
    assigned = dict(re.findall(r"VAR (\w+) = (.+)", body))
    assert len(assigned) == 5 and all(len(name) == 5 for name in assigned)
    value = re.search(r"the value (\d+)", s.question).group(1)
    resolved = {name for name in assigned if _resolve(assigned, name) == value}
    assert resolved == set(s.answers) and len(s.answers) == 5
    assert f"5 variables are assigned the value {value}" in s.answer_prefix
    example = s.context.split(VT_INSTRUCTION)[1]
    assert len(re.findall(r"VAR (\w{3}) = ", example)) == 5  # the example's chain, 3-letter names


def _resolve(assigned: dict, name: str) -> str:
    value = assigned[name]
    while value.startswith("VAR "):
        value = assigned[value[4:].strip()]
    return value


def test_cwe_answers_are_the_most_common_words(samples):
    s = samples["cwe"]
    listed = s.context.split(CWE_INSTRUCTION)[-1]
    words = re.findall(r"\d+\. (\S+)", listed)
    counts = Counter(words)
    assert {w for w, c in counts.items() if c == 30} == set(s.answers) and len(s.answers) == 10
    assert {c for w, c in counts.items() if w not in s.answers} == {3}
    assert [int(n) for n in re.findall(r"(\d+)\. ", listed)] == list(range(1, len(words) + 1))


def test_fwe_answers_are_the_most_frequent_words(samples):
    s = samples["fwe"]
    counts = Counter(w for w in s.context.split() if re.fullmatch(r"[a-z]{6}", w))
    assert [w for w, _ in counts.most_common(3)] == s.answers
    assert counts.most_common(4)[2][1] > counts.most_common(4)[3][1]  # no tie with the 4th
    assert s.context.count("...") > counts[s.answers[0]]  # the noise "word" outnumbers them all


def test_deterministic_and_seeded(tokenizer):
    for task in ("niah_multikey_2", "vt", "cwe"):
        a, b = build_sample(tokenizer, task, 2048, seed=3), build_sample(tokenizer, task, 2048, seed=3)
        assert a == b
        assert build_sample(tokenizer, task, 2048, seed=4).answers != a.answers


def test_too_short_and_unknown(tokenizer):
    for task in ("niah_single_1", "vt"):
        shortest = min_length(tokenizer, task)
        with pytest.raises(ValueError, match="too short"):
            build_sample(tokenizer, task, shortest - 1, seed=0)
        s = build_sample(tokenizer, task, shortest, seed=0)
        assert s.prompt_tokens + s.max_new_tokens <= shortest
    with pytest.raises(ValueError, match="unknown RULER task 'qa_1'"):
        build_sample(tokenizer, "qa_1", 4096, seed=0)


def test_scoring():
    # RULER's metrics: case-insensitive substring; "all" gives partial credit, "part" any match.
    assert string_match_all(" 1234567 and 7654321.", ["1234567", "7654321"]) == 1.0
    assert string_match_all(" only 1234567", ["1234567", "7654321"]) == 0.5
    assert string_match_all("ABCDE, FGHIJ", ["abcde", "fghij", "klmno", "pqrst"]) == 0.5
    assert string_match_all("", ["x"]) == 0.0
    assert string_match_part(" only 1234567", ["1234567", "7654321"]) == 1.0
    assert string_match_part(" nothing", ["1234567", "7654321"]) == 0.0
    assert score("The Answer: Blue-Car\n", ["blue-car"], "all") == 1.0
    assert score("\x00 12345678", ["1234567"], "all") == 1.0  # a substring, as in RULER


def _launch():
    spec = importlib.util.spec_from_file_location("ruler_launch", ROOT / "launch" / "ruler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "niah,qa_1"], "--tasks 'qa_1' is not a RULER task"),
        (["--samples", "0"], "--samples 0 must be >= 1"),
        (["--mode", "full,full"], "names full twice"),
        (["--mode", "dense"], "--mode 'dense' is not one of"),
        (["--len", "8Q"], "is not a positive token count"),
        (["--len", "200", "--ceiling", "none"], "--len 200 is too short for RULER niah_single_1: use >="),
        (["--ceiling", "64K"], "--ceiling 65536 is beyond the model's window"),
        (["--fp8-audit", "0,4"], "--fp8-audit audits scope.scoring=fp8: add --scope.scoring=fp8"),
        (["--fp8-audit", "0,13", "--scope.scoring=fp8"], "--fp8-audit margin 13 is outside 0..12"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    code = _launch().main([*args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()


def _tiny_shape(tmp_path) -> Path:
    shape = tmp_path / "shape"
    shape.mkdir()
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 49152, "max_position_embeddings": 2048,
        "eos_token_id": 2, "bos_token_id": 1,
    }  # fmt: skip
    (shape / "config.json").write_text(json.dumps(config))
    return shape


def test_short_run_writes_resumes_and_reports(tmp_path, capsys):
    shape = _tiny_shape(tmp_path)
    out = tmp_path / "run"
    args = ["--model", f"random:{shape}", "--tasks", "niah_single_1", "--len", "1000", "--ceiling", "800",
            "--mode", "reattention", "--scope.local=256", "--scope.chunk=128", "--max-new-tokens", "2",
            "--out", str(out)]  # fmt: skip
    launch = _launch()
    assert launch.main(args) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["task"], r["len"], r["mode"]) for r in records] == [
        ("niah_single_1", 800, "full"),
        ("niah_single_1", 1000, "reattention"),
    ]
    for r in records:
        assert 0.0 <= r["score"] <= 1.0 and r["metric"] == "all" and len(r["answers"]) == 1
        assert r["prompt_tokens"] + 128 <= r["len"] and r["ceiling_len"] == 800 and r["seconds"] > 0
    table = (out / "table.md").read_text()
    assert "| niah_single_1 | 1000 | reattention |" in table and "retention" in table
    assert (out / "scores.png").stat().st_size > 1000
    capsys.readouterr()
    assert launch.main([*args, "--samples", "1"]) == 0  # all recorded: nothing re-run
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert launch.main([*args, "--samples", "2", "--scope.topk=8"]) == 2  # other settings: not mixed in
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds results made with topk=4 (this run: 8)" in err[0], err
    assert len((out / "results.jsonl").read_text().splitlines()) == 2


def test_recall_counts_the_answer_in_each_layers_scope(tokenizer, tmp_path, capsys):
    """--recall on a tiny model: a recall clip that covers the whole middle holds the needle in every
    layer; streaming holds exactly the needle's tokens that fall in the sink or the local window."""
    out, n = tmp_path / "run", 1000
    args = ["--model", f"random:{_tiny_shape(tmp_path)}", "--tasks", "niah_single_1,niah_multivalue",
            "--len", str(n), "--ceiling", "none", "--mode", "reattention,streaming,full", "--scope.local=256",
            "--scope.chunk=128", "--max-new-tokens", "2", "--diagnose", "--out", str(out)]  # fmt: skip
    assert _launch().main(args) == 0
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        sample = build_sample(tokenizer, r["task"], n, seed=0)
        where = answer_tokens(tokenizer, sample)
        kept = [i for i in where if i < 32 or i >= sample.prompt_tokens - 256]
        want = {"reattention": [1.0, 1.0], "streaming": [len(kept) / len(where)] * 2, "full": None}
        assert r["scope_recall"] == want[r["mode"]], (r["task"], r["mode"], r["scope_recall"])
    assert any(
        0 < r["scope_recall"][0] < 1 for r in records if r["mode"] == "streaming"
    )  # not a trivial case
    assert "| recall |" in (out / "table.md").read_text()
    # --diagnose: the probe's ranks of every scoring, per layer and query head, on the reattention runs
    for r in records:
        if r["mode"] != "reattention":
            assert "probe_ranks" not in r
            continue
        assert set(r["probe_ranks"]) == {"paper", "qkv", "qkv2", "qk_pe", "block_mean"}
        assert r["probe_middle"] == r["prompt_tokens"] - 32 - 256
        for layers in r["probe_ranks"].values():
            assert len(layers) == 2 and all(
                len(h) == 4 and all(0 <= x < r["probe_middle"] for x in h) for h in layers
            )
        assert set(r["probe_fused"]) == {"zsum", "zsum_upto", "psum", "psum_upto"}
        for layers in r["probe_fused"].values():
            assert len(layers) == 2 and all(0 <= x < r["probe_middle"] for x in layers)
    from dist_reattn.report.selection_report import report

    tables = report(records)
    assert "| niah_single_1 | 1000 | paper |" in tables and "| noise | 1000 | qkv |" in tables
    assert "| noise | 1000 | zsum_upto |" in tables


def test_fp8_audit(tmp_path):
    """--fp8-audit on a tiny model: at the audited chunk (end 1024 = 16 chunks of 64) the middle is
    736 keys, 12 tiles of 64, so margin 12 keeps every tile: exact rows and the exact scope."""
    out = tmp_path / "run"
    args = ["--model", f"random:{_tiny_shape(tmp_path)}", "--tasks", "niah_single_1", "--len", "1500",
            "--ceiling", "none", "--mode", "reattention", "--scope.local=256", "--scope.chunk=64",
            "--scope.scoring=fp8", "--max-new-tokens", "2", "--fp8-audit", "0,12", "--out", str(out)]  # fmt: skip
    assert _launch().main(args) == 0
    (r,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    audit = r["fp8_audit"]
    assert set(audit) == {"0", "12"}
    assert audit["12"] == {
        "rows_equal": 1.0,
        "jaccard": 1.0,
        "jaccard_min": 1.0,
        "rows": 2 * 64 * 4,
        "scopes": 2,
    }
    assert 0 <= audit["0"]["jaccard_min"] <= audit["0"]["jaccard"] <= 1 and 0 <= audit["0"]["rows_equal"] <= 1
    from dist_reattn.report.selection_report import report

    assert "| 1500 | 12 | 1 | 1.000 | 1.000 | 1.000 | 512 | 2 |" in report([r])


def test_batch_tasks_carry_answers_and_score(tokenizer, tmp_path):
    from dist_reattn.report.ruler_report import _from_batch
    from dist_reattn.tasks.batch import write_ruler_tasks

    path = write_ruler_tasks(tokenizer, tmp_path, 2048, ["niah_multivalue", "vt"], 1, seed=2)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["niah_multivalue-0", "vt-0"] and lines[1]["max_new_tokens"] == 30
    for x in lines:
        context = (tmp_path / x["context_file"]).read_text()
        assert all(a in context for a in x["meta"]["answers"])
    record = {
        "id": "vt-0",
        "answer": " ".join(lines[1]["meta"]["answers"][:4]),
        "mode": "full",
        "meta": lines[1]["meta"],
    }
    assert _from_batch(record) == {"task": "vt", "len": 2048, "mode": "full", "score": 0.8, "seconds": None}
