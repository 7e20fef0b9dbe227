"""Property-based tests of the two parsers every download goes through: the safetensors header parser and
the config validator. Whatever they are given, they raise nothing but our error type, and nothing they
allocate is sized by what a file claims, only by the file itself."""

from __future__ import annotations

import json
import math
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from gptoss_jax.checkpoint import CheckpointError, keys
from gptoss_jax.checkpoint.safetensors import DTYPES, MAX_DIMS, SafetensorsFile, parse_header
from gptoss_jax.config import Config

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values of every kind, the numbers chosen to hit the edges: negative, huge, past int64, non-finite
numbers = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2**31, 2**63, 2**64, 10**30, -1]),
                    st.floats(allow_nan=True, allow_infinity=True))  # fmt: skip
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_values = st.recursive(scalars, lambda v: st.one_of(st.lists(v, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), v, max_size=4)),
                           max_leaves=12)  # fmt: skip


# ------------------------------------------------------------------------------------- safetensors
@st.composite
def headers(draw):
    """A valid header (tensors tiling the data section, in any order), then up to two things made wrong:
    a dtype, a shape (huge, negative, float, past int64), offsets (shifted, overlapping, garbage), a whole
    entry, the data section's size, or `__metadata__`."""
    header, pos = {}, 0
    for i in range(draw(st.integers(0, 5))):
        dt = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        size = DTYPES[dt].itemsize * math.prod(shape)
        header[f"{draw(st.text(max_size=8))}#{i}"] = {
            "dtype": dt,
            "shape": shape,
            "data_offsets": [pos, pos + size],
        }
        pos += size
    names = draw(st.permutations(sorted(header)))
    header, data_size = {k: header[k] for k in names}, pos
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    clean = list(names)  # entries still well-formed: the ones a mutation may edit
    for _ in range(draw(st.integers(0, 2))):
        what = draw(
            st.sampled_from(["dtype", "shape", "dim", "offsets", "shift", "overlap", "entry", "size", "meta"])
        )
        name = draw(st.sampled_from(clean)) if clean else None
        e = header.get(name)
        if what == "size" or name is None:
            data_size += draw(st.integers(-3, 3))
        elif what == "meta":
            header["__metadata__"] = draw(
                st.dictionaries(st.text(max_size=5), json_values, max_size=3) | json_values
            )
        elif what == "dtype":
            e["dtype"] = draw(st.sampled_from(["F4", "bf16", "", "F8_E8M0"]) | json_values)
        elif what == "shape":
            e["shape"] = draw(st.lists(numbers | scalars, max_size=3) | json_values)
        elif what == "dim":
            e["shape"] = [*e["shape"], draw(st.sampled_from([2**32, 2**63, 2**64, 10**30, -1, 0, 1]))]
        elif what == "offsets":
            e["data_offsets"] = draw(st.lists(numbers, max_size=3) | json_values)
        elif what == "shift":
            d = draw(st.integers(-2, 2))
            e["data_offsets"] = [e["data_offsets"][0] + d, e["data_offsets"][1] + d]
        elif what == "overlap" and len(clean) > 1:
            other = header[draw(st.sampled_from([n for n in clean if n != name]))]
            header[name] = json.loads(json.dumps(other))  # the same bytes claimed twice
        elif what == "entry":
            header[name] = draw(json_values)
        if name is not None and what in ("shape", "dim", "offsets", "entry"):
            clean.remove(name)
    return header, data_size


def _check_parsed(entries, data_size):
    """A parsed header tiles the data section exactly, with byte sizes that match dtype and shape."""
    spans = sorted((b, e) for _, _, b, e in entries.values())
    pos = 0
    for b, e in spans:
        assert b == pos and e >= b
        pos = e
    assert pos == data_size
    for dt, shape, b, e in entries.values():
        assert len(shape) <= MAX_DIMS and e - b == dt.itemsize * math.prod(shape)


