"""Every example that is a program or a shell session runs, or says why it does not.

A code block in Python, a shell, or SQL must be one of:

- a doctest block (``{testcode}``, ``{doctest}``): ``sphinx-build -b doctest`` runs it;
- a ``{literalinclude}`` of a file under ``examples/`` (the test suite runs those apps);
- marked ``{.run-by-test}``: a test of ``tests/`` extracts it from the page and runs it;
- marked ``{.fragment}``: a piece of a program, or a session against a server or machine the
  build does not have (put the mark on a line of its own just above the fence).

Anything else is a build warning (an error under ``-W``), naming the page and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util import logging

logger = logging.getLogger(__name__)

CHECKED = {"python", "py", "python3", "pycon", "bash", "sh", "shell", "console", "sql"}
MARKS = {"fragment", "run-by-test"}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def check_blocks(app: Sphinx, doctree: nodes.document) -> None:
    for block in doctree.findall(nodes.literal_block):
        language = str(block.get("language", "")).lower()
        if language not in CHECKED:
            continue
        if block.get("testnodetype") or MARKS & set(block.get("classes", [])):
            continue
        source = block.get("source")
        if source and Path(source).resolve().is_relative_to(EXAMPLES):
            continue
        logger.warning(
            "%s code block is neither run by the build nor marked {.fragment} / {.run-by-test}",
            language,
            location=block,
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("doctree-read", check_blocks)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
