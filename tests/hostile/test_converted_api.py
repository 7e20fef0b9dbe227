"""Damaged converted (Orbax) checkpoints through the API: one CheckpointError line naming what is wrong
and pointing at `gptoss-convert --verify`, and flipped bytes caught by the recorded checksums."""

from __future__ import annotations

import gc
import json
import os

import pytest

import gptoss_jax
from gptoss_jax.checkpoint import CheckpointError, integrity
from gptoss_jax.checkpoint import orbax as ckpt_orbax

from .hostile_tools import assert_api_error, deadline, flip_array_bytes

META = ckpt_orbax.STEP_METADATA


def _edit_meta(ckpt, fn):
    p = ckpt / META
    d = json.loads(p.read_text())
    fn(d["custom_metadata"]["gptoss"])
    p.write_text(json.dumps(d))


def _data_files(ckpt):
    return sorted((ckpt / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


METADATA_CASES = {
    "no_config": (lambda m: m.pop("config"), "'config'"),
    "no_expert_format": (lambda m: m.pop("expert_format"), "'expert_format'"),
    "config_not_object": (lambda m: m.update(config="24 layers"), "'config'"),
    "unknown_config_field": (lambda m: m["config"].update(evil=1), "unknown field 'evil'"),
    "missing_config_field": (lambda m: m["config"].pop("vocab_size"), "no field 'vocab_size'"),
    "huge_layer_count": (lambda m: m["config"].update(num_hidden_layers=10**7), "num_hidden_layers"),
    "string_for_number": (lambda m: m["config"].update(rms_norm_eps="1e-5"), "rms_norm_eps"),
    "bad_checksums": (lambda m: m.update(crc32c={"embedding": "abc"}), "'crc32c'"),
    "wrong_format": (lambda m: m.update(format=99), "format 99"),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_damaged_metadata(conv, case):
    fn, needle = METADATA_CASES[case]
    _edit_meta(conv, fn)
    with deadline(), pytest.raises(CheckpointError) as e:
        gptoss_jax.load(conv, quiet=True)
    assert_api_error(e, META, needle)


def test_metadata_not_json(conv):
    (conv / META).write_bytes(b"[" * 100_000)
    with pytest.raises(CheckpointError) as e:
        ckpt_orbax.read_metadata(conv)
    assert_api_error(e, META, "nested too deeply")


def test_no_tree_metadata(conv):
    p = conv / "state" / "_METADATA"
    d = json.loads(p.read_text())
    d.pop("tree_metadata")
    p.write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        gptoss_jax.load(conv, quiet=True)
    assert_api_error(e, "_METADATA", "'tree_metadata'", "gptoss-convert --verify")


def test_step_metadata_deleted(conv):
    (conv / META).unlink()
    with pytest.raises(CheckpointError) as e:
        gptoss_jax.load(conv, quiet=True)
    assert_api_error(e, str(conv), "converted", "convert again")


STORAGE_CASES = {
    "manifest_deleted": lambda c: (c / "state" / "manifest.ocdbt").unlink(),
    "manifest_garbage": lambda c: (c / "state" / "manifest.ocdbt").write_bytes(b"\0" * 100),
    "data_file_deleted": lambda c: _data_files(c)[-1].unlink(),
    "data_file_truncated": lambda c: os.truncate(_data_files(c)[-1], 100),
}


@pytest.mark.parametrize("case", sorted(STORAGE_CASES))
def test_damaged_storage(conv, case, capfd):
    STORAGE_CASES[case](conv)
    with deadline(), pytest.raises(CheckpointError) as e:
        gptoss_jax.load(conv, quiet=True)
    assert_api_error(e, str(conv / "state"), "damaged or incomplete", f"gptoss-convert --verify {conv}")
    with pytest.raises(CheckpointError):  # verification names the same problem rather than crashing
        integrity.verify_checkpoint(conv)
    gc.collect()  # Orbax's abandoned reads report their errors when collected: they must stay quiet
    assert capfd.readouterr().err == ""


def test_flipped_bytes_are_named_by_array_and_file(conv):
    name, victim = flip_array_bytes(conv)
    report = integrity.verify_checkpoint(conv)
    assert not report.ok and len(report.problems) == 1, report.problems
    msg = report.problems[0]
    assert f"array {name} " in msg and "crc32c" in msg and str(victim.relative_to(conv)) in msg, msg
    with pytest.raises(CheckpointError) as e:
        report.raise_if_bad()
    assert_api_error(e, name, "convert it again")


def test_intact_checkpoint_verifies(converted):
    report = integrity.verify_checkpoint(converted)
    have = ckpt_orbax.stored_arrays(converted)
    assert report.ok and report.checked == len(have) and not report.unrecorded, report.summary()
    assert report.nbytes == sum(
        a.nbytes for a in ckpt_orbax.read_arrays(converted, {n: d for n, (_, d) in have.items()}).values()
    )


def test_checkpoint_without_checksums_still_loads(conv):
    """Converted before checksums were recorded: loads, and verification says it could check nothing."""
    _edit_meta(conv, lambda m: m.pop("crc32c"))
    assert gptoss_jax.load(conv, quiet=True).cfg.num_hidden_layers == 4
    report = integrity.verify_checkpoint(conv)
    assert report.ok and report.checked == 0 and len(report.unrecorded) == len(ckpt_orbax.stored_arrays(conv))
    assert "no recorded checksum" in report.summary()


def test_checksums_are_those_of_the_stored_bytes(converted):
    """Recorded at conversion time from the arrays handed to Orbax; a plain restore gives the same bytes."""
    sums = ckpt_orbax.read_metadata(converted)["crc32c"]
    have = ckpt_orbax.stored_arrays(converted)
    got = ckpt_orbax.read_arrays(converted, {n: d for n, (_, d) in have.items()})
    assert sorted(sums) == sorted(have)
    assert all(integrity.crc32c(got[n]) == sums[n] for n in have)
