"""Write the layout-2.0.0 fixtures of tests/apdb/test_migrate.py (not run by the tests).

Usage, from the repository root::

    git show 91f7b4d:apdb/sql.py > sql_91f7b4d.py
    python tests/apdb/data/make_layout_2_0_0.py sql_91f7b4d.py

``apdb/sql.py`` of commit 91f7b4d (layout ``version:ApdbSql`` 2.0.0: plain
``(diaObjectId, midpointMjdTai)`` and ``pixelId`` indexes, no covering ones)
writes, as :mod:`make_layout_1_0_0` does for 1.0.0, ``layout-2.0.0.sqlite3``
(made and filled by that code with the same detectors) and
``layout-2.0.0-postgresql.sql`` (its PostgreSQL DDL and metadata rows).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from make_layout_1_0_0 import load_old, write_fixtures

if __name__ == "__main__":
    write_fixtures(load_old(sys.argv[1]), "2.0.0")
