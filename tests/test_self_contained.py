"""The repository stands on its own: no tracked file names a path of one machine
or a folder beside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = re.compile(
    "|".join(
        [
            r"(?<![\w.])/" + "work/",  # the development machine's workspace
            r"\.\./" + "shared",  # a folder beside the repository
            r"/home/\w+/",  # anyone's home directory
            r"/Users/\w+/",
        ]
    )
)
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules", "run", "build", "dist"}


def _tracked() -> list[Path]:
    """Files under version control; every file of the tree outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout
        return [REPO / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        return [
            p
            for p in REPO.rglob("*")
            if p.is_file() and not SKIP_DIRS & set(p.relative_to(REPO).parts)
        ]


def test_no_tracked_file_names_a_machine_path():
    files = _tracked()
    assert len(files) > 50
    hits = []
    for path in files:
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (FITS, Avro, parquet)
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)
