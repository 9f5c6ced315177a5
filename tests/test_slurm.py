"""The Slurm templates under real daemons: sbatch --test-only, bad input, two nodes, pre-emption + requeue.

``launch/slurm/local_cluster.sh up 2`` (apt-get installs slurm-wlm and munge where they are missing)
starts munged, slurmctld and two slurmd daemons on this host (nodes n1 and n2 of partition ``cpu``,
each with this host's cores); the module stops them at the end (``down``). Where that cannot be
done (not root, no apt-get, daemons that do not start) every test here skips with the script's reason.

The templates run as a user would submit them, with the GPU lines overridden on the command line
(``--partition=cpu --gpus-per-node=0 --cpus-per-task=2``, ``GPUS`` = ranks per node) and batch jobs
of SmolLM2-135M over three ~500-token NIAH tasks on 2 gloo ranks. The scope (sink 16, local 256,
chunk 128) puts every prompt past sink + local, so retrieval runs; contexts beyond the model's 8K
window would cost minutes per task on two shared cores (measured: ~190 s for one 8.8K task). The
two-node job loads the bundled GGUF (the templates' default MODEL); the pre-emption job, which starts
twice, loads the same weights from their HF copy (conftest.py), in a second instead of ~20 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "launch" / "slurm"
TEMPLATES = sorted(SLURM.glob("*.sbatch"))
# What a CPU cluster needs instead of the templates' GPU lines (command-line options win over #SBATCH).
CPU = ["--partition=cpu", "--gpus-per-node=0", "--cpus-per-task=2"]
EXTRA = "--scope.sink=16 --scope.local=256 --scope.chunk=128 --max-new-tokens 12"
N_TASKS, LEN = 3, 512
JOB_TIMEOUT = 1200  # seconds for one model-loading job: two shared cores, SmolLM2 loads in each rank

pytestmark = pytest.mark.cluster


@dataclass
class Cluster:
    env: dict
    """The environment for sbatch, scontrol, ... (SLURM_CONF set)."""
    state: Path
    """The cluster's folder: slurm.conf, logs, spool."""


