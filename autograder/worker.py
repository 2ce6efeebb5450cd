"""A grading worker: one long-lived trusted process that grades one job at a time.

    python -m autograder.worker            # reads job paths on stdin, one JSON object a line

The grader starts ``--workers`` of these. Each imports the libraries the judge's references need
(torch, transformers, peft, bitsandbytes) once, then for every job runs `autograder.execute.grade_job`
(a fresh sandboxed kernel per submission, the judge here) and writes the job's result file. On stdout
it prints only ``PEFTLAB-DONE <job path>`` lines; anything else a library prints is ignored by the
grader. If a job kills the worker, the grader counts that job as failed and starts a new worker.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
from pathlib import Path

DONE = "PEFTLAB-DONE"


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
        job = json.loads(Path(path).read_text())
        _reset(job.get("threads", 1))
        _reset_peak()
        result = grade_job(job)
        result["worker_peak_mb"] = _peak_mb()
        Path(job["result"]).write_text(json.dumps(result))
        protocol.write(f"{DONE} {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
