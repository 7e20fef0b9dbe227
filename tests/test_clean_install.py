"""The README's first command on a fresh machine (issue 10, item 2): a venv made by `pip install -e .` alone,
without the test extra (whose torch brings `filelock` along), then `gptoss-jax demo` twice. The first run
writes the persistent compilation cache to its default place (`~/.cache/gptoss_jax/xla`, HOME pointed at a
temporary folder); the second reads it back. Before `filelock` was declared, every command warned "Please
install the filelock package to set jax_compilation_cache_max_size" and the cache stayed empty.

Needs the package index (as the install itself does); pip's own cache makes it quick after `.ci/run`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from clitools import REPO

pytestmark = pytest.mark.slow


def test_plain_install_has_a_working_compilation_cache(tmp_path):
    venv, home = tmp_path / "venv", tmp_path / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "GPTOSS_JAX_COMPILE_CACHE", "XLA_FLAGS")
    }
    env.update(HOME=str(home), JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1")

    def sh(*cmd, timeout=600):
        res = subprocess.run(
            list(map(str, cmd)),
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert res.returncode == 0, f"{cmd}: {res.stderr[-3000:]}"
        return res

    sh(sys.executable, "-m", "venv", venv)
    sh(venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", REPO)
    sh(venv / "bin" / "python", "-c", "import importlib.util as u, sys; sys.exit(bool(u.find_spec('torch')))")

    cache = home / ".cache" / "gptoss_jax" / "xla"
    runs, entries = [], []
    for _ in range(2):
        runs.append(sh(venv / "bin" / "gptoss-jax", "demo", "--max-new-tokens", "4"))
        entries.append(sorted(p.name for p in cache.iterdir()) if cache.is_dir() else [])
    first, second = (r.stderr for r in runs)
    assert "filelock" not in first + second, [ln for ln in first.splitlines() if "filelock" in ln]
    assert entries[0], "the first run wrote nothing to the compilation cache"
    assert entries[1] == entries[0]  # the second compiled nothing new
    assert "cache hit" not in first.lower() and "cache hit" in second.lower(), second[-3000:]
