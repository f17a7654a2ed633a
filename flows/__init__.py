"""Prefect flows of diapipe.

These machines (and many observatory networks) have no internet: Prefect's
server analytics are switched off before Prefect is imported, unless the
environment says otherwise.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The embedded (ephemeral) API server can take 15-30 s to start on a busy 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
