"""Batch jobs: many (context, question) tasks answered with one model load, resumable after any kill.

Task file (JSONL, one task per line)::

    {"id": "doc-1", "context": "...", "question": "Who ...?"}
    {"id": 2, "context_file": "docs/2.txt", "question": "...", "max_new_tokens": 32,
     "overrides": {"scope.topk": 8, "scope.mode": "full"}, "meta": {"anything": "copied to the record"}}

``context_file`` is read as UTF-8, relative paths against the context root (by default the task
file's folder), and a path that leads outside the root (``../x``, ``/etc/passwd``, a symlink out) is
refused. Only the ``scope`` section may vary per task: the model, its dtype and the cache layout are
fixed by the one load.

Output file (JSONL, one record per task, appended with a single write each, see
:mod:`dist_reattn.report.results`): an answer record (``id``, ``line``, ``answer``, then the
fields of a :class:`~dist_reattn.trial.Trial`: tokens, timings, the scope used, placement,
measures) or an error record ``{"id", "line", "error"}``; a line with no usable id is named
``line:N`` (its 1-based line number). Both kinds count as done: a resumed job skips every id
already in the output, so a bad line is reported once and never retried in a loop (fix it and
delete its record, or give it a new id).
Only a task's own fault becomes an error record. What depends on the run (a task that does not fit
this run's memory: dtype, ranks, what is free right now) refuses the whole job before any task runs
and before any record is written, so the same command runs it once memory allows.

Rank 0 alone reads the task file, tokenizes, writes the output, and decides the work; the other
ranks receive the plan through one ``broadcast_object`` and run the same engine steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, ScopeConfig, apply_dict
from ..distributed import Comm
from ..models.load import load_spec, load_tokenizer, resolve
from ..models.spec import ModelSpec
from ..plan import MemoryPlan, plan_for_scope, widest
from ..prompt import encode as _encode
from ..prompt import user_turn
from ..report.results import append_record, read_records
from ..runtime import Prepared, build_engine, pick_device, pick_dtype, prepare
from ..trial import Harness, Trial

log = logging.getLogger(__name__)

TASK_KEYS = {"id", "context", "context_file", "question", "max_new_tokens", "overrides", "meta"}
_LINE_ID = re.compile(r"^line:\d+$")


class Preempted(Exception):
    """Raised by the SIGTERM handler: the job must stop now (Slurm pre-emption, scancel)."""


@dataclass
class Task:
    """One runnable task, validated and tokenized on rank 0.

    Attributes:
        id: as given in the task file (str or int).
        line: 1-based line number in the task file.
        input_ids: the whole prompt: chat template around context and question, generation prompt.
        max_new_tokens: the task's own, or the job's default.
        scope: the job's scope section with the task's overrides applied, validated.
        meta: the task's ``meta`` value, copied to its record.
    """

    id: str | int
    line: int
    input_ids: list[int]
    max_new_tokens: int
    scope: ScopeConfig
    meta: object = None

    @property
    def tokens(self) -> int:
        """Cache rows the task needs: prompt plus generated tokens."""
        return len(self.input_ids) + self.max_new_tokens


@dataclass
class Target:
    """What the memory plan needs to know before the weights load."""

    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype

    def plan(self, scope: ScopeConfig, tokens: int, world: int, page: int) -> MemoryPlan:
        """One rank's memory for a cache of ``tokens`` rows run with ``scope``."""
        return plan_for_scope(self.spec, scope, tokens, self.dtype, self.device, world, page)


@dataclass
class BatchPlan:
    """What rank 0 decided, shared with every rank.

    Attributes:
        todo: tasks to run, in file order.
        capacity: cache rows for the longest task (0 when there is nothing to run).
        plan_scope: a scope as wide as every one of ``todo`` (:func:`~dist_reattn.plan.widest`): the
            engine is built for it (every task's scope within its limits) and memory planned with it.
        skipped: tasks already in the output (answered or errored by an earlier run).
        errors: error records of this run (tasks' own faults), written once the job is accepted.
        total: task lines in the file (blank lines excluded).
        error_records: those records, not yet written.
    """

    todo: list[Task]
    capacity: int
    plan_scope: ScopeConfig | None
    skipped: int
    errors: int
    total: int
    error_records: list[dict] = dataclasses.field(default_factory=list)


