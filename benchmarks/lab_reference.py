"""The lab's own recipe on a CPU with notebook 07's default settings, stored for the notebook to set
beside the learner's run (`peftlab.lab.reference_run`): a CPU run takes a minute or more, too long to
run twice in the notebook. On a GPU the notebook runs the reference itself.

    .venv/bin/python benchmarks/lab_reference.py      # about 1.5 minutes on the 2-core reference machine

Writes ``src/peftlab/data/lab_reference.json``: `peftlab.lab.run`'s results (settings, machine, losses,
accuracy, memory, speed), without the paths of the files it wrote.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src" / "peftlab" / "data" / "lab_reference.json"


def main() -> int:
    from peftlab import lab

    with tempfile.TemporaryDirectory() as folder:
        config = lab.LabConfig(output_dir=str(Path(folder) / "lab_output"))  # the notebook's parameters cell
        results = lab.run(config, progress=False, quiet=True)
    results.pop("adapter", None)
    results.pop("samples", None)
    results["config"]["output_dir"] = "lab_output"
    OUT.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(lab.summary(results))
    print(f"written: {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
