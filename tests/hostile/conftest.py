"""Fixtures for the hostile-input tests: copies of the session's tiny checkpoints to damage, a file outside
every checkpoint that must never be read, and one converted checkpoint."""

from __future__ import annotations

import pytest

from .hostile_tools import SECRET, copy


@pytest.fixture(scope="session")
def secret(tmp_path_factory):
    """A file outside the checkpoints, named like a shard so that nothing but its location gives it away."""
    p = tmp_path_factory.mktemp("outside") / "secret.safetensors"
    p.write_bytes(SECRET)
    return p


@pytest.fixture
def hf(tmp_path, hf_ckpt):
    """A fresh copy of the 3-shard Hugging Face checkpoint (with its index) to damage."""
    return copy(hf_ckpt, tmp_path / "src")


@pytest.fixture
def orig(tmp_path, original_ckpt):
    """A fresh copy of the original/ layout checkpoint (no index; every *.safetensors is read)."""
    return copy(original_ckpt, tmp_path / "src")


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_ckpt):
    """A converted (Orbax) checkpoint, written once; copy it before damaging it."""
    from conversion.convert import Options, convert

    dst = tmp_path_factory.mktemp("converted") / "ckpt"
    convert(hf_ckpt, dst, Options(group_mib=0.1), quiet=True)
    return dst


@pytest.fixture
def conv(tmp_path, converted):
    return copy(converted, tmp_path / "ckpt")
