"""Prefect flows of diapipe.

These machines (and many observatory networks) have no internet: Prefect's
server analytics are switched off before Prefect is imported, unless the
environment says otherwise.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
