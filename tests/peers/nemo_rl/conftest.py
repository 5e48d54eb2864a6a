"""Fixtures for the tests against NeMo-RL's own code (marker ``nemo_rl``; excluded from the default run).

NeMo-RL is not installable from PyPI: its source snapshot (``NEMO_RL_SNAPSHOT``, default
``<repo>/../shared/peers/nemo_rl-7ea279a.tar.gz``) is extracted to a temporary folder and put first on
``sys.path`` and on ``PYTHONPATH`` (Ray's worker processes import it too). A local Ray runs on 2 CPUs. The tests
skip, saying why, when ray or the snapshot is absent or NeMo-RL's modules do not import (``pytest -rs`` prints
it); ``.ci/run`` installs what they need.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SNAPSHOT = Path(os.environ.get("NEMO_RL_SNAPSHOT", ROOT.parent / "shared" / "peers" / "nemo_rl-7ea279a.tar.gz"))


@pytest.fixture(scope="session")
def nemo_rl_snapshot():
    """The extracted snapshot folder, importable here and in Ray workers."""
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed: the NeMo-RL tests need NeMo-RL's venv (.ci/run, section NeMo-RL)")
    if not SNAPSHOT.is_file():
        pytest.skip(f"NeMo-RL snapshot {SNAPSHOT} is absent (set NEMO_RL_SNAPSHOT to its .tar.gz)")
    folder = tempfile.mkdtemp(prefix="nemo_rl_snapshot_")
    with tarfile.open(SNAPSHOT) as tar:
        tar.extractall(folder, filter="data")
    sys.path.insert(0, folder)
    old_pythonpath = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, str(ROOT), old_pythonpath) if p)
    try:
        import nemo_rl.environments.nemo_gym  # noqa: F401
        import nemo_rl.experience.rollouts  # noqa: F401
    except ImportError as e:
        pytest.skip(f"NeMo-RL's modules do not import from {SNAPSHOT.name}: {e} (install .ci/run's NeMo-RL deps)")
    yield folder
    if old_pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old_pythonpath
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local(nemo_rl_snapshot):
    """A local Ray on 2 CPUs for the whole session (started once: ~5 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}})
    yield
    ray.shutdown()
