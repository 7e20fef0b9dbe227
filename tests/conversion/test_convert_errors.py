"""Bad inputs: each must end the CLI with exit code 2, one stderr line naming the file and tensor, and
nothing left behind (no DST, no DST.converting)."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
from convtools import file_holding, rewrite, run_convert, update_index

from conversion import cli


def _truncate(folder):
    f = max(folder.glob("model-*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    return f.name, "lm_head.weight"  # the last tensor of the last shard runs past the end


def _bad_json_header(folder):
    f = sorted(folder.glob("model-*.safetensors"))[1]
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff{not js"
    f.write_bytes(bytes(data))
    return f.name, "corrupt safetensors header"


def _bad_header_length(folder):
    f = min(folder.glob("model-*.safetensors"))
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    f.write_bytes(bytes(data))
    return f.name, "bad safetensors header length"


def _not_safetensors(folder):
    f = min(folder.glob("model-*.safetensors"))
    f.write_bytes(b"\x01\x02")
    return f.name, "not a safetensors file"


def _missing_hf(folder):
    name = "model.layers.2.mlp.router.bias"
    f = file_holding(folder, name)
    rewrite(f, lambda t: t.pop(name))
    update_index(folder, lambda m: m.pop(name))
    return folder.name, name


def _missing_file_in_index(folder):
    f = sorted(folder.glob("model-*.safetensors"))[1]
    f.unlink()
    return "model.safetensors.index.json", f.name


def _missing_original(folder):
    name = "block.1.attn.sinks"
    rewrite(file_holding(folder, name), lambda t: t.pop(name))
    return folder.name, name


def _unexpected(folder):
    f = min(folder.glob("*.safetensors"))
    rewrite(f, lambda t: t.update({"block.0.attn.extra_scale": np.ones(4, np.float32)}))
    return f.name, "block.0.attn.extra_scale"


def _duplicate(folder):
    a, b = sorted(folder.glob("*.safetensors"))
    rewrite(
        b, lambda t: t.update({"norm.scale": np.zeros(64, np.float32)}) if "norm.scale" not in t else None
    )
    rewrite(
        a, lambda t: t.update({"norm.scale": np.zeros(64, np.float32)}) if "norm.scale" not in t else None
    )
    return b.name, "duplicate tensor norm.scale"


def _wrong_shape(folder):
    name = "block.3.mlp.gate.bias"
    f = file_holding(folder, name)
    rewrite(f, lambda t: t.update({name: t[name][:-1].copy()}))
    return f.name, name


def _wrong_dtype(folder):
    name = "block.0.mlp.mlp2_weight.scales"
    f = file_holding(folder, name)
    rewrite(f, lambda t: t.update({name: t[name].view(np.int8)}))
    return f.name, name


def _config_mismatch(folder):
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["intermediate_size"] = 2 * cfg["intermediate_size"]
    cfg_path.write_text(json.dumps(cfg))
    return "config.json", "model.layers.0.mlp.experts.gate_up_proj_blocks"


def _e8m0_255(folder):
    name = "model.layers.2.mlp.experts.down_proj_scales"  # late in the stream: groups before it are written
    f = file_holding(folder, name)

    def poke(t):
        s = t[name].copy()
        s[1, 3, 0] = 255
        t[name] = s

    rewrite(f, poke)
    return f.name, name


CASES = {
    "truncated": ("hf", _truncate),
    "corrupt_header": ("hf", _bad_json_header),
    "header_length": ("hf", _bad_header_length),
    "not_safetensors": ("hf", _not_safetensors),
    "missing_tensor_hf": ("hf", _missing_hf),
    "index_lists_missing_file": ("hf", _missing_file_in_index),
    "missing_tensor_original": ("original", _missing_original),
    "unexpected_tensor": ("original", _unexpected),
    "duplicate_tensor": ("original", _duplicate),
    "wrong_shape": ("original", _wrong_shape),
    "wrong_dtype": ("original", _wrong_dtype),
    "config_mismatch": ("hf", _config_mismatch),
    "e8m0_255_packed": ("hf", _e8m0_255),
    "e8m0_255_dequantized": ("hf", _e8m0_255),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, hf_ckpt, original_ckpt, capsys):
    layout, tamper = CASES[case]
    src = shutil.copytree(hf_ckpt if layout == "hf" else original_ckpt, tmp_path / "src")
    where, what = tamper(src)
    dst = tmp_path / "out"
    # small groups: the E8M0 cases fail after earlier groups were committed, which must be removed too
    args = [str(src), str(dst), "--group-mib", "0.02", "--quiet"]
    if case.endswith("dequantized"):
        args += ["--experts", "dequantized"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("gptoss-convert: error: ")
    assert where in lines[0] and what in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # neither out nor out.converting


def test_e8m0_message_and_exit_code_in_a_subprocess(tmp_path, hf_ckpt):
    """The real process: exit status 2, a single stderr line, nothing left behind."""
    src = shutil.copytree(hf_ckpt, tmp_path / "src")
    fname, name = _e8m0_255(src)
    r = run_convert(src, tmp_path / "out", "--quiet", "--group-mib", "0.02")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and fname in r.stderr and name in r.stderr and "255" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_arguments_exit_2(tmp_path, hf_ckpt, capsys):
    assert cli.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main([str(hf_ckpt), str(tmp_path / "out"), "--chunk-mib", "0"]) == 2
    assert "chunk" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.converting").exists()
