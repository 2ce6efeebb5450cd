"""Stage 3, execute: send every `Job` to a grading process (`autograder.worker`: a sandboxed kernel per
notebook, the judge outside it; with a gradebook server, nbgrader's scoring too), on this machine or on
a Dask cluster (`autograder.cluster`), and gather the judged notebooks, the scores and files of those
already scored, and what each run found into the submissions."""

from __future__ import annotations

import queue
import shutil
import sys
import threading
from pathlib import Path

import nbformat

from autograder.records import Job, Result, Submission
from autograder.worker import SLACK_SECONDS, WorkerProcess, convert_models_once


class Workers:
    """``n`` long-lived `autograder.worker` processes grading the jobs between them."""

    def __init__(self, n: int, gradebook: str | None = None):
        self.n, self.gradebook = max(1, n), gradebook

    def run(self, jobs: list[Job], on_done) -> None:
        todo: queue.Queue = queue.Queue()
        for job in jobs:
            todo.put(job)

        def loop():
            worker = None
            while True:
                try:
                    job = todo.get_nowait()
                except queue.Empty:
                    break
                if worker is None or not worker.alive():
                    worker = WorkerProcess(self.gradebook)
                error = worker.grade(job)
                if error:
                    worker = None
                on_done(job, error)
            if worker is not None:
                worker.close()

        threads = [threading.Thread(target=loop) for _ in range(min(self.n, len(jobs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def kernel_threads(workers: int) -> tuple[int, str | None]:
    """Each kernel's torch threads: the cores other work leaves free now, shared by the workers; and a
    note for the report when other work holds some. More threads than free cores makes torch's OpenMP
    wait a scheduler slice at every operation, which a busy grader pays in CPU time too (notebook 03:
    10 min instead of 51 s, see `peftlab.env`). An OMP_NUM_THREADS set for the grader caps them."""
    from peftlab.env import free_cores, thread_cap, usable_cores

    free, cores = free_cores(), usable_cores()
    threads = max(1, free // max(workers, 1))
    threads = min(threads, thread_cap() or threads)
    note = None
    if free < cores:
        note = f"{cores - free} of {cores} cores were busy with other work when grading started: kernels run {threads} thread(s) each"
    return threads, note


def _record(sub: Submission, job: Job, error: str | None) -> tuple[nbformat.NotebookNode | None, tuple | None]:
    """Put what grading ``job`` found into ``sub``: its judged notebook, or None when it failed; and
    when its grading process scored it, nbgrader's autograded notebook and feedback (texts)."""
    result = Result()
    if not error:
        try:
            result = Result.from_json(Path(job.result).read_text())
        except (OSError, ValueError, TypeError):
            error = "the grading process left no result"
    error = error or result.error
    sub.flags += list(result.flags)
    sub.notes += list(result.notes)
    sub.seconds = result.seconds
    peak = result.worker_peak_mb
    sub.worker_peak_mb = float(peak) if isinstance(peak, (int, float)) else None
    sub.timing = {k: round(v, 3) for k, v in result.timing.items() if isinstance(v, (int, float))}
    output = Path(job.output)
    if error or not output.exists():
        sub.status, sub.reason = "failed", error or "no output"
        return None, None
    nb, scored = nbformat.read(output, as_version=4), None
    if job.score_here and result.score_error:
        sub.notes.append(f"scored by the run, not where it was graded: {result.score_error[:300]}")
    elif job.score_here and isinstance(result.score, (int, float)) and isinstance(result.max_score, (int, float)):
        try:
            scored = tuple(path.read_text() for path in job.scored_files())
            sub.score, sub.max_score = float(result.score), float(result.max_score)
        except OSError:
            pass
    return nb, scored


def execute(pairs: list[tuple[Job, Submission]], *, workers: int, scheduler: str | None, progress: bool,
            gradebook: str | None = None, gather=None) -> dict:
    """Grade every job, ``workers`` at a time here or on the Dask cluster at ``scheduler``; with
    ``gradebook`` (a server's URL, for jobs that `Job.score_here`), the grading processes score them into
    it too, and each one scored is handed to ``gather(submission, judged notebook, (autograded notebook,
    feedback))`` as it comes back (`autograder.score.Gather`), not kept. Returns the judged notebook of
    each other submission that ran (those that did not are marked failed, with the reason)."""
    convert_models_once()  # before any kernel starts: kernels see the model cache read-only
    by_folder = {job.folder: sub for job, sub in pairs}
    executed, lock = {}, threading.Lock()
    bar = _progress(len(pairs)) if progress else None

    def done(job: Job, error: str | None) -> None:
        sub = by_folder[job.folder]
        with lock:
            nb, files = _record(sub, job, error)
            if files is not None and gather is not None:
                gather(sub, nb, files)
            elif nb is not None:
                executed[sub] = nb
            shutil.rmtree(job.folder, ignore_errors=True)  # whatever the kernel left goes at once
            if bar is not None:
                bar.update(1)

    jobs = [job for job, _ in pairs]
    if scheduler:
        from autograder.cluster import Cluster

        Cluster(scheduler, max((job.notebook_timeout for job in jobs), default=0) + SLACK_SECONDS,
                gradebook).run(jobs, done)
    else:
        Workers(workers, gradebook).run(jobs, done)
    if bar is not None:
        bar.close()
    return executed


def _progress(total: int):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="grading", unit="notebook", file=sys.stderr)
    except ImportError:
        return None
