"""The README is a front page whose program runs and whose first commands are the two scripts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_front_page_is_short_and_starts_with_the_two_scripts() -> None:
    assert len(README.read_bytes()) <= 12 * 1024
    first = re.search(r"```\w*\n(.*?)```", README.read_text(), flags=re.S)
    assert first is not None
    commands = [line.split()[0] for line in first.group(1).splitlines() if line[:1].isalpha()]
    assert commands == ["scripts/example", "scripts/test"]


def test_the_quickstart_program_answers_as_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (program,) = blocks("python")
    monkeypatch.delenv("SILO_DATABASE_URI", raising=False)
    module = tmp_path / "quickstart.py"
    module.write_text(program)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict[str, Any] = {"__name__": "quickstart", "__file__": str(module)}
    exec(compile(program, str(module), "exec"), namespace)  # noqa: S102 - our own README
    app = namespace["app"]
    client = app.test_client()
    (session,) = blocks("console")
    for command, answer in re.findall(r"\$ curl (.*)\n(.*)", session):
        sid = re.search(r"X-Session-ID: ([\w-]+)", command)
        assert sid is not None
        response = client.post("/api/count", headers={"X-Session-ID": sid.group(1)})
        assert response.get_data(as_text=True).strip() == answer


def test_every_relative_link_names_a_file() -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README.read_text())
    assert "docs/quickstart.md" in targets
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert missing == []
