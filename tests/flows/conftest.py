"""Flow tests use the shared fixtures of tests/conftest.py (survey_root, prefect_harness)."""
