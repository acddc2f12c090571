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


# The longest tests (10-60 s each on one busy core; measured with --durations), longest first. `make test`
# distributes tests one by one to whichever worker is free (--dist loadgroup), so starting these first
# lets both workers end together instead of one running a long test that happened to be collected last.
LONG_FIRST = (
    "test_learning.py::test_overfits_one_phantom[m2ftrans-passion]",
    "test_learning.py::test_overfits_one_phantom[m2ftrans-baseline]",
    "test_learning.py::test_overfits_one_phantom[rfnet-passion]",
    "test_learning.py::test_overfits_one_phantom[mmformer-passion]",
    "test_demo_report.py::",
    "test_learning.py::test_overfits_one_phantom[",
    "test_checkpointing.py::test_every_mode_gives_the_same_values_and_gradients",
    "test_learning_2d.py::",
    "test_train_options.py::test_log_every",
    "test_distributed.py::test_killed",
    "test_batched_fusion.py::test_passion_objective_step_is_unchanged_by_batching",
    "test_distributed.py::test_two_ranks",
    "test_batched_fusion.py::test_batched_teacher_and_students_equal_separate_calls[3-",
    "test_validation.py::test_crash_and_resume",
    "test_dataset_files.py::test_glioma3_end_to_end",
    "test_validation.py::test_two_ranks",
)
# Modules whose module-scoped fixture is itself long (the demo: about 55 s) go to one worker as a whole,
# so that it is built once.
ONE_WORKER = ("test_demo_report.py",)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, key in enumerate(LONG_FIRST) if key in item.nodeid), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)  # an xdist hook: no spec under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` as `make test` means it: one test at a time to whichever worker is free, in
    collection order (LONG_FIRST), the ONE_WORKER modules whole. xdist's own loadgroup cannot group
    here: it renames `item._nodeid`, which pytest 9 no longer reads, so an xdist_group mark is lost."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class LongFirstScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::")[0]
            return module if module.rsplit("/", 1)[-1] in ONE_WORKER else nodeid

    config.option.loadscopereorder = False  # keep the collection order (by default: largest scope first)
    return LongFirstScheduling(config, log)


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
def one_thread():
    """One intra-op thread (tiny tensors: thread hand-off costs more than it saves, above all on busy
    shared cores); `pytestmark = pytest.mark.usefixtures("one_thread")` in a module that wants it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seed_and_one_thread(one_thread):
    """Seed 0 and one intra-op thread."""
    torch.manual_seed(0)
