"""Sphinx configuration of the flask-silo-sql documentation (Pallets style, MyST Markdown)."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

from pallets_sphinx_themes import ProjectLink

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import flask_silo_sql  # noqa: E402
import flask_silo_sql.sql.models  # noqa: E402

project = "flask-silo-sql"
copyright = "2026 the flask-silo-sql authors"
author = "the flask-silo-sql authors"
release = version = flask_silo_sql.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "myst_parser",
    "sphinx_click",
    "pallets_sphinx_themes",
    "silo_reference",
    "silo_examples",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = True
# Names of other projects (no intersphinx: the build must work offline) and typing internals.
nitpick_ignore_regex = [
    (r"py:.*", r"(flask|werkzeug|sqlalchemy|click|alembic|fsspec|_io|io|os|pathlib)\b.*"),
    (r"py:.*", r"(typing|collections\.abc|datetime|concurrent\.futures|threading|logging)\..*"),
    (r"py:.*", r"(dt|sa|t)\..*"),
    (r"py:class", r"(Flask|Response|Engine|Connection|URL|Request|FileStorage|Path|Any)"),
    (r"py:class", r"(Callable|Iterator|Iterable|Mapping|MutableMapping|Sequence|IO|BinaryIO)"),
    (r"py:class", r"(TypeVar|ParamSpec|F|P|R|T|View|Unit|Backend|Policy)"),
    (r"py:class", r"(SQLAlchemy|StreamHandler|timedelta|datetime|Thread|Event|Lock|RLock)"),
    (r"py:class", r"(Session|SASession|AbstractContextManager|HostTransaction|scoped_session)"),
    (r"py:class", r"SiloConfig"),
    (r"py:class", r"flask_silo_sql\..*\._.*"),
    (r"py:.*", r"(abc|contextlib|time)\..*"),
    # Internal types that appear in public signatures; their modules are not public API.
    (r"py:class", r"flask_silo_sql\.(tasks|files|sql|store|backends|ext|sealing)\..*"),
    (
        r"py:(class|func)",
        r"(FsckReport|SQLBackend|SchemaError|new_sid|fsck|RunRow|StoredTask|RunnerStore)",
    ),
]

myst_enable_extensions = ["attrs_block", "attrs_inline", "colon_fence", "deflist", "substitution"]
NUMBERS = ("No", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine", "Ten")
TABLES = len(flask_silo_sql.sql.models.metadata.tables)
myst_substitutions = {
    "silo_head": f"`{flask_silo_sql.schema.head()}`",
    "silo_tables": NUMBERS[TABLES] if len(NUMBERS) > TABLES else str(TABLES),
}
myst_heading_anchors = 3

autodoc_member_order = "bysource"
toc_object_entries_show_parents = "hide"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

doctest_global_setup = f"""
import atexit, os, runpy, shutil, tempfile
from pathlib import Path
from sqlalchemy import create_engine
from flask_silo_sql import schema

REPO = Path({str(HERE.parent)!r})
os.environ.pop("SILO_DATABASE_URI", None)


def temporary_database(migrated):
    \"\"\"The URL of a new SQLite database, with silo's tables when *migrated*.\"\"\"
    directory = tempfile.mkdtemp(prefix="silo-docs-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    url = "sqlite:///" + os.path.join(directory, "silo.db")
    if migrated:
        engine = create_engine(url)
        schema.upgrade(engine)
        engine.dispose()
    return url


def load_example(name):
    \"\"\"The ``app`` of ``examples/<name>``, on a temporary migrated database.\"\"\"
    os.environ["SILO_DATABASE_URI"] = temporary_database(migrated=True)
    try:
        return runpy.run_path(str(REPO / "examples" / name))["app"]
    finally:
        del os.environ["SILO_DATABASE_URI"]
"""
doctest_default_flags = doctest.ELLIPSIS | doctest.DONT_ACCEPT_TRUE_FOR_1

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {
    "project_links": [
        ProjectLink("Source Code", "https://github.com/flask-silo-sql/flask-silo-sql"),
        ProjectLink(
            "Changelog",
            "https://github.com/flask-silo-sql/flask-silo-sql/blob/main/CHANGELOG.md",
        ),
        ProjectLink("Issue Tracker", "https://github.com/flask-silo-sql/flask-silo-sql/issues"),
    ]
}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_title = f"flask-silo-sql Documentation ({version})"
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["silo.css"]
