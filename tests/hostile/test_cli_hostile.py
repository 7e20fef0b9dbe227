"""Hostile inputs through the real entry points (`gptoss-convert`, `gptoss-jax info`, `gptoss-jax generate`),
each in a subprocess that must answer within 10 seconds: exit 2 (or the documented code), one stderr line
naming the file and the field or tensor, no raw control characters, nothing of a file outside the
checkpoint, and no output left that could pass for a result.

The API tests (test_source_api.py, test_converted_api.py) cover every case; here are the ones where the
process matters: hangs, what reaches the terminal, exit codes, leftovers, a full or read-only disk.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from .hostile_tools import (
    EVIL,
    assert_clean,
    assert_cli_error,
    cli_env,
    command,
    edit_header,
    edit_json,
    flip_array_bytes,
    nothing_left,
    read_header,
    run,
    shard_holding,
    single_file_hf,
)

NEEDED_VS_FREE = re.compile(r"about \d+ bytes \(.+\) are needed, \d+ bytes \(.+\) are free")
GEN = ("--tokens", "1 2", "--max-new-tokens", "1", "--quiet")  # generate's arguments: no tokenizer needed


def _fifo_single_file(hf):
    single_file_hf(hf)
    (hf / "model.safetensors").unlink()
    os.mkfifo(hf / "model.safetensors")
    return hf


def _edit_meta(ckpt, fn):
    p = ckpt / "_CHECKPOINT_METADATA"
    d = json.loads(p.read_text())
    fn(d["custom_metadata"]["gptoss"])
    p.write_text(json.dumps(d))


# --------------------------------------------------------------------------------------- released folders
def test_convert_index_pointing_outside(tmp_path, hf, secret):
    edit_json(hf / "model.safetensors.index.json",
              lambda d: d["weight_map"].update({"model.norm.weight": os.path.relpath(secret, hf)}))  # fmt: skip
    r = run("gptoss-convert", hf, tmp_path / "out", "--quiet")
    assert_cli_error(r, "model.safetensors.index.json", "model.norm.weight", "leaves the checkpoint folder")
    nothing_left(tmp_path, "src")


@pytest.mark.parametrize("tool", ["gptoss-convert", "info", "generate"])
def test_fifo_shard_does_not_hang(tmp_path, hf, tool):
    src = _fifo_single_file(hf)
    if tool == "gptoss-convert":
        r = run(tool, src, tmp_path / "out", "--quiet")
    else:
        r = run("gptoss-jax", tool, src, *(GEN if tool == "generate" else ()))
    assert_cli_error(r, "model.safetensors", "named pipe")
    nothing_left(tmp_path, "src")


def test_convert_fifo_among_original_shards(tmp_path, orig):
    os.mkfifo(orig / "model--extra.safetensors")
    r = run("gptoss-convert", orig, tmp_path / "out", "--quiet")
    assert_cli_error(r, "model--extra.safetensors", "named pipe")
    nothing_left(tmp_path, "src")


def test_info_ten_million_layers_is_refused_at_once(hf):
    edit_json(hf / "config.json", lambda d: (d.update(num_hidden_layers=10**7), d.pop("layer_types")))
    r = run("gptoss-jax", "info", hf)
    assert_cli_error(r, "config.json", "num_hidden_layers", "10000000")


@pytest.mark.parametrize("change,field", [({"rope_scaling": "yarn"}, "rope_scaling"),
                                          ({"num_attention_heads": 0}, "num_attention_heads"),
                                          ({"swiglu_limit": "7"}, "swiglu_limit")])  # fmt: skip
def test_info_bad_config_field(hf, change, field):
    edit_json(hf / "config.json", lambda d: d.update(change))
    assert_cli_error(run("gptoss-jax", "info", hf), "config.json", field)


def test_convert_nan_in_config(tmp_path, hf):
    (hf / "config.json").write_text(
        (hf / "config.json").read_text().replace('"rope_theta": 150000.0', '"rope_theta": NaN')
    )
    assert_cli_error(
        run("gptoss-convert", hf, tmp_path / "out", "--quiet"), "config.json", "rope_theta", "nan"
    )
    nothing_left(tmp_path, "src")


def test_convert_escapes_control_characters(tmp_path, orig):
    f = min(orig.glob("*.safetensors"))
    edit_header(f, lambda h: h.update({EVIL: {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}))
    r = run("gptoss-convert", orig, tmp_path / "out", "--quiet")
    assert_cli_error(r, f.name, "unexpected tensor evil\\x1b[2J\\x1b]0;pwned\\x07\\u202e")
    nothing_left(tmp_path, "src")


def test_convert_deeply_nested_header(tmp_path, hf):
    f = min(hf.glob("model-*.safetensors"))
    raw = b"[" * 100_000 + b"]" * 100_000
    f.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert_cli_error(run("gptoss-convert", hf, tmp_path / "out", "--quiet"), f.name, "nested too deeply")
    nothing_left(tmp_path, "src")


def _poison(src, name):
    f = shard_holding(src, name)
    header, data = read_header(f)
    b = header[name]["data_offsets"][0]
    f.write_bytes(f.read_bytes()[: -len(data)] + data[:b] + b"\xc0\x7f" + data[b + 2 :])  # bf16 NaN first
    return f


def test_convert_nan_weight(tmp_path, hf):
    f = _poison(hf, "model.layers.2.self_attn.o_proj.weight")
    r = run("gptoss-convert", hf, tmp_path / "out", "--quiet", "--group-mib", "0.05")
    assert_cli_error(r, f.name, "model.layers.2.self_attn.o_proj.weight", "NaN or Inf", "(0, 0)")
    nothing_left(tmp_path, "src")


def test_convert_nan_weight_allowed(tmp_path, hf):
    f = _poison(hf, "model.layers.2.self_attn.o_proj.weight")
    r = run("gptoss-convert", hf, tmp_path / "out", "--quiet", "--allow-nonfinite")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and f.name in lines[0], r.stderr
    assert (tmp_path / "out").is_dir() and not (tmp_path / "out.converting").exists()


# ----------------------------------------------------------------------------------- converted folders
@pytest.mark.parametrize("tool", ["info", "generate"])
def test_converted_huge_layer_count(conv, tool):
    _edit_meta(conv, lambda m: m["config"].update(num_hidden_layers=10**7))
    r = run("gptoss-jax", tool, conv, *(GEN if tool == "generate" else ()))
    assert_cli_error(r, "_CHECKPOINT_METADATA", "num_hidden_layers")


def test_info_converted_without_config(conv):
    _edit_meta(conv, lambda m: m.pop("config"))
    assert_cli_error(
        run("gptoss-jax", "info", conv), "_CHECKPOINT_METADATA", "'config'", "gptoss-convert --verify"
    )


@pytest.mark.parametrize("damage", ["manifest", "data"])
def test_generate_damaged_converted_checkpoint(conv, damage):
    if damage == "manifest":
        (conv / "state" / "manifest.ocdbt").unlink()
    else:
        os.truncate(max((conv / "state").rglob("d/*"), key=lambda p: p.stat().st_size), 100)
    r = run("gptoss-jax", "generate", conv, *GEN)
    assert_cli_error(r, str(conv / "state"), "damaged or incomplete", f"gptoss-convert --verify {conv}")


VERIFY = {"gptoss-convert": ("gptoss-convert", "--verify"), "gptoss-jax": ("gptoss-jax", "verify")}


@pytest.mark.parametrize("tool", VERIFY)
def test_verify_names_flipped_array_and_file(conv, tool):
    name, victim = flip_array_bytes(conv)
    r = run(*VERIFY[tool], conv, "--quiet")
    assert_cli_error(
        r, "verification failed", f"array {name} ", str(victim.relative_to(conv)), "crc32c", code=1
    )


@pytest.mark.parametrize("tool", VERIFY)
def test_verify_unreadable_checkpoint(conv, tmp_path, tool):
    (conv / "state" / "manifest.ocdbt").unlink()
    assert_cli_error(run(*VERIFY[tool], conv, "--quiet"), str(conv / "state"), "damaged or incomplete")
    assert_cli_error(run(*VERIFY[tool], tmp_path / "missing", "--quiet"), "missing")


@pytest.mark.parametrize("tool", VERIFY)
def test_verify_intact(converted, tool):
    r = run(*VERIFY[tool], converted, "--quiet")
    assert r.returncode == 0 and "all match" in r.stderr, r.stderr
    assert_clean(r.stderr)


# ----------------------------------------------------------------------------------------- destinations
def test_convert_to_dangling_symlink(tmp_path, hf):
    (tmp_path / "out").symlink_to(tmp_path / "missing")
    r = run("gptoss-convert", hf, tmp_path / "out", "--quiet")
    assert r.seconds < 5  # refused before any work, not after converting everything
    assert_cli_error(r, "out", "symbolic link to a missing target")
    nothing_left(tmp_path, "src", "out")


def test_convert_under_a_file(tmp_path, hf):
    (tmp_path / "afile").write_text("x")
    r = run("gptoss-convert", hf, tmp_path / "afile" / "sub" / "out", "--quiet")
    assert_cli_error(r, "afile", "is not a folder")
    nothing_left(tmp_path, "src", "afile")


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "true"], capture_output=True, check=False
    )
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace (unshare) for a "
                                 "small or read-only file system")  # fmt: skip


def in_namespace(tmp_path, script: str, timeout: float = 40) -> dict:
    """Runs `script` (bash) in a private mount namespace, with a tmpfs it mounts at $M vanishing with it.
    Lines "key=value" it prints come back as a dict."""
    env = cli_env(M=tmp_path / "mnt", T=tmp_path, CONVERT=shlex.join(command("gptoss-convert")))
    (tmp_path / "mnt").mkdir()
    r = subprocess.run(["unshare", "--mount", "--map-root-user", "bash", "-euc", script], capture_output=True,
                       text=True, env=env, timeout=timeout, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


@needs_mount
def test_convert_to_read_only_file_system(tmp_path, hf):
    out = in_namespace(
        tmp_path,
        f"""
        mount -t tmpfs -o ro,size=8m tmpfs "$M"
        rc=0; $CONVERT {hf} "$M/out" --quiet 2>"$T/err" || rc=$?
        echo "rc=$rc"; echo "left=$(ls -A "$M")"
    """,
    )
    assert out == {"rc": "2", "left": ""}, out
    err = (tmp_path / "err").read_text()
    assert err.count("\n") == 1 and "cannot write in" in err and "Read-only file system" in err, err


@needs_mount
def test_convert_without_enough_space(tmp_path, hf):
    out = in_namespace(
        tmp_path,
        f"""
        mount -t tmpfs -o size=4m tmpfs "$M"
        rc=0; $CONVERT {hf} "$M/out" --quiet 2>"$T/err" || rc=$?
        echo "rc=$rc"; echo "left=$(ls -A "$M")"
    """,
    )
    assert out == {"rc": "2", "left": ""}, out
    err = (tmp_path / "err").read_text()
    assert err.count("\n") == 1 and "not enough free space" in err and NEEDED_VS_FREE.search(err), err


@needs_mount
def test_disk_filling_up_while_converting_then_resuming(tmp_path, hf):
    """The disk fills after the first group: one line (bytes needed vs free, no Orbax traceback), the
    partial work kept; once space is freed the same command resumes and the result verifies."""
    out = in_namespace(
        tmp_path,
        f"""
        mount -t tmpfs -o size=24m tmpfs "$M"
        GPTOSS_CONVERT_TEST_DELAY=0.3 $CONVERT {hf} "$M/out" --group-mib 0.05 --quiet 2>"$T/err1" &
        pid=$!
        for i in $(seq 200); do [ -s "$M/out.converting/progress.jsonl" ] && break; sleep 0.05; done
        dd if=/dev/zero of="$M/filler" bs=64k 2>/dev/null || true
        rc=0; wait $pid || rc=$?
        echo "rc1=$rc"; echo "left1=$(ls -A "$M" | tr '\\n' ' ')"
        rm "$M/filler"
        rc=0; $CONVERT {hf} "$M/out" --group-mib 0.05 2>"$T/err2" || rc=$?
        echo "rc2=$rc"; echo "left2=$(ls -A "$M" | tr '\\n' ' ')"
        rc=0; $CONVERT --verify "$M/out" --quiet 2>"$T/err3" || rc=$?
        echo "rc3=$rc"
    """,
        timeout=60,
    )
    err1 = (tmp_path / "err1").read_text()
    assert out["rc1"] == "1" and out["left1"].split() == ["filler", "out.converting"], (out, err1)
    assert err1.count("\n") == 1 and "filled up" in err1 and NEEDED_VS_FREE.search(err1), err1
    assert "kept" in err1 and "Traceback" not in err1 and "absl" not in err1, err1
    assert out["rc2"] == "0" and out["left2"].split() == ["out"], (out, (tmp_path / "err2").read_text())
    assert "resuming:" in (tmp_path / "err2").read_text()
    assert out["rc3"] == "0", (tmp_path / "err3").read_text()
