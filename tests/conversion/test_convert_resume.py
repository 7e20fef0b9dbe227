"""Interruption and resume: a conversion killed mid-run leaves no DST, and the same command resumes
without redoing the finished groups and produces a bit-identical checkpoint."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from convtools import REPO, assert_same_checkpoint, cli_env, run_convert

import gptoss_jax
from conversion.convert import Options, convert
from gptoss_jax.checkpoint.orbax import is_orbax_checkpoint


def _start_and_stop(src, dst, sig, min_groups: int) -> subprocess.CompletedProcess:
    """Runs the CLI slowed down after each group; sends `sig` once `min_groups` groups are committed."""
    cmd = [sys.executable, "-m", "conversion.cli", str(src), str(dst), "--group-mib", "0.02"]
    progress = dst.parent / (dst.name + ".converting") / "progress.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(GPTOSS_CONVERT_TEST_DELAY=0.4), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if progress.is_file() and len(progress.read_text().splitlines()) >= min_groups:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.stderr.read()}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_kill_then_resume_gives_identical_checkpoint(tmp_path, hf_ckpt):
    ref = tmp_path / "ref"
    convert(hf_ckpt, ref, Options(), quiet=True)
    dst = tmp_path / "out"
    work = tmp_path / "out.converting"

    r = _start_and_stop(hf_ckpt, dst, signal.SIGKILL, min_groups=3)
    assert r.returncode == -signal.SIGKILL
    assert not dst.exists() and work.is_dir() and not is_orbax_checkpoint(work)
    with pytest.raises(ValueError):
        gptoss_jax.load(dst)

    # a polite interruption (SIGTERM, like Ctrl-C) after more progress: exit 130, work kept, advice printed
    r = _start_and_stop(hf_ckpt, dst, signal.SIGTERM, min_groups=6)
    assert r.returncode == 130, r.stderr
    assert "rerun the same command to resume" in r.stderr.splitlines()[-1]
    assert not dst.exists() and work.is_dir()

    r = run_convert(hf_ckpt, dst, "--group-mib", "0.02")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("resuming:"))
    done, total = (int(x) for x in line.split()[1::2][:2])  # "resuming: N of M tensors already written"
    assert 0 < done < total == 79
    assert f"({done} from an earlier run)" in r.stderr
    assert not work.exists() and is_orbax_checkpoint(dst)
    assert_same_checkpoint(dst, ref)


def test_interrupted_finalize_starts_over(tmp_path, hf_ckpt, monkeypatch):
    """Orbax's merge of the snapshots cannot be resumed half-done: a rerun writes everything again."""
    from conversion import orbax_io

    ref = tmp_path / "ref"
    convert(hf_ckpt, ref, Options(), quiet=True)
    dst = tmp_path / "out"
    real = orbax_io.partial_finalize

    def interrupted(ctx, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(orbax_io, "partial_finalize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(hf_ckpt, dst, Options(group_mib=0.05), quiet=True)
    assert (tmp_path / "out.converting" / "finalizing").exists() and not dst.exists()
    monkeypatch.setattr(orbax_io, "partial_finalize", real)
    messages = []
    res = convert(hf_ckpt, dst, Options(group_mib=0.05), quiet=True, log=messages.append)
    assert any("starting over" in m for m in messages) and res.resumed == 0
    assert_same_checkpoint(dst, ref)
