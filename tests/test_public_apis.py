"""Only public pandas API outside the tests, but one guarded column read: a private name fails here.

pandas' block manager, block constructors and the constructors that skip
validation (``_mgr``, ``BlockManager``, ``new_block``, ``_from_mgr``,
``_simple_new``, ...) change between releases without notice. Every module of
the repository except the tests is parsed; an import of ``pandas.core``,
``pandas._libs`` or ``pandas.api.internals``, an attribute of one of the
private names below, or the name as a string (``getattr(df, "_mgr")``) fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: private pandas modules
PRIVATE_MODULES = ("pandas.core", "pandas._libs", "pandas.api.internals")
#: private pandas attributes (block manager, blocks, unchecked constructors, column access)
PRIVATE_NAMES = frozenset(
    {
        "_mgr",
        "_from_mgr",
        "_simple_new",
        "_get_column_array",
        "_ixs",
        "_get_item_cache",
        "iget_values",
        "make_block_same_class",
        "mgr_locs",
        "BlockManager",
        "new_block",
        "create_dataframe_from_blocks",
        # the buffers of pandas' masked, numpy-backed and arrow-backed arrays, Series._values
        "_data",
        "_mask",
        "_ndarray",
        "_pa_array",
        "_values",
    }
)


#: generic names a class of this project may give its own attributes (``self._data``)
OWN_ATTRIBUTE_NAMES = frozenset({"_data", "_mask", "_values"})


def modules(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root`` outside ``tests/`` and hidden or build folders."""
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] == "tests" or any(p.startswith(".") or p.endswith(".egg-info") for p in parts):
            continue
        out.append(path)
    return out


def private_uses(path: Path) -> list[str]:
    """``file:line: what`` for each private pandas use in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            names = []
        for name in names:
            if any(name == m or name.startswith(m + ".") for m in PRIVATE_MODULES):
                what = f"imports {name}"
            elif name.split(".")[-1] in PRIVATE_NAMES and name.startswith("pandas"):
                what = f"imports {name}"
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if not (own and node.attr in OWN_ATTRIBUTE_NAMES):
                what = f".{node.attr}"
        elif isinstance(node, ast.Constant) and node.value in PRIVATE_NAMES:
            what = f"the string {node.value!r}"
        if what:
            found.append(
                f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:"
                f"{node.lineno}: {what}"
            )
    return found


def test_the_scan_covers_the_product():
    scanned = {p.relative_to(REPO).parts[0] for p in modules(REPO)}
    assert {"core", "apdb", "tasks", "alerts", "flows", "sim", "bench"} <= scanned


@pytest.mark.parametrize(
    "source",
    [
        "values = df._mgr.iget_values(0)",
        "from pandas.core.internals import BlockManager",
        "import pandas.core.arrays.masked",
        "from pandas._libs.internals import BlockPlacement",
        "arr = IntegerArray._simple_new(data, mask)",
        "get = getattr(frame, '_get_column_array', None)",
        "out = pd.DataFrame._from_mgr(mgr, axes=mgr.axes)",
        "from pandas.api.internals import create_dataframe_from_blocks",
        "data, null = arr._data, arr._mask",
    ],
)
def test_the_check_finds_private_uses(tmp_path, source):
    path = tmp_path / "mod.py"
    path.write_text(source + "\n")
    assert private_uses(path)


def test_the_check_passes_public_uses(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(
        "import pandas as pd\nfrom pandas.api.extensions import ExtensionArray\n"
        "class Own:\n    def __init__(self, data):\n        self._data = data\n"
        "df = pd.DataFrame({'a': [1]}, copy=False)\nv = df['a'].to_numpy(copy=False)\n"
        "m = pd.arrays.IntegerArray(v, v == 0)\n"
    )
    assert private_uses(path) == []


#: The one private use allowed (core/frames.py: column reads through the block
#: manager, guarded by a probe and by tests/core/test_frames.py).
ALLOWED = {"core/frames.py": {".iget_values", "._mgr"}}


def test_no_private_pandas_api_outside_tests():
    found = []
    for path in modules(REPO):
        allowed = ALLOWED.get(path.relative_to(REPO).as_posix(), set())
        found += [hit for hit in private_uses(path) if hit.split(": ", 1)[1] not in allowed]
    assert not found, "private pandas API:\n" + "\n".join(found)


def test_the_allowed_private_use_is_only_the_column_read():
    hits = private_uses(REPO / "core" / "frames.py")
    assert hits and {h.split(": ", 1)[1] for h in hits} <= ALLOWED["core/frames.py"]
