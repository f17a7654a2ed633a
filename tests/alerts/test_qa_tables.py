"""QA source tables read back as pandas' own parquet writer would give them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from alerts.store import qa_sources_url, write_qa_sources


def _frame(n: int, text) -> pd.DataFrame:
    rng = np.random.default_rng(n)
    return pd.DataFrame(
        {
            "diaSourceId": np.arange(n, dtype=np.int64),
            "ra": rng.random(n),
            "flag": rng.random(n) > 0.5,
            "nullable": pd.array([None if i % 3 == 0 else i for i in range(n)], dtype="Int64"),
            "band": pd.Series([text] * n, dtype=object),
            "note": pd.Series(["x"] * n, dtype="str"),
        }
    )


@pytest.mark.parametrize(
    "frames",
    [
        [_frame(0, None), _frame(2, "r"), _frame(20, None)],
        # the same columns and dtypes, first with an all-None object column, then strings
        [_frame(5, None), _frame(5, "g")],
    ],
    ids=["sizes", "object-column-none-then-strings"],
)
def test_qa_table_reads_back_as_to_parquet_writes_it(tmp_path, frames):
    for k, frame in enumerate(frames):
        url = write_qa_sources(str(tmp_path / "qa"), 7001, k, "marginal", frame)
        assert url == qa_sources_url(str(tmp_path / "qa"), 7001, k, "marginal")
        reference = tmp_path / f"ref-{k}.parquet"
        frame.to_parquet(reference, index=False)
        got, want = pd.read_parquet(url), pd.read_parquet(reference)
        pd.testing.assert_frame_equal(got, want, check_dtype=len(frame) > 0)