@SETTINGS
@given(headers())
def test_header_parser_structured(case):
    header, data_size = case
    raw = json.dumps(header, allow_nan=True).encode()
    tracemalloc.start()
    try:
        entries, meta = parse_header(raw, data_size, "f.safetensors")
    except CheckpointError as e:
        assert "\n" not in str(e) and str(e).startswith("f.safetensors: ")
        event("refused")
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 * len(raw) + (1 << 20)  # parsing costs a multiple of the header, never what it declares
    _check_parsed(entries, data_size)
    event(f"accepted, {len(entries)} tensors")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


@SETTINGS
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
       st.integers(0, 2**64))  # fmt: skip
def test_header_parser_arbitrary_bytes(raw, data_size):
    try:
        entries, _ = parse_header(raw, data_size, "f.safetensors")
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    _check_parsed(entries, data_size)


@SETTINGS
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1), headers())
def test_safetensors_file_never_reads_past_the_file(tmp_path_factory, data, length, case):
    """Whole files: garbage, an arbitrary header length, or a structured header over random data. Opening
    raises CheckpointError or gives tensors that are views into the file (their bytes add up to at most
    the file's size: nothing is allocated from a declared shape)."""
    header, data_size = case
    raw = json.dumps(header, allow_nan=True).encode()
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    section = bytes(min(max(data_size, 0), 4096))  # the header may claim more: that is the point
    for blob in (data, struct.pack("<Q", length) + data, struct.pack("<Q", len(raw)) + raw + section):
        path.write_bytes(blob)
        try:
            f = SafetensorsFile(path)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            continue
        arrays = [f.get(n) for n in f.entries]
        assert sum(a.nbytes for a in arrays) <= len(blob)
        assert all(a.base is not None for a in arrays)  # views on the map, not copies
        f.close()


# ----------------------------------------------------------------------------------------- configs
BASE_HF = Config.tiny(
    vocab_size=1000, sliding_window=8, pad_token_id=999, eos_token_ids=(998,)
).to_hf_config()
HF_FIELDS = sorted(k for k in BASE_HF if k != "quantization_config")


@st.composite
def hf_configs(draw):
    """The tiny model's config.json with a few fields replaced by anything JSON can hold, or removed."""
    d = json.loads(json.dumps(BASE_HF))
    for k in draw(st.lists(st.sampled_from(HF_FIELDS), min_size=1, max_size=4, unique=True)):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            d.pop(k)
        elif choice == 1 and isinstance(d[k], (int, float)) and not isinstance(d[k], bool):
            d[k] = draw(st.sampled_from([0, -1, 2**40, 10**400, d[k] * 2, d[k] + 1, d[k] / 3, float("nan"),
                                         float("inf"), str(d[k]), True]))  # fmt: skip
        else:
            d[k] = draw(json_values)
    return d


def _invariants(cfg: Config):
    """An accepted config is one a model can be sized from, cheaply."""
    assert 1 <= cfg.num_hidden_layers <= 1024 and 1 <= cfg.vocab_size <= 1 << 22
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0 and cfg.head_dim % 2 == 0
    assert 0 <= cfg.sliding_window <= cfg.context_length
    assert not any(cfg.sliding_layers) or cfg.sliding_window > 0
    for name in ("rope_theta", "rope_scaling_factor", "swiglu_limit", "rms_norm_eps", "rope_ntk_alpha"):
        assert math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0
    assert len(keys.rules(cfg, "hf")) == 3 + 19 * cfg.num_hidden_layers


@SETTINGS
@given(hf_configs())
def test_config_validator_hf(d):
    try:
        cfg = Config.from_hf_config(d)
    except ValueError as e:
        assert type(e) is ValueError and "\n" not in str(e)
        event("refused")
        return
    event("accepted")
    _invariants(cfg)


@SETTINGS
@given(st.dictionaries(st.sampled_from([*Config.tiny().to_original_config(), "rms_norm_eps"]), json_values))
def test_config_validator_original(override):
    d = Config.tiny().to_original_config() | override
    try:
        cfg = Config.from_original_config(d)
    except ValueError as e:
        assert type(e) is ValueError and "\n" not in str(e)
        return
    _invariants(cfg)


@SETTINGS
@given(json_values)
def test_config_validator_not_an_object(d):
    assume(not isinstance(d, dict))
    for build in (Config.from_hf_config, Config.from_original_config):
        with pytest.raises(ValueError):
            build(d)
