"""Shared fixtures: GPU markers that skip cleanly, spawned servers, and a /dev/shm leak check."""

from __future__ import annotations

import os

# One CPU thread per process: the suite runs servers and clients side by side on 2 cores, and equal
# thread counts keep CPU kernels' summation order, hence bitwise equality, the same in every process.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

SHM_DIR = os.environ.get("ZMQDISAGG_SHM_DIR", "/dev/shm")  # where our servers put segments


def _cuda_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    count = _cuda_count()
    for item in items:
        gpu = item.get_closest_marker("gpu")
        multi = item.get_closest_marker("multi_gpu")
        need = (multi.args[0] if multi and multi.args else 2) if multi else (1 if gpu else 0)
        if need and count < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA GPU(s), found {count}"))


def _our_segments() -> set[str]:
    if not os.path.isdir(SHM_DIR):
        return set()
    return {n for n in os.listdir(SHM_DIR) if n.startswith("zmqdisagg-")}


@pytest.fixture(scope="session", autouse=True)
def no_shm_leftovers():
    """Fail the session if the suite leaves zmqdisagg shared-memory segments behind."""
    before = _our_segments()
    yield
    left = _our_segments() - before
    assert not left, f"shared-memory segments left behind: {sorted(left)}"


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _run_from_repo_root(repo_root, monkeypatch):
    """Tests name bundled configs by relative path (configs/tiny-llama.json)."""
    monkeypatch.chdir(repo_root)
