"""Shared fixtures (keep small; name fixtures after what they provide)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synth_raw_dir(tmp_path_factory):
    """Three complete 32^3 phantoms in BraTS layout (read-only: copy before modifying)."""
    from passion.data.synthetic import synthesize_dataset

    out = tmp_path_factory.mktemp("synth_raw") / "raw"
    synthesize_dataset(out, cases=3, shape=(32, 32, 32), seed=3, workers=1, progress_bar=False)
    return out
