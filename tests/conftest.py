"""Session-wide test setup: markers, the shared example data, one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The S3 test server (tests/s3.py), for every test folder.
from s3 import s3_bucket, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# DeepSpeed JIT-builds its CPU comm op once; reuse the build across tests and CI runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow must never fall back to ./mlruns from a test: every test passes its own store.
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / '.cache' / 'test-mlflow.db'}")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on 2 shared cores run up to 100x slower with 2 OpenMP threads than with 1
    (measured): the test process uses one; Ray workers are separate processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


#: How ``make test`` (``pytest -n 2 --dist loadgroup``) splits the suite over its two workers,
#: by file. "main" holds the Ray Train tests, which share one local Ray, one tiny dataset and
#: the cached training runs (tests/training/train_runs.py), and everything not named here.
#: "solo" holds the ``ray job submit`` end-to-end test (its own ``ray start`` cluster in its own
#: temp dir, so no ``ray.init()`` elsewhere can find it), the data-prep pipeline tests (on that
#: worker's own local Ray), and the fake autoscaling cluster's tests and the production
#: rehearsal (their own head and fake nodes, also in their own temp dir). The rehearsal takes
#: 25-27 minutes of the solo worker while the main worker runs the it-learns quick run and the
#: tiny Ray Train runs (about a minute of start-up each); README "Tests" has the measured total.
_SOLO = ("tests/ops/test_job_submit_e2e.py", "tests/ops/test_fake_cluster.py",
         "tests/ops/test_rehearsal.py", "tests/data_prep/test_pipeline.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """``--dist loadgroup`` with the two groups above, chosen by file. (pytest-xdist 3.8 marks
    groups by appending to ``item._nodeid``, which pytest 9.2 no longer reads, so its
    ``xdist_group`` marks are silently ignored: this scheduler does not depend on them.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "solo" if nodeid.split("::", 1)[0] in _SOLO else "main"

    return FileGroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="gpu test: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sav_example() -> Path:
    path = SHARED / "data" / "sav_example" / "sav_000001_manual.json"
    if not path.is_file():
        pytest.fail(f"shared example missing: {path} (CI clones the repo with shared/ beside it)")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray (2 CPUs) for the whole session; stopped at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 CLIPModel (32 px images, 8 px patches) + its image processor."""
    from data_prep.tiny_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))
