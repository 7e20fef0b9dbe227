"""Conversion round trips on tiny synthetic checkpoints in both released layouts.

The converted Orbax checkpoint must give the same logits as the source folder (packed and dequantized
experts), hold exactly the source tensors in our layout (plain Orbax restore), carry the config and
generation metadata, and restore onto meshes of several shapes straight into the model's shardings.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from convtools import gptoss_metadata, orbax_arrays, same_bytes

import gptoss_jax
from conversion import cli
from conversion.convert import Options, UsageError, VerifyError, convert, plan, verify_checkpoint
from gptoss_jax.checkpoint.source import open_source
from gptoss_jax.checkpoint.synthetic import write_checkpoint

TOKENS = jnp.asarray((np.arange(20) * 37 + 5) % 1000, dtype=jnp.int32)[None]  # longer than the window (8)
_logits_cache: dict = {}


def logits(path, expert_format: str) -> np.ndarray:
    key = (str(path), expert_format)
    if key not in _logits_cache:
        model = gptoss_jax.load(path, dtype="float32", expert_format=expert_format, quiet=True)
        _logits_cache[key] = np.asarray(model(TOKENS))
    return _logits_cache[key]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, hf_ckpt, original_ckpt):
    """(layout, expert format) -> converted checkpoint folder, made on first use."""
    made = {}

    def get(layout: str, fmt: str):
        if (layout, fmt) not in made:
            src = hf_ckpt if layout == "hf" else original_ckpt
            dst = tmp_path_factory.mktemp("out") / f"{layout}-{fmt}"
            res = convert(src, dst, Options(expert_format=fmt), quiet=True)
            assert res.layout == layout and res.dst == dst and dst.is_dir()
            made[layout, fmt] = dst
        return made[layout, fmt]

    return get


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("fmt", ["mxfp4", "dequantized"])
def test_logits_match_source(converted, hf_ckpt, original_ckpt, layout, fmt):
    dst = converted(layout, fmt)
    src = hf_ckpt if layout == "hf" else original_ckpt
    want = logits(src, fmt)
    assert np.isfinite(want).all() and want.std() > 0
    np.testing.assert_array_equal(logits(dst, fmt), want)


def test_packed_checkpoint_loads_dequantized(converted, hf_ckpt):
    np.testing.assert_array_equal(
        logits(converted("hf", "mxfp4"), "dequantized"), logits(hf_ckpt, "dequantized")
    )


def test_dequantized_checkpoint_refuses_packed_load(converted):
    with pytest.raises(ValueError, match="dequantized"):
        gptoss_jax.load(converted("hf", "dequantized"), expert_format="mxfp4")


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_plain_orbax_restore_holds_source_tensors(converted, hf_ckpt, original_ckpt, layout):
    """A plain Orbax restore (no gptoss_jax) gives every parameter in our layout, bit for bit."""
    dst = converted(layout, "mxfp4")
    got = orbax_arrays(dst)
    src = open_source(hf_ckpt if layout == "hf" else original_ckpt)
    _, items = plan(src, Options())
    assert sorted(got) == sorted(r.target for r, _, _ in items)
    for rule, spec, _ in items:
        assert same_bytes(got[rule.target], np.asarray(src.read(rule)).astype(spec.dtype)), rule.target
    assert got["layers.0.mlp.mlp1_blocks"].dtype == np.uint8  # experts stayed packed
    assert got["layers.0.attn.sinks"].dtype == np.float32


def test_metadata(converted, tiny_cfg, hf_ckpt):
    from gptoss_jax.checkpoint.orbax import read_metadata, stored_config

    dst = converted("hf", "mxfp4")
    meta = gptoss_metadata(dst)
    assert meta == read_metadata(dst)
    assert meta["expert_format"] == "mxfp4" and meta["dtype"] == "bfloat16"
    src_cfg = open_source(hf_ckpt).config
    assert meta["config"] == src_cfg.architecture_dict()
    assert stored_config(meta) == src_cfg.replace(expert_format="mxfp4", dtype="bfloat16")
    assert meta["config"]["hidden_size"] == tiny_cfg.hidden_size and meta["config"]["num_experts"] == 5
    assert meta["generation_config"]["eos_token_id"] == [200002, 199999, 200012]
    assert meta["source"]["layout"] == "hf"
    assert gptoss_metadata(converted("original", "dequantized"))["generation_config"] is None


def test_float32_dequantized_option(tmp_path, hf_ckpt):
    dst = tmp_path / "f32"
    convert(hf_ckpt, dst, Options(expert_format="dequantized", dtype="float32"), quiet=True)
    arrays = orbax_arrays(dst)
    assert arrays["embedding"].dtype == np.float32
    assert arrays["layers.1.mlp.mlp2_weight"].dtype == np.float32
    assert "layers.1.mlp.mlp2_blocks" not in arrays
    np.testing.assert_array_equal(logits(dst, "dequantized"), logits(hf_ckpt, "dequantized"))


@pytest.mark.parametrize("spec", ["expert=4,model=2", "data=2,expert=2,model=2", "model=8", "data=8"])
def test_restore_onto_meshes(converted, tiny_cfg, spec):
    """Each array arrives in param_sharding's layout for any mesh, with the same values as on one device."""
    from flax import nnx

    from gptoss_jax.sharding import make_mesh, param_sharding
    from gptoss_jax.weights import param_specs

    dst = converted("hf", "mxfp4")
    mesh = make_mesh(spec)
    sharded = gptoss_jax.load(dst, mesh=mesh, dtype="float32", quiet=True)
    single = gptoss_jax.load(dst, dtype="float32", quiet=True)
    a = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(sharded))}
    b = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(single))}
    assert sorted(a) == sorted(b) == sorted(param_specs(tiny_cfg))
    split = 0
    for name, arr in a.items():
        want = param_sharding(name, arr.shape, mesh, tiny_cfg.replace(dtype="float32"))
        assert arr.sharding.is_equivalent_to(want, arr.ndim), name
        for shard in arr.addressable_shards:  # each device holds only its piece
            assert shard.data.shape == want.shard_shape(arr.shape), name
        split += want.shard_shape(arr.shape) != arr.shape
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(b[name]), err_msg=name)
    assert (split > 0) == ("model" in spec or "expert" in spec)  # params split unless the mesh is data-only


