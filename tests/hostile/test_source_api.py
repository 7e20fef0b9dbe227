"""Broken and hostile released checkpoints through the API (`open_source`, `gptoss_jax.load`, `convert`).

Every case builds its own damaged copy of a tiny checkpoint and expects one `CheckpointError` line that
names the file and the field or tensor, in well under 10 seconds, with no raw control characters and
nothing of a file outside the checkpoint in it.
"""

from __future__ import annotations

import json
import math
import os
import time

import ml_dtypes
import numpy as np
import pytest

from gptoss_jax.checkpoint import CheckpointError
from gptoss_jax.checkpoint.source import open_source

from .hostile_tools import (
    EVIL,
    assert_api_error,
    deadline,
    edit_header,
    edit_json,
    nothing_left,
    raw_safetensors,
    read_header,
    shard_holding,
    single_file_hf,
)

INDEX = "model.safetensors.index.json"
NESTED = b"[" * 100_000 + b"]" * 100_000  # deeper than the JSON parser can recurse


def _index(src, fn):
    edit_json(src / INDEX, lambda d: fn(d["weight_map"]))


def _first_shard(src):
    return min(src.glob("model-*.safetensors"))


# ---------------------------------------------------------------------------------- paths and files
def index_dotdot(src, secret):
    rel = os.path.relpath(secret, src)  # ../../../outside0/secret.safetensors
    _index(src, lambda m: m.update({"model.norm.weight": rel}))
    return INDEX, "model.norm.weight", "leaves the checkpoint folder"


def index_absolute(src, secret):
    _index(src, lambda m: m.update({"lm_head.weight": str(secret)}))
    return INDEX, "lm_head.weight", "leaves the checkpoint folder"


def index_symlink_out(src, secret):
    f = _first_shard(src)
    f.unlink()
    f.symlink_to(secret)
    return f.name, "links outside the checkpoint folder"


def index_value_int(src, secret):
    _index(src, lambda m: m.update({"model.norm.weight": 3}))
    return INDEX, "model.norm.weight", "must be a string"


def index_value_null(src, secret):
    _index(src, lambda m: m.update({"model.norm.weight": None}))
    return INDEX, "model.norm.weight", "must be a string"


def index_value_list(src, secret):
    _index(src, lambda m: m.update({"model.norm.weight": ["a", "b"]}))
    return INDEX, "model.norm.weight", "must be a string"


def index_value_escape(src, secret):
    _index(src, lambda m: m.update({"model.norm.weight": EVIL + ".safetensors"}))
    return INDEX, "evil\\x1b[2J", "\\x07"


def index_not_object(src, secret):
    (src / INDEX).write_text(json.dumps({"weight_map": [1, 2]}))
    return INDEX, "weight_map"


def index_nested(src, secret):
    (src / INDEX).write_bytes(b'{"weight_map": ' + NESTED + b"}")
    return INDEX, "nested too deeply"


def index_fifo_shard(src, secret):
    f = _first_shard(src)
    f.unlink()
    os.mkfifo(f)
    return f.name, "named pipe"


def single_file_fifo(src, secret):
    single_file_hf(src)
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    return "model.safetensors", "named pipe"


def single_file_device(src, secret):
    single_file_hf(src)
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("/dev/zero")
    return "model.safetensors", "links outside"


def single_file_folder(src, secret):
    single_file_hf(src)
    (src / "model-extra.safetensors").mkdir()
    return "model-extra.safetensors", "a folder"


def original_extra_fifo(src, secret):
    os.mkfifo(src / "zz-extra.safetensors")
    return "zz-extra.safetensors", "named pipe"


def config_fifo(src, secret):
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    return "config.json", "named pipe"


def config_symlink_out(src, secret):
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(secret)
    return "config.json", "links outside"


def config_too_large(src, secret):
    os.truncate(src / "config.json", 64 << 20)  # sparse: nothing is written, the size alone is refused
    return "config.json", "more than"


def config_nested(src, secret):
    (src / "config.json").write_bytes(NESTED)
    return "config.json", "nested too deeply"


def config_duplicate_key(src, secret):
    text = (src / "config.json").read_text()
    (src / "config.json").write_text(text[:-1] + ', "num_hidden_layers": 4}')
    return "config.json", "duplicate key num_hidden_layers"


def generation_config_nested(src, secret):
    (src / "generation_config.json").write_bytes(NESTED)
    return "generation_config.json", "nested too deeply"


