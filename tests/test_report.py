"""Result files (JSONL appends under concurrency and crashes) and the NIAH table and heatmap."""

import json
import logging
import subprocess
import sys
import textwrap

from dist_reattn.report.niah_plots import length_label, plot_heatmap, summary_table
from dist_reattn.report.results import append_record, read_records

# Each writer appends records big enough (~20 KB) that a buffered or multi-part write would interleave.
_WRITER = textwrap.dedent(
    """
    import sys
    from dist_reattn.report.results import append_record
    path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(n):
        append_record(path, {"writer": name, "i": i, "pad": name * 20000})
    """
)


def test_concurrent_appends_keep_whole_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), name, "200"]) for name in ("a", "b")
    ]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]

    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]  # every line is exactly one record
    assert len(records) == 400
    for name in ("a", "b"):
        mine = [r for r in records if r["writer"] == name]
        assert [r["i"] for r in mine] == list(range(200))
        assert all(r["pad"] == name * 20000 for r in mine)
    assert read_records(path) == records


def test_torn_last_line_is_skipped_then_terminated(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    append_record(path, {"mode": "full", "correct": True})
    append_record(path, {"mode": "streaming", "correct": False})
    with open(path, "ab") as f:
        f.write(b'{"mode": "reattention", "corr')  # a writer killed mid-line

    with caplog.at_level(logging.WARNING, logger="dist_reattn.report.results"):
        records = read_records(path)
    assert [r["mode"] for r in records] == ["full", "streaming"]
    assert "unparseable" in caplog.text

    append_record(path, {"mode": "reattention", "correct": True})
    lines = path.read_bytes().split(b"\n")
    assert lines[2] == b'{"mode": "reattention", "corr'
    assert json.loads(lines[3]) == {"mode": "reattention", "correct": True}
    assert [r["mode"] for r in read_records(path)] == ["full", "streaming", "reattention"]


def test_missing_file_reads_empty(tmp_path):
    assert read_records(tmp_path / "nothing.jsonl") == []


def _records(with_rate: bool = True) -> list[dict]:
    records = []
    for mode, target, depth, correct, seconds in [
        ("full", 4096, 0.0, True, 10.0),
        ("full", 4096, 0.5, True, 12.0),
        ("full", 4096, 1.0, True, 14.0),
        ("full", 16384, 0.0, False, 40.0),
        ("full", 16384, 0.0, True, 40.0),
        ("full", 16384, 0.5, False, 40.0),
        ("reattention", 16384, 0.0, True, 20.0),
        ("reattention", 16384, 0.5, True, 20.0),
        ("reattention", 16384, 1.0, False, 26.0),
        ("reattention", 1024 * 1024, 0.5, True, 600.0),
    ]:
        # The prompt may be a few tokens short of the requested length: rows go by target_len.
        record = dict(mode=mode, len=target - 3, target_len=target, depth=depth, correct=correct)
        record.update(answer=" 1234567.", seconds=seconds)
        if with_rate:
            record["prefill_tok_s"] = target / seconds
        records.append(record)
    return records


def test_length_label():
    assert [length_label(n) for n in (1000, 1024, 16384, 1024 * 1024, 4 * 1024 * 1024, 1536)] == [
        "1000",
        "1K",
        "16K",
        "1M",
        "4M",
        "1536",
    ]


def test_summary_table():
    table = summary_table(_records())
    lines = table.splitlines()
    assert lines[0].split() == ["mode", "len", "d=0", "d=0.5", "d=1", "all", "s/trial", "prefill", "tok/s"]
    rows = [line.split() for line in lines[2:]]
    assert rows == [
        ["full", "4K", "1/1", "1/1", "1/1", "3/3", "12.0", "348"],
        ["full", "16K", "1/2", "0/1", "-", "1/3", "40.0", "410"],
        ["reattention", "16K", "1/1", "1/1", "0/1", "2/3", "22.0", "756"],
        ["reattention", "1M", "-", "1/1", "-", "1/1", "600.0", "1,748"],
    ]
    assert len({len(line) for line in lines}) == 1  # fixed width

    assert "prefill" not in summary_table(_records(with_rate=False))
    assert summary_table([]) == "(no NIAH records)"


def test_heatmap_written(tmp_path):
    path = tmp_path / "niah.png"
    plot_heatmap(_records(), path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_variants_table_keeps_runs_of_one_selection_at_other_spans_apart():
    """Runs of ``mass_shared`` at two spans on the same task and length are two rows, each averaging
    its own samples; a setting every record shares adds nothing to the label."""
    from dist_reattn.report.selection_report import variants_table

    def run(span, clip, distinct, recall, score):
        return {"mode": "reattention", "task": "niah_multivalue", "len": 32768, "select": "mass_shared",
                "span": span, "recall_clip": clip, "distinct": distinct, "topk": 4, "score": score,
                "scope_recall": [recall, recall], "prefill_seconds": 8.0}  # fmt: skip

    records = [run(32, 127, False, 1.0, 0.25), run(32, 127, False, 0.5, 0.25), run(64, 63, True, 0.25, 0.0)]
    rows = [line.split(" | ")[2:6] for line in variants_table(records).splitlines()[2:]]
    assert rows == [
        ["mass_shared span=32 clip=127 distinct=False", "25.0", "2", "0.75"],
        ["mass_shared span=64 clip=63 distinct=True", "0.0", "1", "0.25"],
    ]
    assert "| mass_shared | 25.0 | 2 | 0.75 |" in variants_table(records[:2])
