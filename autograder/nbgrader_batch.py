"""Run several nbgrader commands in one process: a grading run's autograde, feedback and export steps.

    python -m autograder.nbgrader_batch PLAN.json RESULT.json

``PLAN.json`` is a list of argument lists, each what would follow ``nbgrader`` on the command line
(``["autograde", "01_memory_math", "--force", ...]``). Each runs as nbgrader's own command-line app
would, in order, in this one process, with a fresh app each time (nbgrader's apps are traitlets
singletons: they are cleared between commands). ``RESULT.json`` gets, per command, its exit code and
what it logged. Starting nbgrader costs about 3 s a process on the reference machine, and a run of
eight assignments has 17 commands (autograde and feedback for each, and the export).

The grader runs this in a subprocess of its own, in the repository root, so that nbgrader reads the
course's configuration (`nbgrader_config.py`) as its commands do.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path


def run_one(argv: list[str]) -> dict:
    from nbgrader.apps.nbgraderapp import NbGraderApp
    from jupyter_core.application import NoStart

    stream = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(stream), contextlib.redirect_stdout(stream):
        app = NbGraderApp()
        try:
            app.initialize(list(argv))
            app.start()
        except NoStart:  # as traitlets' launch_instance: the command ran in initialize, nothing to start
            pass
        except SystemExit as exc:  # nbgrader's apps exit on failure
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:  # noqa: BLE001 - one failing command is reported, the next ones still run
            print(f"{type(exc).__name__}: {exc}", file=stream)
            code = 1
        finally:
            subapp = getattr(app, "subapp", None)
            for handler in list(logging.getLogger().handlers) + list(getattr(app.log, "handlers", [])):
                with contextlib.suppress(Exception):
                    handler.flush()
            if subapp is not None:
                type(subapp).clear_instance()
            NbGraderApp.clear_instance()
    return {"args": list(argv), "returncode": code, "log": stream.getvalue()[-20000:]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    plan = json.loads(Path(argv[0]).read_text())
    results = [run_one(command) for command in plan]
    Path(argv[1]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
