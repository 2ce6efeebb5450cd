"""Part of stage 3, execute: a grading process, one long-lived trusted process that grades one job at a
time, and `WorkerProcess`, the handle the grader (or a Dask worker) holds on one.

    python -m autograder.worker            # reads job paths on stdin, one JSON object a line

The grader starts ``--workers`` of these. Each imports the libraries the judge's references need
(torch, transformers, peft, bitsandbytes) once, then for every `Job` runs `autograder.execute.grade_job`
(a fresh sandboxed kernel per submission, the judge here), then, when the gradebook is a server
(``Job.score_here``), scores the judged notebook into it (`autograder.score.score_here`), and writes
the job's `Result`. On stdout it prints only ``PEFTLAB-DONE <job path>`` lines; anything else a library
prints is ignored by the grader. If a job kills the worker, the grader counts that job as failed and starts a new worker.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from autograder.gradebook import ENV
from autograder.records import Job

ROOT = Path(__file__).resolve().parent.parent
DONE = "PEFTLAB-DONE"
SLACK_SECONDS = 240  # a job's time beyond its notebook's limit: the grading process's start, judge and shutdown


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _reset(threads: int) -> None:
    """Judge state that one submission's tests could have changed, put back before the next."""
    import torch

    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.set_num_threads(max(1, threads))
    gc.collect()


def _reset_peak() -> None:
    """Start this process's peak resident memory afresh (Linux: VmHWM), so each job reports its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float | None:
    """This process's peak resident memory since `_reset_peak`, in MB: what one job made it hold."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return None


def convert_models_once() -> None:
    """SmolLM2 converted into the cache before any kernel starts: kernels see the cache read-only, and
    some tests need its tokenizer. Done once (21 s on the reference machine), in a trusted process."""
    from peftlab.env import SMOLLM2_CACHE_NAME, cache_dir, smollm2_cached

    if not smollm2_cached():
        print("converting SmolLM2 into the model cache once (about 20 s on 2 cores) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", "from peftlab.models import smollm2_path; smollm2_path()"],
                       cwd=ROOT, capture_output=True, timeout=1800)
    folder = cache_dir() / SMOLLM2_CACHE_NAME
    if folder.is_dir() and folder.stat().st_mode & 0o005 != 0o005:  # converted by an older version: private
        try:
            folder.chmod(0o755)
        except OSError:
            pass


class WorkerProcess:
    """One long-lived `autograder.worker` process, fed one job at a time; a job that kills or hangs it
    costs only itself (the caller starts another)."""

    def __init__(self, gradebook: str | None = None):
        self.log = tempfile.TemporaryFile()  # the worker's own messages: the tail is reported if it dies
        # Its own random string hashes (a fixed PYTHONHASHSEED would let a kernel send dict keys that collide).
        env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
        self.gradebook = gradebook
        if gradebook:  # the server it scores into (`Job.score_here`); kernels never see it
            env[ENV] = gradebook
        self.proc = subprocess.Popen([sys.executable, "-m", "autograder.worker"], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                     start_new_session=True, env=env)
        self.lines: queue.Queue = queue.Queue()

        def read():
            for line in self.proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _tail(self, size: int = 400) -> str:
        self.log.seek(0, os.SEEK_END)
        self.log.seek(max(0, self.log.tell() - size))
        return self.log.read().decode(errors="replace").strip()

    def grade(self, job: Job) -> str | None:
        """Grade ``job`` (its ``job.json`` is written into its folder) within its notebook's limit and
        `SLACK_SECONDS`; the error, or None. After an error the process is stopped."""
        timeout = job.notebook_timeout + SLACK_SECONDS
        path = str(Path(job.folder) / "job.json")
        Path(path).write_text(job.to_json())
        error = None
        try:
            self.proc.stdin.write(json.dumps({"job": path}) + "\n")
            self.proc.stdin.flush()
            deadline = time.monotonic() + timeout
            while True:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    self.proc.wait()
                    error = f"the grading worker died (exit {self.proc.returncode}): {self._tail()}"
                    break
                if line.strip() == f"PEFTLAB-DONE {path}":
                    break
        except queue.Empty:
            error = "the grading process overran its time and was stopped"
        except (BrokenPipeError, OSError):
            error = "the grading worker died"
        if error:
            self.close()
        return error

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()
        self.log.close()



def _score(job: Job) -> dict:
    """Score the judged notebook into the gradebook server, as `autograder.score.score_here`; never raises."""
    url = os.environ.get(ENV)
    if not url:
        return {"score_error": f"this grading process was given no gradebook (${ENV})"}
    try:
        from autograder.score import score_here

        return score_here(job, url)
    except Exception as exc:  # noqa: BLE001 - the run scores it instead
        return {"score_error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def main() -> int:
    _die_with_parent()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401 - warm: the judge's reference computations need these
    import transformers  # noqa: F401
    import peft  # noqa: F401
    import peftlab.checks  # noqa: F401
    import peftlab.models  # noqa: F401
    import peftlab.reference  # noqa: F401

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    from autograder.execute import grade_job

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever else writes to stdout goes to stderr instead
    for line in sys.stdin:
        try:
            path = json.loads(line)["job"]
        except (ValueError, KeyError, TypeError):
            continue
        job = Job.from_json(Path(path).read_text())
        _reset(job.threads)
        _reset_peak()
        result = grade_job(job)
        if job.score_here and not result.error:
            result = replace(result, **_score(job))
        result = replace(result, worker_peak_mb=_peak_mb())
        Path(job.result).write_text(result.to_json())
        protocol.write(f"{DONE} {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
