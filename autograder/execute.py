"""Run one prepared notebook in a sandboxed kernel, cell by cell, within time and memory limits.

    python -m autograder.execute JOB.json

The grader starts one such process per submission (in parallel), so a crash here costs one
submission, never the run. JOB.json names the notebook to run, where to write the executed copy
and a result file, the limits and the sandbox's folders. The executed notebook is what nbgrader
then scores (without running it again):

- a cell that runs past ``cell_timeout`` is interrupted and gets a TimeoutError output;
- if the kernel dies (``os._exit``, a crash) or stops answering, or the notebook runs past
  ``notebook_timeout``, every cell not run gets an error output, so no test passes unrun;
- a cell whose execution failed but whose error display was suppressed gets an error output;
- outputs are capped at ``max_output_bytes`` per cell.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import nbformat

from autograder import guard

ROOT = Path(__file__).resolve().parent.parent


def _error_output(ename: str, evalue: str):
    return nbformat.v4.new_output("error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def _is_test(cell) -> bool:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def _cap_outputs(cell, limit: int) -> bool:
    size, kept, capped = 0, [], False
    for output in cell.get("outputs", []):
        n = len(json.dumps(output))
        if size + n > limit:
            capped = True
            kept.append(nbformat.v4.new_output("stream", name="stdout",
                                               text=f"[output cut by the grader: over {limit // 1024} KB]\n"))
            break
        size += n
        kept.append(output)
    cell.outputs = kept
    return capped


def kernel_spec(job: dict, folder: Path) -> str:
    """Write a kernelspec that starts ipykernel inside the sandbox (or with the memory limit only)."""
    python = sys.executable
    launcher = [python, str(ROOT / "autograder" / "sandbox.py")]
    if job.get("sandbox"):
        for path in job["hide"]:
            launcher += ["--hide", path]
        for path in job["expose"]:
            launcher += ["--expose", path]
    else:
        launcher += ["--no-namespaces"]
    if job.get("memory_mb"):
        launcher += ["--memory-mb", str(job["memory_mb"])]
    argv = launcher + ["--", python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    spec = folder / "kernels" / "peftlab-grader"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "grader", "language": "python"}))
    return str(folder / "kernels")


async def run(job: dict) -> dict:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    folder = Path(job["folder"])
    work = folder / "work"
    for sub in ("work", "home", "runtime"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(job["notebook"], as_version=4)
    result = {"flags": [], "notes": [], "seconds": 0.0, "completed": False}
    kernel_env = {
        "HOME": str(folder / "home"), "IPYTHONDIR": str(folder / "home" / ".ipython"),
        "MPLCONFIGDIR": str(folder / "home" / ".mpl"), "JUPYTER_RUNTIME_DIR": str(folder / "runtime"),
        "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": str(job.get("threads", 1)), "PEFTLAB_GRADING": "1",
    }
    for key in ("PEFTLAB_CACHE", "VIRTUAL_ENV"):
        if os.environ.get(key):
            kernel_env[key] = os.environ[key]
    km = AsyncKernelManager(kernel_name="peftlab-grader", transport="ipc", ip=str(folder / "runtime" / "k"),
                            connection_file=str(folder / "runtime" / "connection.json"),
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_spec(job, folder)]))
    client = NotebookClient(nb, km=km, timeout=job["cell_timeout"], allow_errors=True,
                            interrupt_on_timeout=False, startup_timeout=120, record_timing=False,
                            resources={"metadata": {"path": str(work)}})
    start = time.monotonic()
    deadline = start + job["notebook_timeout"]
    stopped = None  # why execution ended early
    replies, done = {}, set()

    def on_executed(cell, cell_index, execute_reply):
        replies[cell_index] = execute_reply.get("content", {}).get("status")

    client.on_cell_executed = on_executed
    try:
        await client.async_start_new_kernel(env=kernel_env, cwd=str(work))
        await client.async_start_new_kernel_client()
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            done.add(index)
            if stopped:
                cell.outputs = [_error_output("NotExecuted", f"not run: {stopped}")] if _is_test(cell) else []
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped = f"the notebook ran past its {job['notebook_timeout']} s limit"
                result["flags"].append(stopped)
                cell.outputs = [_error_output("NotExecuted", f"not run: {stopped}")] if _is_test(cell) else []
                continue
            try:
                await asyncio.wait_for(client.async_execute_cell(cell, index), timeout=min(remaining, job["cell_timeout"] + 30))
            except CellTimeoutError:
                cell.outputs.append(_error_output("TimeoutError", f"the cell ran longer than {job['cell_timeout']} s and was stopped"))
                result["flags"].append(f"a cell ran past the {job['cell_timeout']} s limit ({cell.get('id')})")
                await km.interrupt_kernel()
                try:  # does the kernel answer again?
                    probe = nbformat.v4.new_code_cell("pass")
                    await asyncio.wait_for(client.async_execute_cell(probe, index), timeout=20)
                except Exception:  # noqa: BLE001 - any failure means the kernel is unusable
                    stopped = "the kernel stopped answering after a timeout"
                    result["flags"].append(stopped)
            except (DeadKernelError, asyncio.TimeoutError, RuntimeError) as exc:
                dead = isinstance(exc, DeadKernelError) or not await km.is_alive()
                stopped = (f"the kernel died in cell {cell.get('id')}" if dead
                           else f"cell {cell.get('id')} could not be run ({type(exc).__name__})")
                result["flags"].append(stopped)
                if _is_test(cell):
                    cell.outputs.append(_error_output("NotExecuted", stopped))
                continue
            if replies.get(index) == "error" and not any(o.output_type == "error" for o in cell.outputs):
                cell.outputs.append(_error_output("HiddenError", "the cell failed, but its error display was suppressed"))
                result["flags"].append(f"the error display was suppressed in cell {cell.get('id')}")
            if _cap_outputs(cell, job.get("max_output_bytes", 1 << 20)):
                result["notes"].append(f"output of cell {cell.get('id')} cut to {job.get('max_output_bytes', 1 << 20) // 1024} KB")
            for output in cell.outputs:
                text = output.get("text", "") if output.output_type == "stream" else ""
                if "peftlab-guard" in cell.get("metadata", {}).get("tags", []):
                    for report in guard.parse(text):
                        result["flags"].append(f"test machinery changed before {report['before']}, restored: "
                                               + ", ".join(report["restored"][:6]))
                if output.output_type == "error" and output.get("ename") == "MemoryError":
                    result["flags"].append(f"memory limit reached in cell {cell.get('id')}")
        result["completed"] = stopped is None
    finally:
        result["seconds"] = time.monotonic() - start
        try:
            if km.has_kernel:
                await km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - the kernel may be gone already
            pass
        for index, cell in enumerate(nb.cells):
            if "peftlab-guard" in cell.get("metadata", {}).get("tags", []):
                cell.outputs = []  # guard cells print only for the grader
            if _is_test(cell) and index not in done:  # never let a test that did not run count as passed
                cell.outputs = [_error_output("NotExecuted", "not run: the grader could not start or finish the kernel")]
        nbformat.write(nb, job["output"])
    return result


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    try:
        result = asyncio.run(run(job))
    except Exception as exc:  # noqa: BLE001 - report any failure as this submission's
        result = {"flags": [], "notes": [], "error": f"{type(exc).__name__}: {exc}", "completed": False}
    dedup = lambda items: list(dict.fromkeys(items))  # noqa: E731
    result["flags"], result["notes"] = dedup(result["flags"]), dedup(result["notes"])
    Path(job["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
