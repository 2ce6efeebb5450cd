"""nbgrader configuration for PEFT Lab.

The course root is the repository: instructors edit `solutions/` (nbgrader's source folder) and
`autograder/release.py` generates `course/` (the release folder) from it. Student submissions,
autograded copies, feedback and the gradebook live under `autograder/` and are never committed.

nbgrader reads this file through the `nbgrader_config.py` at the repository root, so every nbgrader
command and the formgrader must be run from there. `PEFTLAB_COURSE_ROOT` moves the whole course
elsewhere (the tests grade in a temporary copy this way).
"""

import os
from pathlib import Path

c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)

root = Path(os.environ.get("PEFTLAB_COURSE_ROOT") or Path(__file__).resolve().parent.parent)

c.CourseDirectory.course_id = "peft-lab"
c.CourseDirectory.root = str(root)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "course"
c.CourseDirectory.submitted_directory = "autograder/submitted"
c.CourseDirectory.autograded_directory = "autograder/autograded"
c.CourseDirectory.feedback_directory = "autograder/feedback"
# A SQLite file by default (an absolute URL: nbgrader resolves a relative path against the current
# directory), or the database server that $PEFTLAB_GRADEBOOK_URL names (`autograder/gradebook.py`).
c.CourseDirectory.db_url = os.environ.get("PEFTLAB_GRADEBOOK_URL") or f"sqlite:///{root / 'autograder' / 'gradebook.db'}"
# Only notebooks and the files they need are released; never caches or checkpoints.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*", "lab_output"]

# The stub students see in place of each solution; every graded test then fails until they work.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"

# Per-cell limit while autograding (nbgrader's own setting; ExecutePreprocessor.timeout is ignored).
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# Feedback returned to students must not reveal hidden tests: neither their source (ClearHiddenTests)
# nor the failing lines a traceback quotes (SanitizeTracebacks, which must run first).
import sys  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor  # noqa: E402
from nbgrader.preprocessors import ClearHiddenTests, GetGrades  # noqa: E402

from autograder.feedback import SanitizeTracebacks  # noqa: E402

c.GenerateFeedback.preprocessors = [GetGrades, SanitizeTracebacks, ClearHiddenTests, CSSHTMLHeaderPreprocessor]

c.Exchange.root = str(root / "autograder" / "exchange")