def test_verify_passes_and_detects_difference(tmp_path, hf_ckpt, tiny_cfg):
    dst = tmp_path / "v"
    res = convert(hf_ckpt, dst, Options(expert_format="dequantized"), verify=True, quiet=True)
    assert res.verified
    other = write_checkpoint(tmp_path / "other", tiny_cfg, layout="hf", seed=7)  # same shapes, other values
    src = open_source(other)
    _, items = plan(src, Options(expert_format="dequantized"))
    with pytest.raises(VerifyError, match="differs"):
        verify_checkpoint(src, items, dst, Options(expert_format="dequantized"), quiet=True)


def test_cli_progress_quiet_and_layout_note(tmp_path, capsys, tiny_cfg):
    repo = write_checkpoint(tmp_path / "repo", tiny_cfg, layout="both", seed=3)
    assert cli.main([str(repo), str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "holds both layouts; using the Hugging Face top-level files" in err
    assert "converting" in err and "B/s" in err and "wrote" in err  # tqdm bar: bytes, rate
    assert cli.main([str(repo / "original"), str(tmp_path / "b"), "--quiet", "--verify"]) == 0
    assert capsys.readouterr().err == ""
    # a repo folder with only original/ inside: that layout is found and named
    (tmp_path / "only").mkdir()
    (repo / "original").rename(tmp_path / "only" / "original")
    assert cli.main([str(tmp_path / "only"), str(tmp_path / "c")]) == 0
    assert "using the original/ layout" in capsys.readouterr().err
    a, b, c = (orbax_arrays(tmp_path / x) for x in "abc")
    for k in a:
        assert same_bytes(a[k], b[k]) and same_bytes(a[k], c[k]), k


def test_existing_destination_is_refused(tmp_path, hf_ckpt, capsys):
    (tmp_path / "out").mkdir()
    assert cli.main([str(hf_ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and len(err.splitlines()) == 1
    with pytest.raises(UsageError):
        convert(hf_ckpt, tmp_path / "out", quiet=True)


def test_different_unfinished_conversion_is_refused(tmp_path, hf_ckpt, original_ckpt):
    work = tmp_path / "out.converting"
    work.mkdir()
    (work / "journal.json").write_text('{"source": {"root": "elsewhere"}, "options": {}, "dst": "x"}')
    with pytest.raises(UsageError, match="unfinished conversion"):
        convert(hf_ckpt, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_packed_checkpoint_dequantized_onto_mesh(converted, tiny_cfg):
    """Packed on disk, dequantized on device under a mesh: the dequantized experts land in their sharding."""
    from gptoss_jax.sharding import make_mesh, param_sharding

    dst = converted("hf", "mxfp4")
    mesh = make_mesh("expert=2,model=4")
    sharded = gptoss_jax.load(dst, mesh=mesh, dtype="float32", expert_format="dequantized", quiet=True)
    single = gptoss_jax.load(dst, dtype="float32", expert_format="dequantized", quiet=True)
    cfg = tiny_cfg.replace(dtype="float32", expert_format="dequantized")
    for j in range(len(cfg.layer_unit)):
        for which in ("mlp1", "mlp2"):
            arr = getattr(sharded.blocks[j].mlp, f"{which}_weight").get_value()
            want = param_sharding(f"blocks.{j}.mlp.{which}_weight", arr.shape, mesh, cfg)
            assert arr.sharding.is_equivalent_to(want, arr.ndim)
            ref = getattr(single.blocks[j].mlp, f"{which}_weight").get_value()
            np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref))
