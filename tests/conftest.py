"""Shared fixtures. Tests build their own tiny models; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The real-model tier's SmolLM2 lives in the user's inpo cache (`make real-model`), not the tests'.
os.environ.setdefault(
    "INPO_REAL_MODEL_CACHE",
    os.environ.get("INPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "inpo"),
)
# The default task's reference model is cached here once per test session, not in ~/.cache.
# Under pytest-xdist (`make test`: `-n auto`) the controller loads this file first, so every
# worker inherits this one folder: a reference built by one worker is reused by the others
# (a build is atomic: `inpo.tasks.sft.cached_build`).
os.environ.setdefault("INPO_CACHE_DIR", tempfile.mkdtemp(prefix="inpo-test-cache-"))
# ... and each worker (and each command a test starts) gets its share of the cores for torch's
# threads, rather than every worker spinning one thread per core.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# The `inpo` commands tests start are forked from a warm process that has imported torch and
# transformers once (tests/forkserver/inpo_forkserver.py: ~6 s of CPU saved a command);
# `INPO_TEST_FORKSERVER=0` runs each as a fresh process. Ranks of multi-process launches are
# always fresh processes.
if os.environ.get("INPO_TEST_FORKSERVER", "1") != "0" and "INPO_FORKSERVER_DIR" not in os.environ:
    os.environ["INPO_FORKSERVER_DIR"] = tempfile.mkdtemp(prefix="inpo-fork-")
    os.environ["INPO_FORKSERVER_OWNER"] = str(os.getpid())
    _here = str(Path(__file__).resolve().parent / "forkserver")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [_here, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def _group_xdist(config, items) -> None:
    """``--dist loadgroup``: a test marked ``xdist_group(NAME)`` gets ``@NAME`` at the end of its
    id, which is how xdist's scheduler keeps a group on one worker. pytest-xdist 3.8 writes the
    suffix into ``item._nodeid``, which pytest 9.2 no longer reads (ids are ``item._id``), so
    every group was split across workers and its module fixtures built on each; this does it
    where pytest 9.2 reads it, and nothing where xdist's own suffix took."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = sorted({str(m.args[0]) for m in item.iter_markers("xdist_group") if m.args})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


def pytest_collection_modifyitems(config, items):
    """The longest tests first, so that `make test`'s workers finish together (xdist hands each
    worker the next test as it frees up): the real-model tier, then the slow tier, then the
    rest. Modules keep their tests together and in order (module fixtures are built once)."""

    def weight(item) -> int:
        return 0 if item.get_closest_marker("real") else 1 if item.get_closest_marker("slow") else 2

    first: dict[str, int] = {}
    for item in items:
        key = item.nodeid.split("::")[0]
        first[key] = min(first.get(key, 2), weight(item))
    order = {
        key: i for i, key in enumerate(dict.fromkeys(it.nodeid.split("::")[0] for it in items))
    }
    items.sort(key=lambda it: (first[it.nodeid.split("::")[0]], order[it.nodeid.split("::")[0]]))
    _group_xdist(config, items)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


def pytest_unconfigure(config):
    """The fork servers (if this session started them) stop on their own once it has ended;
    their folder goes with it."""
    if os.environ.get("INPO_FORKSERVER_OWNER") == str(os.getpid()):
        import shutil

        shutil.rmtree(os.environ["INPO_FORKSERVER_DIR"], ignore_errors=True)