# ---------------------------------------------------------------------------------- safetensors headers
def _tamper_header(fn):
    def case(src, secret):
        f = _first_shard(src)
        edit_header(f, lambda h: fn(h, next(k for k in h if k != "__metadata__")))
        return f.name

    return case


def header_nested(src, secret):
    f = _first_shard(src)
    raw_safetensors(f, NESTED)
    return f.name, "nested too deeply"


def header_shape_1e30(src, secret):
    name = _tamper_header(lambda h, k: h[k].update(shape=[10**30]))(src, secret)
    return name, "do not match shape"


def header_shape_wraps_int64(src, secret):
    # 2**32 * 2**31 * 2 bytes = 2**64: zero in int64 arithmetic, which would match offsets 0..0
    f = _first_shard(src)
    edit_header(
        f, lambda h: h.update(wrap={"dtype": "BF16", "shape": [2**32, 2**31], "data_offsets": [0, 0]})
    )
    return f.name, "wrap", "do not match shape"


def header_shape_empty_but_huge(src, secret):
    # no element, so no bytes and offsets that match, but numpy cannot make an array of that shape
    f = _first_shard(src)
    edit_header(f, lambda h: h.update(huge={"dtype": "BF16", "shape": [0, 2**63], "data_offsets": [0, 0]}))
    return f.name, "huge", "too large for an array"


def header_shape_float(src, secret):
    return _tamper_header(lambda h, k: h[k].update(shape=[2.5]))(src, secret), "non-negative integers"


def header_shape_too_many_dims(src, secret):
    return _tamper_header(lambda h, k: h[k].update(shape=[1] * 100))(src, secret), "at most 32"


def header_overlap(src, secret):
    f = _first_shard(src)

    def overlap(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
        a, b = h[names[0]], h[names[1]]
        n = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + n]  # b now reads a's bytes

    edit_header(f, overlap)
    return f.name, "overlaps"


def header_trailing_bytes(src, secret):
    f = _first_shard(src)
    with open(f, "ab") as fh:
        fh.write(b"\0" * 64)
    return f.name, "belong to no tensor"


def header_metadata_not_strings(src, secret):
    f = _first_shard(src)
    edit_header(f, lambda h: h.update(__metadata__={"format": 1}))
    return f.name, "__metadata__", "format"


def header_entry_not_object(src, secret):
    return _tamper_header(lambda h, k: h.update({k: 5}))(src, secret), "not an object"


def header_dtype_list(src, secret):
    return _tamper_header(lambda h, k: h[k].update(dtype=["BF16"]))(src, secret), "unknown dtype"


def header_huge_integer(src, secret):
    f = _first_shard(src)
    header, data = read_header(f)
    raw = json.dumps(header).replace('"shape": [', '"shape": [' + "9" * 5000 + ", ", 1).encode()
    raw_safetensors(f, raw, data)
    return f.name, "corrupt safetensors header"


def header_escape_name(src, secret):
    f = min(src.glob("*.safetensors"))
    edit_header(f, lambda h: h.update({EVIL: {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}}))
    return f.name, "unexpected tensor evil\\x1b[2J\\x1b]0;pwned\\x07\\u202e"


SOURCE_CASES = {f.__name__: ("hf", f) for f in (
    index_dotdot, index_absolute, index_symlink_out, index_value_int, index_value_null, index_value_list,
    index_value_escape, index_not_object, index_nested, index_fifo_shard, single_file_fifo, single_file_device,
    single_file_folder, config_fifo, config_symlink_out, config_too_large, config_nested, config_duplicate_key,
    generation_config_nested, header_nested, header_shape_1e30, header_shape_wraps_int64,
    header_shape_empty_but_huge, header_shape_float, header_shape_too_many_dims, header_overlap, header_trailing_bytes, header_metadata_not_strings,
    header_entry_not_object, header_dtype_list, header_huge_integer)}  # fmt: skip
SOURCE_CASES.update({f.__name__: ("original", f) for f in (original_extra_fifo, header_escape_name)})


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_bad_source(case, request, secret):
    layout, build = SOURCE_CASES[case]
    src = request.getfixturevalue("hf" if layout == "hf" else "orig")
    needles = build(src, secret)
    t0 = time.perf_counter()
    with deadline(), pytest.raises(CheckpointError) as e:
        open_source(src).rules()  # rules(): the tensors checked against the config
    assert time.perf_counter() - t0 < 5
    assert_api_error(e, *needles)


