"""The documentation runs: generated config page current, checked blocks run, commands exist.

See docs/README.md ("Which commands are checked") for the rules this enforces.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydantic import BaseModel

from docs.config import render
from flows.config import PipelineConfig

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
CHECKED = "<!-- checked -->"


def _blocks(path: Path) -> list[tuple[int, str, str, bool]]:
    """(line number, language, text, checked) of every fenced block of a page."""
    out = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m.group(1), m.group(2), i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        out.append((start + 1, lang, "\n".join(body), prev == CHECKED))
        i += 1
    return out


def _shell_blocks(checked: bool) -> list[tuple[str, str]]:
    return [
        (f"{p.relative_to(REPO)}:{line}", text)
        for p in PAGES
        for line, lang, text, is_checked in _blocks(p)
        if lang in ("bash", "sh", "") and is_checked == checked
    ]


# --------------------------------------------------------------------------
# the generated configuration page
# --------------------------------------------------------------------------


def test_configuration_page_is_current():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == render(), (
        "docs/configuration.md differs from the config models: regenerate it with "
        "`.venv/bin/python -m docs.config > docs/configuration.md`"
    )


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out.append(key)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out += _field_paths(field.annotation, key + ".")
    return out


def test_configuration_page_lists_every_field_with_its_description():
    page = render()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w.]+)` \|.*$", page, re.M)}
    paths = _field_paths(PipelineConfig)
    assert len(paths) > 60
    assert sorted(rows) == sorted(paths)
    # a field deep down, with its default and the Rubin name from its description
    row = rows["association.max_distance_arcsec"]
    assert "| `1.0` |" in row and "maxDistArcSeconds" in row
    assert "`1000`" in rows["association.max_new_dia_objects"]


# --------------------------------------------------------------------------
# checked blocks: run them
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A directory that looks like the repository root to the docs' commands."""
    root = tmp_path_factory.mktemp("docs") / "diapipe"
    root.mkdir()
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (root / "tests").mkdir()
    (root / "tests" / "data").symlink_to(REPO / "tests" / "data")
    return root


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
        "MPLBACKEND": "Agg",
    }


CHECKED_BLOCKS = _shell_blocks(checked=True)


def test_there_are_checked_blocks():
    where = {w.split(":")[0] for w, _ in CHECKED_BLOCKS}
    assert {"README.md", "docs/apdb.md", "docs/alert-format.md"} <= where


@pytest.mark.slow
@pytest.mark.parametrize(("where", "script"), CHECKED_BLOCKS, ids=[w for w, _ in CHECKED_BLOCKS])
def test_checked_block_runs(where, script, scratch):
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=scratch,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"{where}:\n{script}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    if "--png" in script:
        png = shlex.split(script.splitlines()[-1])[-1]
        assert (scratch / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------
# every other command: it exists and accepts the options the docs use
# --------------------------------------------------------------------------

OUR_PACKAGES = {"flows", "tasks", "apdb", "alerts", "sim", "bench", "docs"}
_TOOL = re.compile(r"^(?:\w+=\S*\s+)*\.venv/bin/python -m ([\w.]+)\b(.*)$")


def _commands() -> list[tuple[str, str, list[str]]]:
    """(where, module, argument tokens) of every ``.venv/bin/python -m`` command in the docs."""
    out = []
    for where, text in _shell_blocks(checked=False) + CHECKED_BLOCKS:
        for raw in text.splitlines():
            line = raw.split("  #")[0].strip().rstrip("&").strip()
            for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                m = _TOOL.match(part)
                if m:
                    out.append((where, m.group(1), shlex.split(m.group(2))))
    return out


def _help(module: str, words: tuple[str, ...]) -> tuple[int, str]:
    """``python -m module *words --help``, run in this process (imports are shared)."""
    buf = io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = [module, *words, "--help"]
    try:
        with warnings.catch_warnings():
            # runpy warns when the module was imported before (flows.visit is)
            warnings.simplefilter("ignore", RuntimeWarning)
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return code, buf.getvalue()


def test_documented_commands_exist_with_their_options(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    helps: dict[tuple[str, tuple[str, ...]], tuple[int, str]] = {}

    def help_of(module: str, words: tuple[str, ...]):
        if (module, words) not in helps:
            helps[module, words] = _help(module, words)
        return helps[module, words]

    commands = _commands()
    assert len(commands) > 20
    modules = {m for _, m, _ in commands}
    assert {"flows.visit", "apdb", "alerts", "sim", "docs.config"} <= modules
    problems = []
    for where, module, rest in commands:
        if module.split(".")[0] not in OUR_PACKAGES:
            continue  # e.g. `python -m pytest` in the README's test command
        rc, text = help_of(module, ())
        if rc != 0:
            problems.append(f"{where}: `python -m {module} --help` failed: {text[-300:]}")
            continue
        words: tuple[str, ...] = ()
        if (
            rest
            and re.fullmatch(r"[a-z][a-z-]*", rest[0])
            and re.search(r"\{[\w,-]*\b" + re.escape(rest[0]) + r"\b[\w,-]*\}", text)
        ):
            words = (rest[0],)  # a sub-command the usage line lists
            rc, text = help_of(module, words)
            if rc != 0:
                problems.append(f"{where}: `python -m {module} {rest[0]} --help` failed")
                continue
        for opt in (t.split("=")[0] for t in rest if t.startswith("--")):
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text):
                problems.append(f"{where}: `python -m {module} {' '.join(words)}` has no {opt}")
    assert not problems, "\n".join(problems)
