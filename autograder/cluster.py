"""Part of stage 3, execute: grading beyond one machine, the execution step on a Dask cluster
(`dask.distributed`).

    python -m autograder.grade SUBMISSIONS --scheduler tcp://scheduler:8786   # a running cluster
    python -m autograder.grade SUBMISSIONS --scheduler local:4                # a LocalCluster, 4 workers

Everything else stays on the instructor's machine: reading and preparing the submissions, nbgrader's
scoring, the gradebook, feedback and reports. Each task carries one prepared notebook (plain text) and
its `Job` (as JSON) to a Dask worker, which grades it exactly as the local path does: a long-lived grading
process (`autograder.worker`, one per Dask worker thread, reused from task to task), a fresh sandboxed
kernel per notebook, the judge outside it. The task returns the result
and the judged notebook as text, which the instructor's machine writes where the local path would.

A worker lost mid-run costs a retry, not a grade: the scheduler gives its tasks to other workers
(``distributed.scheduler.allowed-failures``, 3 by default, before a task is reported as failed, and
then it is a *failed* row with the reason, like any other). A worker needs this repository (the same
commit) and its environment, installed as for local grading (`scripts/setup.sh`), and the converted
SmolLM2 cache (made on first use). dask-jobqueue (SLURM, PBS) or dask-kubernetes start such workers.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
from pathlib import Path

from autograder.records import Job
from autograder.worker import WorkerProcess, convert_models_once


_IDLE: "queue.SimpleQueue" = queue.SimpleQueue()  # this Dask worker's grading processes, between tasks


def grade_remote(job: str, notebook: str, gradebook: str | None = None) -> dict:
    """On a worker: grade one prepared notebook (``job``: a `Job` as JSON); ``{"result": its `Result` as
    JSON, "executed": the judged notebook's text}``, and when the job is scored here (into the server at
    ``gradebook``), ``"autograded"`` and ``"feedback"``: nbgrader's files.

    The grading runs in a long-lived `autograder.worker` process of this Dask worker (started on its
    first task, reused by the next: the judge's libraries are imported once), with a fresh sandboxed
    kernel per notebook, exactly as the local path grades. A task that kills or hangs that process
    fails alone (a failed row with the reason); the next task starts another."""
    with tempfile.TemporaryDirectory(prefix="peftlab-task-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o700)
        local = Job.from_json(job).moved_to(folder)
        Path(local.folder).mkdir(mode=0o700)
        Path(local.notebook).write_text(notebook)
        try:
            worker = _IDLE.get_nowait()
        except queue.Empty:
            worker = None
        if worker is None or not worker.alive() or worker.gradebook != gradebook:
            worker = WorkerProcess(gradebook)
        error = worker.grade(local)
        if error is None:
            _IDLE.put(worker)
        result, output = Path(local.result), Path(local.output)
        if error or not (result.exists() and output.exists()):
            raise RuntimeError(error or "the grading process left no result")
        value = {"result": result.read_text(), "executed": output.read_text()}
        for key, path in zip(("autograded", "feedback"), local.scored_files(), strict=True):
            if path.exists():
                value[key] = path.read_text()
        return value


def _prepare_worker() -> str:
    """Run once on each worker: the model cache the kernels read, converted before any kernel starts."""
    convert_models_once()
    return "ready"


@contextlib.contextmanager
def kept_environ():
    """Put this process's environment back after Dask changed it: a LocalCluster's nanny writes its
    ``pre-spawn-environ`` (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ...) into the environment of the process
    that runs it, each time it starts a worker, so everything that process starts later would run on
    one thread."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Cluster:
    """The `autograder.dispatch.Workers` interface (``run(jobs, on_done)``) on a Dask cluster."""

    def __init__(self, address: str, job_timeout: float, gradebook: str | None = None):
        self.address, self.job_timeout, self.gradebook = address, job_timeout, gradebook

    def _client(self):
        from dask.distributed import Client, LocalCluster

        if self.address.startswith("local"):
            n = int(self.address.partition(":")[2] or 2)
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None)
            return Client(cluster), cluster
        return Client(self.address, timeout=60), None

    def run(self, jobs: list[Job], on_done) -> None:
        with kept_environ():  # a LocalCluster's nanny changes it when it starts or restarts a worker
            self._run(jobs, on_done)

    def _run(self, jobs: list[Job], on_done) -> None:
        from dask.distributed import as_completed

        client, cluster = self._client()
        try:
            client.run(_prepare_worker)
            futures = {}
            for job in jobs:
                notebook = Path(job.notebook).read_text()
                future = client.submit(grade_remote, job.to_json(), notebook, self.gradebook,
                                       key=f"grade-{Path(job.folder).name}-{id(job)}", pure=False)
                futures[future] = job
            for future in as_completed(futures):
                job = futures[future]
                error = None
                try:
                    value = future.result(timeout=self.job_timeout)
                    Path(job.result).write_text(value["result"])
                    Path(job.output).write_text(value["executed"])
                    for key, path in zip(("autograded", "feedback"), job.scored_files(), strict=True):
                        if key in value:
                            path.write_text(value[key])
                except Exception as exc:  # noqa: BLE001 - a task the cluster could not finish is a failed row
                    error = f"the cluster could not grade it: {type(exc).__name__}: {str(exc)[:300]}"
                on_done(job, error)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