def test_hugging_face_cache_snapshot_is_accepted(tmp_path, hf_ckpt):
    """The cache's snapshots link every file to ../../blobs/<hash>: outside the snapshot, but its own."""
    repo = tmp_path / "models--openai--gpt-oss-tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in hf_ckpt.iterdir() if p.is_file())):
        blob = repo / "blobs" / f"hash{i}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    src = open_source(snap)
    assert src.layout == "hf" and len(src.available()) == len(open_source(hf_ckpt).available())
    # a link out of the repo is still refused
    (snap / "generation_config.json").unlink()
    (snap / "generation_config.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        open_source(snap)
    assert_api_error(e, "generation_config.json", "links outside")


# ----------------------------------------------------------------------------------------- configs
NAN = float("nan")
CONFIG_CASES = {
    "layers_10e7": ({"num_hidden_layers": 10**7}, "num_hidden_layers"),
    "layers_10e5": ({"num_hidden_layers": 10**5}, "num_hidden_layers"),
    "layers_zero": ({"num_hidden_layers": 0}, "num_hidden_layers"),
    "layers_bool": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "layers_string": ({"num_hidden_layers": "4"}, "num_hidden_layers", "'4'"),
    "vocab_too_large": ({"vocab_size": 2**23}, "vocab_size"),
    "hidden_too_large": ({"hidden_size": 65536 + 32}, "hidden_size"),
    "zero_heads": ({"num_attention_heads": 0}, "num_attention_heads"),
    "zero_heads_no_head_dim": ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads"),
    "zero_kv_heads": ({"num_key_value_heads": 0}, "num_key_value_heads"),
    "experts_zero": ({"num_local_experts": 0}, "num_experts"),
    "head_dim_odd": ({"head_dim": 15}, "head_dim"),
    "rope_scaling_string": ({"rope_scaling": "yarn"}, "rope_scaling"),
    "rope_scaling_list": ({"rope_scaling": [1, 2]}, "rope_scaling"),
    "initial_context_string": ({"initial_context_length": "4096"}, "initial_context_length"),
    "max_position_string": ({"max_position_embeddings": "131072"}, "max_position_embeddings"),
    "max_position_negative": ({"max_position_embeddings": -1}, "max_position_embeddings"),
    "swiglu_limit_string": ({"swiglu_limit": "7.0"}, "swiglu_limit"),
    "rms_norm_eps_string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "rope_theta_nan": ({"rope_theta": NAN}, "rope_theta", "nan"),
    "rope_theta_one": ({"rope_theta": 1}, "rope_theta"),
    "rope_theta_huge_int": ({"rope_theta": 10**400}, "rope_theta"),
    "rope_factor_inf": (
        {"rope_scaling": {"rope_type": "yarn", "factor": math.inf}},
        "rope_scaling_factor",
        "inf",
    ),
    "swiglu_limit_nan": ({"swiglu_limit": NAN}, "swiglu_limit"),
    "rms_norm_eps_inf": ({"rms_norm_eps": math.inf}, "rms_norm_eps"),
    "rope_beta_zero": (
        {"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 0}},
        "rope_ntk_beta",
    ),
    "sliding_window_zero": ({"sliding_window": 0}, "sliding_window"),
    "sliding_window_float": ({"sliding_window": 128.5}, "sliding_window"),
    "sliding_window_beyond_context": ({"sliding_window": 10**7}, "sliding_window"),
    "layer_types_short": ({"layer_types": ["full_attention"]}, "layer_types"),
    "layer_types_numbers": ({"layer_types": [1, 2, 3, 4]}, "layer_type"),
    "layer_types_string": ({"layer_types": "sliding_attention"}, "layer_types"),
    "eos_object": ({"eos_token_id": {"a": 1}}, "eos_token_id"),
    "model_type_escape": ({"model_type": EVIL}, "model_type", "\\x1b"),
    "not_an_object": (None, "not an object"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case, hf):
    change, *needles = CONFIG_CASES[case]
    if change is None:
        (hf / "config.json").write_text("[1, 2]")
    else:
        edit_json(hf / "config.json", lambda d: d.update(change))
    t0 = time.perf_counter()
    with deadline(), pytest.raises(CheckpointError) as e:
        open_source(hf)
    assert time.perf_counter() - t0 < 1  # 10**7 layers: refused before any table is sized from it
    assert_api_error(e, "config.json", *needles)


@pytest.mark.parametrize("change", [{"num_hidden_layers": "24"}, {"rope_theta": NAN}, {"sliding_window": 0}])
def test_bad_original_config(orig, change):
    edit_json(orig / "config.json", lambda d: d.update(change))
    with pytest.raises(CheckpointError) as e:
        open_source(orig)
    assert_api_error(e, "config.json", next(iter(change)))


def test_config_api_values_without_a_repr():
    from gptoss_jax.config import Config

    with pytest.raises(ValueError, match="num_hidden_layers .* got an integer of 16610 bits"):
        Config.tiny(num_hidden_layers=10**5000)


def test_config_validation_is_linear_in_layers():
    """1024 layers (the cap) validate in milliseconds, and the model-facing table is built once."""
    from gptoss_jax.config import Config

    t0 = time.perf_counter()
    cfg = Config.tiny(num_hidden_layers=1024, layer_types=["sliding_attention", "full_attention"] * 512)
    assert time.perf_counter() - t0 < 0.1
    assert cfg.sliding_layers is cfg.sliding_layers and len(cfg.sliding_layers) == 1024


# ----------------------------------------------------------------------------------------- weights
def _poison(src, name, value):
    f = shard_holding(src, name)
    header, data = read_header(f)
    b, e = header[name]["data_offsets"]
    dt = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}[header[name]["dtype"]]
    arr = np.frombuffer(data[b:e], dtype=dt).copy()
    arr[3] = value
    raw_safetensors(f, header, data[:b] + arr.tobytes() + data[e:])
    return f.name


@pytest.mark.parametrize("name,value", [("model.embed_tokens.weight", np.nan), ("model.layers.1.self_attn.sinks", np.inf),
                                        ("model.layers.3.mlp.experts.down_proj_bias", -np.inf)])  # fmt: skip
def test_nonfinite_weight_refused_while_converting(tmp_path, hf, name, value):
    from conversion.convert import Options, convert

    fname = _poison(hf, name, value)
    with deadline(), pytest.raises(CheckpointError) as e:
        convert(hf, tmp_path / "out", Options(group_mib=0.05), quiet=True)
    assert_api_error(e, fname, name, "NaN or Inf", "the first at index")
    nothing_left(tmp_path, "src")


def test_nonfinite_weight_allowed_with_a_warning(tmp_path, hf):
    from conversion.convert import Options, convert

    fname = _poison(hf, "model.layers.0.self_attn.q_proj.bias", np.nan)
    said = []
    convert(hf, tmp_path / "out", Options(allow_nonfinite=True), quiet=True, log=said.append)
    warnings = [m for m in said if m.startswith("warning:")]
    assert len(warnings) == 1 and fname in warnings[0] and "q_proj.bias" in warnings[0], said


def test_nonfinite_weight_refused_by_load(hf):
    import gptoss_jax

    fname = _poison(hf, "model.norm.weight", np.inf)
    with pytest.raises(CheckpointError) as e:
        gptoss_jax.load(hf, quiet=True)
    assert_api_error(e, fname, "model.norm.weight", "NaN or Inf")


def test_check_finite_reports_count_and_first_index():
    from gptoss_jax.checkpoint.keys import check_finite

    for dt in (np.float32, np.float16, ml_dtypes.bfloat16):
        a = np.zeros((3, 5), dtype=dt)
        check_finite(a)
        a[1, 2], a[2, 4] = np.nan, -np.inf
        with pytest.raises(ValueError, match=r"2 NaN or Inf value\(s\), the first at index \(1, 2\)"):
            check_finite(a)
    big = np.ones(3 << 22, dtype=ml_dtypes.bfloat16)  # several chunks
    big[-1] = np.inf
    with pytest.raises(ValueError, match=f"index \\({big.size - 1},\\)"):
        check_finite(big)


def test_tokenizer_token_ids_and_decode():
    from gptoss_jax import tokenizer

    for text in ("²", "1 ²", "٣", "-1", "9" * 5000, "201088", ""):
        with pytest.raises(ValueError):
            tokenizer.parse_token_ids(text)
    assert tokenizer.parse_token_ids("1, 2 3") == [1, 2, 3]
    for bad in (300000, -1, 2**70):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tokenizer.decode([bad])