def _free_port(span: int = 1) -> int:
    """A port p with p .. p + span - 1 free now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span >= 65535:
            continue
        try:
            for q in range(port + 1, port + span):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", q))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {span} free consecutive ports")


def _cluster_script(action: str, env: dict) -> subprocess.CompletedProcess:
    args = ["bash", str(SLURM / "local_cluster.sh"), action] + (["2"] if action == "up" else [])
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("the local Slurm cluster needs Linux and bash")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_PORT": str(_free_port(3))}
    t0 = time.monotonic()
    up = _cluster_script("up", env)
    try:
        if up.returncode != 0:
            why = (up.stderr.strip().splitlines() or [f"exit status {up.returncode}"])[-1]
            pytest.skip(f"no local Slurm cluster: {why}")
        print(f"local cluster up in {time.monotonic() - t0:.0f} s: {up.stderr.strip().splitlines()[-1]}")
        yield Cluster({**env, "SLURM_CONF": str(state / "slurm.conf")}, state)
    finally:
        down = _cluster_script("down", env)
        assert down.returncode == 0, down.stderr


def slurm(cluster: Cluster, *args: str) -> str:
    run = subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"{' '.join(args)}: {run.stderr.strip()}"
    return run.stdout


def submit(cluster: Cluster, folder: Path, template: str, options: list[str], **variables: str) -> str:
    """sbatch from the checkout (the templates cd to the submit folder) with the template's variables
    in the environment; the job's output and error files go to ``folder``. Returns the job id."""
    env = {**cluster.env, "VENV": sys.prefix, **variables}
    logs = [f"--output={folder}/%x-%j.out", f"--error={folder}/%x-%j.err"]
    run = subprocess.run(
        ["sbatch", "--parsable", *CPU, *options, *logs, str(SLURM / template)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip().split(";")[0]


def job(cluster: Cluster, job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, RunTime, NodeList, ...)."""
    line = slurm(cluster, "scontrol", "show", "job", "--oneliner", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", line))


def state_line(info: dict[str, str]) -> str:
    keys = ("JobId", "JobState", "Reason", "ExitCode", "Restarts", "RunTime", "NodeList")
    return " ".join(f"{k}={info.get(k)}" for k in keys)


def wait_for(what: str, check, timeout: float = JOB_TIMEOUT, every: float = 1.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = check()
        if got:
            return got
        time.sleep(every)
    pytest.fail(f"{what}: not within {timeout} s")


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def wait_ended(cluster: Cluster, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    def ended():
        info = job(cluster, job_id)
        return info if info["JobState"] in ENDED else None

    info = wait_for(f"job {job_id} to end", ended, timeout)
    print(state_line(info))
    return info


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]  # raises on a torn line


def seconds(runtime: str) -> int:
    """Slurm's [D-]HH:MM:SS as seconds."""
    days, _, hms = runtime.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


@pytest.fixture(scope="module")
def tasks(smollm2_tokenizer, tmp_path_factory) -> Path:
    from dist_reattn.tasks.batch import write_niah_tasks

    folder = tmp_path_factory.mktemp("tasks")
    return write_niah_tasks(smollm2_tokenizer, folder, LEN, [0.1, 0.5, 0.9][:N_TASKS])


@pytest.mark.parametrize("template", [t.name for t in TEMPLATES])
def test_sbatch_test_only_accepts_every_template(cluster, template):
    run = subprocess.run(
        ["sbatch", "--test-only", *CPU, str(SLURM / template)],
        env=cluster.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "to start at" in run.stderr, run.stderr
    # The templates' own --nodes: 2 for multi_node (4 CPUs: 2 per task), 1 for one_node.
    nodes = r"n\[1-2\]" if template == "multi_node.sbatch" else r"n[12]"
    assert re.search(rf"using \d+ processors on nodes {nodes} in partition cpu", run.stderr), run.stderr


@pytest.mark.parametrize(
    "template,variables,message",
    [
        ("one_node.sbatch", {"IN": "no/such/tasks.jsonl"}, "error: --in 'no/such/tasks.jsonl': no such file"),
        ("multi_node.sbatch", {"MODEL": "/no/such/model"}, "error: model '/no/such/model' not found"),
    ],
)
def test_bad_input_fails_in_seconds_with_one_error_line_and_no_requeue(
    cluster, tasks, tmp_path, template, variables, message
):
    # REQUEUE=1 and --requeue: a job that the template would requeue on SIGTERM must not requeue
    # itself on bad input, or it would fail again and again.
    given = {"GPUS": "1", "TASK": "batch", "IN": str(tasks), "OUT": str(tmp_path / "out"), "REQUEUE": "1"}
    job_id = submit(cluster, tmp_path, template, ["--requeue"], **{**given, **variables})
    info = wait_ended(cluster, job_id, timeout=300)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), info
    assert seconds(info["RunTime"]) < 60, info["RunTime"]  # the check runs before torchrun
    err = (tmp_path / f"dist-reattn-{job_id}.err").read_text().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "out").exists()
    time.sleep(3)
    assert job(cluster, job_id)["JobState"] == "FAILED"  # still: not requeued


@pytest.fixture(scope="module")
def two_nodes(cluster, tasks, tmp_path_factory):
    """multi_node.sbatch on 2 nodes x 1 rank (two slurmd on this host), uninterrupted: (job, records)."""
    folder = tmp_path_factory.mktemp("two_nodes")
    variables = {"GPUS": "1", "TASK": "batch", "IN": str(tasks), "OUT": str(folder / "run")}
    variables.update(EXTRA=EXTRA, PORT=str(_free_port()))
    job_id = submit(cluster, folder, "multi_node.sbatch", ["--nodes=2"], **variables)
    info = wait_ended(cluster, job_id)
    log = (folder / f"dist-reattn-{job_id}.err").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    return info, records(folder / "run" / "answers.jsonl")


@pytest.mark.slow
def test_multi_node_template_runs_two_nodes_with_one_rank_each(two_nodes):
    info, got = two_nodes
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2", info
    assert sorted(r["id"] for r in got) == [f"niah-{i}" for i in range(N_TASKS)]
    assert {r["world"] for r in got} == {2}
    assert all(r["prompt_tokens"] > 16 + 256 for r in got)  # beyond sink + local: retrieval ran
    # The answers differ per task, so comparing them with another run below means something.
    assert len({r["answer"] for r in got}) == N_TASKS, [r["answer"] for r in got]


@pytest.mark.slow
def test_preempted_job_exits_143_keeps_its_answers_and_resumes_after_requeue(
    cluster, tasks, two_nodes, smollm2_hf, tmp_path
):
    out = tmp_path / "run" / "answers.jsonl"
    variables = {"GPUS": "2", "TASK": "batch", "IN": str(tasks), "OUT": str(tmp_path / "run")}
    variables.update(MODEL=str(smollm2_hf), EXTRA=f"{EXTRA} --config smollm2-135m")
    job_id = submit(cluster, tmp_path, "one_node.sbatch", ["--nodes=1", "--requeue"], **variables)
    wait_for("the first answer", lambda: out.exists() and out.read_text().count('"answer"') >= 1)
    slurm(cluster, "scancel", "--signal=TERM", "--full", job_id)
    stopped = wait_ended(cluster, job_id, timeout=120)
    assert (stopped["JobState"], stopped["ExitCode"]) == ("FAILED", "143:0"), stopped
    kept = records(out)
    print(f"after SIGTERM: {len(kept)} answers, ids {[r['id'] for r in kept]}")
    assert 1 <= len(kept) < N_TASKS, "SIGTERM must land before the last task"
    err = (tmp_path / f"dist-reattn-{job_id}.err").read_text()
    assert f"stopped by SIGTERM: {len(kept)} of {N_TASKS} tasks answered this run" in err, err[-3000:]

    slurm(cluster, "scontrol", "requeue", job_id)
    done = wait_ended(cluster, job_id)
    assert (done["JobState"], done["ExitCode"], done["Restarts"]) == ("COMPLETED", "0:0", "1"), done
    final = records(out)
    print(f"after requeue: {len(final)} answers, ids {[r['id'] for r in final]}")
    assert final[: len(kept)] == kept  # the records of the first run are untouched
    assert sorted(r["id"] for r in final) == [f"niah-{i}" for i in range(N_TASKS)]  # each id once
    _, reference = two_nodes  # the same 2 ranks, settings and weights (from the GGUF), never interrupted
    assert {r["id"]: r["answer"] for r in final} == {r["id"]: r["answer"] for r in reference}
    assert {r["world"] for r in final} == {2}
    log = (tmp_path / f"dist-reattn-{job_id}.out").read_text()  # appended across the two runs
    assert "exit status 143" in log and log.rstrip().endswith("exit status 0"), log


@pytest.mark.slow
def test_requeue_1_makes_the_template_requeue_itself_on_sigterm(cluster, tasks, tmp_path):
    # The template's own requeue (REQUEUE=1 with sbatch --requeue): once SIGTERM has stopped the ranks,
    # the script calls scontrol requeue on its own job. The requeued run is cancelled unseen: that it
    # resumes is what the test above shows.
    variables = {"GPUS": "2", "TASK": "batch", "IN": str(tasks), "OUT": str(tmp_path / "run")}
    variables.update(EXTRA=EXTRA, REQUEUE="1")
    job_id = submit(cluster, tmp_path, "one_node.sbatch", ["--nodes=1", "--requeue"], **variables)
    log = tmp_path / f"dist-reattn-{job_id}.out"
    wait_for("torchrun to start", lambda: log.exists() and "torchrun --nproc_per_node 2" in log.read_text())
    slurm(cluster, "scancel", "--signal=TERM", "--full", job_id)
    requeued = wait_for(
        "the requeue", lambda: (info := job(cluster, job_id))["Restarts"] == "1" and info, 120
    )
    slurm(cluster, "scancel", job_id)
    print(state_line(requeued))
    assert requeued["JobState"] in {"REQUEUED", "PENDING", "RUNNING"}, requeued
    assert "exit status 143" in log.read_text(), log.read_text()
