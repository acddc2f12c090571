"""Shared fixtures (keep small; name fixtures after what they provide)."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs two workers on two cores) each worker keeps one
    intra-op thread, and so do the CLI subprocesses it starts: two workers with two OpenMP
    threads each on two cores wait on descheduled threads at every parallel region."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def synth_raw_dir(tmp_path_factory):
    """Three complete 32^3 phantoms in BraTS layout (read-only: copy before modifying)."""
    from passion.data.synthetic import synthesize_dataset

    out = tmp_path_factory.mktemp("synth_raw") / "raw"
    synthesize_dataset(out, cases=3, shape=(32, 32, 32), seed=3, workers=1, progress_bar=False)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, synth_raw_dir):
    """A cache of the three 32^3 phantoms and an idt split: 2 training cases, 1 test case."""
    from passion.data.preprocess import prepare_dataset
    from passion.data.splits import make_split
    from passion.data.spec import get_spec

    root = tmp_path_factory.mktemp("train_data")
    spec = get_spec("brats2020")
    prepare_dataset(synth_raw_dir, root / "cache", spec, min_size=32, progress=False)
    # t2 missing in half the training cases, the rest complete: every modality is present somewhere
    make_split(root / "cache", root / "split", val=0.0, test=0.34, seed=5,
               missing_rates=[0.0, 0.0, 0.0, 0.5])
    return root


@pytest.fixture
def seed_and_one_thread():
    """Seed 0 and one intra-op thread (tiny tensors: avoids oversubscription on shared cores)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
