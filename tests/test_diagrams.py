"""The explanatory diagrams: drawn by peftlab.diagrams, attached to the notebooks that show them, the
same bytes on every run, each with a text alternative, and in the student release."""

from __future__ import annotations

import base64
import re

import nbformat
import pytest

from notebooks import COURSE, SOLUTIONS
from peftlab import diagrams

IMAGE = re.compile(r"!\[([^\]]*)\]\(attachment:([\w.-]+)\)")


def _shown() -> dict[str, list[tuple[str, str]]]:
    """{diagram: [(notebook, text alternative)]} over the release."""
    shown: dict[str, list[tuple[str, str]]] = {}
    for path in sorted(COURSE.glob("*/*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            for alt, name in IMAGE.findall(cell.source if cell.cell_type == "markdown" else ""):
                shown.setdefault(name, []).append((path.parent.name, alt))
                assert name in cell.get("attachments", {}), f"{path.parent.name}: {name} is not attached"
    return shown


def test_every_diagram_is_shown_with_a_text_alternative():
    shown = _shown()
    assert set(shown) == set(diagrams.DIAGRAMS)
    for name, places in shown.items():
        for notebook, alt in places:
            assert len(alt) > 200 and "\n" not in alt, f"{notebook}: {name} needs a full one-line text alternative"


def test_the_attached_diagrams_are_the_drawn_ones():
    from autograder.release import attach_diagrams

    assert attach_diagrams(write=False) == [], "run `python autograder/release.py` after changing peftlab.diagrams"


@pytest.mark.parametrize("name", sorted(diagrams.DIAGRAMS))
def test_a_diagram_is_the_same_png_every_time(name):
    first = diagrams.png(name)
    assert first == diagrams.png(name)
    assert first.startswith(b"\x89PNG") and len(first) < 150_000
    attached = diagrams.attachment(name)["image/png"]
    assert base64.b64decode(attached) == first


def test_the_solutions_show_what_the_release_shows():
    for path in sorted(SOLUTIONS.glob("*/*.ipynb")):
        release = nbformat.read(COURSE / path.parent.name / path.name, as_version=4)
        ours = [c.get("attachments") for c in nbformat.read(path, as_version=4).cells if c.get("attachments")]
        theirs = [c.get("attachments") for c in release.cells if c.get("attachments")]
        assert ours == theirs, path.parent.name


def test_the_feedback_page_shows_the_diagrams():
    """nbgrader's feedback is nbconvert's HTML, whose markdown filter embeds cell attachments."""
    from nbconvert import HTMLExporter

    nb = nbformat.read(COURSE / "03_prefix_tuning" / "03_prefix_tuning.ipynb", as_version=4)
    html, _ = HTMLExporter().from_notebook_node(nb)
    assert html.count('src="data:image/png;base64,') == 2