def key(task_id: object) -> str:
    """Ids are compared as strings, so 7 and "7" are one id (JSON readers disagree on them)."""
    return str(task_id)


def done_ids(out: str | Path) -> set[str]:
    """Ids that already have a record (answer or error) in the output file."""
    return {key(r["id"]) for r in read_records(out) if "id" in r}


def prompt_parts(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the context: (template head, blank line + question + generation prompt).

    The user message is ``context + "\\n\\n" + question``; the context is tokenized on its own, so a
    long document is tokenized once and never re-tokenized inside the template.
    """
    head, tail = user_turn(tokenizer)
    return _encode(tokenizer, head), _encode(tokenizer, f"\n\n{question}{tail}")


def task_scope(base: Config, overrides: object) -> ScopeConfig:
    """The job's scope section with a task's ``overrides`` applied; raises ConfigError if invalid.

    Args:
        overrides: ``{"scope.topk": 8, ...}`` (dotted) or ``{"scope": {"topk": 8}}`` (nested).
    """
    if overrides is None:
        return base.scope
    if not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be an object like {{'scope.topk': 8}}, got {overrides!r}")
    nested: dict[str, dict] = {}
    for name, value in overrides.items():
        if isinstance(value, dict) and "." not in name:
            items = [(f"{name}.{k}", v) for k, v in value.items()]
        else:
            items = [(name, value)]
        for dotted, v in items:
            section, _, field = dotted.partition(".")
            if section != "scope":
                raise ConfigError(
                    f"override {dotted!r}: only scope.* may vary per task (the model is loaded once); "
                    "set the rest on the command line"
                )
            # As text, so the config's own parser checks it: 8.5 or true for an int field is refused.
            nested.setdefault("scope", {})[field] = v if isinstance(v, str) else json.dumps(v)
    cfg = Config(scope=base.scope)
    apply_dict(cfg, nested, "overrides")
    cfg.scope.validate()
    return cfg.scope


def _read_context(task: dict, root: Path) -> str:
    has_text, has_file = "context" in task, "context_file" in task
    if has_text == has_file:
        raise ConfigError("give exactly one of context or context_file")
    if has_text:
        if not isinstance(task["context"], str):
            raise ConfigError("context must be a string")
        return task["context"]
    if not isinstance(task["context_file"], str):
        raise ConfigError("context_file must be a path string")
    path = Path(task["context_file"]).expanduser()
    path = path if path.is_absolute() else root / path
    # resolve() follows symlinks and "..": what is read is what is checked.
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError(
            f"context_file {task['context_file']!r} is outside the context root {str(root)!r}: "
            "put the file under it, or run with --context-root set to a folder that holds it"
        )
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"context_file {str(path)!r} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"context_file {str(path)!r} unreadable: {e}") from None


def parse_task(line: int, task: dict, root: Path, tokenizer, cfg: Config, max_new_tokens: int) -> Task:
    """Validates and tokenizes one task object (``root``: the context root); raises ConfigError naming the problem."""
    unknown = sorted(set(task) - TASK_KEYS)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; fields are {', '.join(sorted(TASK_KEYS))}")
    question = task.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ConfigError("question missing or empty")
    context = _read_context(task, root)
    new = task.get("max_new_tokens", max_new_tokens)
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise ConfigError(f"max_new_tokens={new!r} must be an integer >= 1")
    scope = task_scope(cfg, task.get("overrides"))
    head, tail = prompt_parts(tokenizer, question.strip())
    ids = head + _encode(tokenizer, context.strip()) + tail
    return Task(task["id"], line, ids, new, scope, task.get("meta"))


def _task_id(obj: object) -> str | int | None:
    if not isinstance(obj, dict):
        return None
    tid = obj.get("id")
    if isinstance(tid, bool) or not isinstance(tid, (str, int)) or (isinstance(tid, str) and not tid.strip()):
        return None
    return tid


def read_tasks(
    path: Path,
    out: Path,
    tokenizer,
    cfg: Config,
    target: Target,
    max_new_tokens: int,
    world: int,
    context_root: Path | None = None,
) -> BatchPlan:
    """Reads the task file, skips what ``out`` already holds, collects error records, plans the rest.

    A task whose own memory plan (its prompt + ``max_new_tokens`` alone, with its scope) does not fit
    refuses the whole job (ConfigError): that depends on the run, not on the task. The others share
    one cache sized for the longest of them. Nothing is written here.

    Args:
        path: the task file (JSONL).
        out: the output file; error records are appended to it here.
        tokenizer: the model's tokenizer (duck-typed, as in :mod:`dist_reattn.tasks.niah`).
        cfg: the job's config (its scope section is the default of every task).
        target: model shape, device and dtype, for the per-task memory check.
        max_new_tokens: default for tasks that do not set their own.
        world: ranks in the job (the cache is split over them).
        context_root: the folder every ``context_file`` must lie in (default: the task file's).
    """
    root = path.parent if context_root is None else Path(context_root)
    done = done_ids(out)
    records: list[dict] = []
    seen: dict[str, int] = {}
    todo: list[Task] = []
    skipped = errors = total = 0
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        total += 1
        try:
            obj, bad_json = json.loads(raw), None
        except ValueError as e:  # includes UnicodeDecodeError
            obj, bad_json = None, f"not valid JSON: {e}"
        tid = _task_id(obj)
        if tid is not None and _LINE_ID.match(key(tid)):
            tid = None  # "line:N" names anonymous lines; a task may not take such a name
        if tid is not None and key(tid) in seen:
            tid, reason = None, f"duplicate id {key(tid)!r} (first on line {seen[key(tid)]})"
        else:
            reason = None
        rid = tid if tid is not None else f"line:{number}"
        if key(rid) in done:
            skipped += 1
            continue
        if tid is not None:
            seen[key(tid)] = number
        try:
            if reason or bad_json:
                raise ConfigError(reason or bad_json)
            if not isinstance(obj, dict):
                raise ConfigError(f"not a JSON object: {raw[:40]!r}")
            if tid is None:
                raise ConfigError(
                    "id missing or not a non-empty string or integer (or of the reserved form line:N)"
                )
            task = parse_task(number, obj, root, tokenizer, cfg, max_new_tokens)
            task.scope.check_window(target.spec.window, task.tokens)  # a task's own error record
        except ConfigError as e:
            records.append({"id": rid, "line": number, "error": str(e)})
            errors += 1
            log.warning(f"{path}:{number}: task {rid!r}: {e}")
            continue
        plan = target.plan(task.scope, task.tokens, world, cfg.cache.page)
        if not plan.fits():
            raise ConfigError(
                f"{path}:{number}: task {rid!r} does not fit this run: {len(task.input_ids)} prompt + "
                f"{task.max_new_tokens} new tokens need {plan.describe()}; use more ranks or a smaller "
                "dtype (--model.dtype=bf16), free memory, or shorten that task; nothing was recorded"
            )
        todo.append(task)
    capacity = max((t.tokens for t in todo), default=0)
    # One engine serves every task: built for, and planned at the longest task's size with, a scope
    # as wide as the widest task's in every field (conservative where a short task is the widest).
    plan_scope = widest((t.scope for t in todo), target.device.type) if todo else None
    return BatchPlan(todo, capacity, plan_scope, skipped, errors, total, records)


def answer_record(task: Task, answer: str, trial: Trial) -> dict:
    """The output line of an answered task: its id, line and answer, then the trial's fields."""
    record = {"id": task.id, "line": task.line, "answer": answer, **trial.as_dict()}
    if task.meta is not None:
        record["meta"] = task.meta
    return record


@dataclass
class Outcome:
    """How a batch job ended, for the launch script's last line."""

    answered: int
    """Answer records written by this run."""
    errors: int
    """Error records written by this run."""
    skipped: int
    """Tasks already in the output when the run started."""
    total: int
    """Task lines in the file."""
    preempted: bool = False
    """SIGTERM stopped the run."""
    abandoned: str | int | None = None
    """The id of the task in progress when SIGTERM arrived (its work is lost; it runs on resume)."""


def plan_job(
    tasks: Path, out: Path, cfg: Config, max_new_tokens: int, comm: Comm, context_root: Path | None = None
) -> tuple[BatchPlan, Prepared | None]:
    """Rank 0 reads, validates and plans; every rank gets the plan and checks its own memory; once
    every rank accepts the job, rank 0 writes the tasks' error records.

    Returns:
        The plan, and the prepared model source and memory plan (None when nothing is left to run).

    Raises:
        ConfigError: the model is missing, or a task cannot fit on some rank: no weights have loaded
            and no record has been written.
    """
    plan = None
    if comm.rank == 0:
        try:
            source = resolve(cfg.model.path)
            device = pick_device(cfg.model.device)
            target = Target(load_spec(source), device, pick_dtype(cfg.model.dtype, device))
            tokenizer = load_tokenizer(source)
            plan = read_tasks(tasks, out, tokenizer, cfg, target, max_new_tokens, comm.world, context_root)
        except ConfigError as e:
            plan = str(e)  # every rank must leave with the same error, not wait for a plan
    plan = comm.broadcast_object(plan)
    if isinstance(plan, str):
        raise ConfigError(plan)
    prep = refusal = None
    if plan.todo:
        try:
            prep = prepare(dataclasses.replace(cfg, scope=plan.plan_scope), plan.capacity, comm)
        except ConfigError as e:
            refusal = str(e)
        # Memory differs per rank: one rank's refusal must stop every rank, not leave them waiting.
        refusals = [r for r in comm.all_gather_object(refusal, "plan_check") if r]
        if refusals:
            raise ConfigError(refusals[0])
    if comm.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)  # job scripts name a fresh folder per job
        for record in plan.error_records:
            append_record(out, record)
    return plan, prep


def run_tasks(
    plan: BatchPlan,
    prep: Prepared,
    out: Path,
    cfg: Config,
    comm: Comm,
    on_answer: Callable[[dict], None] | None = None,
) -> Outcome:
    """Loads the model once and answers ``plan.todo`` in order, appending a record per task on rank 0.

    With :func:`stop_on_sigterm` installed, SIGTERM raises :class:`Preempted` at the next Python
    bytecode, i.e. within one chunk's forward: the task in progress is abandoned and the outcome
    says so. SIGTERM is held back while a record is written and counted, so the count on the
    job's last line is exact (the record itself is one ``write``: whole in the file or absent).

    Args:
        on_answer: called on rank 0 with each answer record (the launch script's progress line).
    """
    from tqdm import tqdm

    outcome = Outcome(0, plan.errors, plan.skipped, plan.total)
    if not plan.todo:
        return outcome
    tokenizer = load_tokenizer(prep.source) if comm.rank == 0 else None
    bar = None
    try:
        engine = build_engine(dataclasses.replace(cfg, scope=plan.plan_scope), prep, plan.capacity, comm)
        harness = Harness(engine, cfg, prep)
        bar = tqdm(
            total=sum(len(t.input_ids) for t in plan.todo),
            unit="tok",
            unit_scale=True,
            disable=comm.rank != 0,
            smoothing=0.1,
        )
        for i, task in enumerate(plan.todo):
            outcome.abandoned = task.id
            bar.set_description(f"task {i + 1}/{len(plan.todo)}")
            gen, measured = harness.run(task.input_ids, task.max_new_tokens, task.scope, on_chunk=bar.update)
            record = None
            with _SIGTERM.held():
                if comm.rank == 0:
                    answer = tokenizer.decode(gen.tokens, skip_special_tokens=True)
                    record = answer_record(task, answer, measured)
                    append_record(out, record)
                outcome.answered += 1
                outcome.abandoned = None
            if record is not None and on_answer:
                on_answer(record)
    except Preempted:
        outcome.preempted = True
    finally:
        if bar is not None:
            bar.close()
    return outcome


class _Sigterm:
    """SIGTERM as an exception, except inside :meth:`held` blocks, where it waits for the block's end.

    A signal handler belongs to the process, so this is one module-level object, not a per-call one.
    """

    def __init__(self):
        self.holding = self.pending = False

    def handler(self, signum, frame) -> None:
        # Slurm signals every process of the job and torchrun forwards the signal as well: a second
        # SIGTERM must not interrupt the clean-up of the first.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.holding:
            self.pending = True
            return
        raise Preempted()

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise Preempted()


_SIGTERM = _Sigterm()


def stop_on_sigterm() -> None:
    """Makes SIGTERM raise :class:`Preempted` in the main thread (torchrun forwards it to every rank)."""
    _SIGTERM.holding = _SIGTERM.pending = False
    signal.signal(signal.SIGTERM, _SIGTERM.handler)


def write_niah_tasks(
    tokenizer,
    folder: Path,
    length: int,
    depths: Iterable[float],
    seed: int = 0,
    haystack: str = "noise",
) -> Path:
    """Writes NIAH haystacks as context files plus ``tasks.jsonl`` in ``folder``; returns its path.

    Each context is the instruction and haystack of :func:`dist_reattn.tasks.niah.build_sample` at
    ``length`` tokens (needle at the given depth), as text; the question is the NIAH question and
    ``meta.needle`` holds the answer for scoring.
    """
    from .niah import INSTRUCTION, QUESTION, build_sample

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, depth in enumerate(depths):
        sample = build_sample(tokenizer, length, depth, seed=seed + i, haystack=haystack)
        text = tokenizer.decode(sample.input_ids)
        start = text.index(INSTRUCTION)
        context = text[start : text.index("\n" + QUESTION, start)]
        name = f"context-{i}.txt"
        (folder / name).write_text(context, encoding="utf-8")
        lines.append(
            {
                "id": f"niah-{i}",
                "context_file": name,
                "question": QUESTION,
                "meta": {"needle": sample.needle, "depth": depth, "target_len": length},
            }
        )
    path = folder / "tasks.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def write_ruler_tasks(
    tokenizer, folder: Path, length: int, tasks: Iterable[str], n: int, seed: int = 0
) -> Path:
    """Writes ``n`` RULER samples per task as context files plus ``tasks.jsonl`` in ``folder``; returns its path.

    Each task's context is the sample's user message before its question, its question the last
    line, its ``max_new_tokens`` RULER's; ``meta`` holds task, answers, metric and target_len, so
    ``python -m dist_reattn.report.ruler_report ANSWERS`` scores the answers. The batch prompt has
    no answer prefix (the runner puts a blank line before the question and ends at the assistant's
    turn), so prompts differ from launch/ruler.py's by a few tokens and the model answers unprompted.
    """
    from .ruler import build_sample

    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for task in tasks:
        for i in range(n):
            sample = build_sample(tokenizer, task, length, seed=seed * 1_000_003 + i)
            name = f"context-{task}-{i}.txt"
            (folder / name).write_text(sample.context, encoding="utf-8")
            lines.append(
                {
                    "id": f"{task}-{i}",
                    "context_file": name,
                    "question": sample.question,
                    "max_new_tokens": sample.max_new_tokens,
                    "meta": {
                        "task": task,
                        "answers": sample.answers,
                        "metric": sample.metric,
                        "target_len": length,
                        "sample": i,
                    },
                }
            )
    path = folder / "tasks.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path
