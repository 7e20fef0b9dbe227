"""Mesh sharding on 8 fake CPU devices (conftest sets the device count): the rule table, expert / tensor /
data parallel runs equal to one device, the KV cache layout, and `gptoss-jax info`'s memory plan.

Two tiny checkpoints, read by the real loader: one whose sizes divide every mesh axis used (8 experts,
expert width 4 MXFP4 groups, 2 kv heads, vocabulary 1000) and the conftest sizes (5 experts, width 3
groups), where the expert tensors cannot split over expert=4 / model=2 and must fall back to replication.
Two layers (one sliding, one full) and prompts longer than the window (8) keep the runs short.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import numpy as np
import pytest
from conftest import make_tiny_cfg

import gptoss_jax
from gptoss_jax import memory, sharding
from gptoss_jax.cache import KVCache, cache_bytes
from gptoss_jax.config import Config
from gptoss_jax.weights import axes_of, param_specs, storage_specs

CFG8 = make_tiny_cfg(num_hidden_layers=2, num_experts=8, experts_per_token=3, intermediate_size=128)
CFG5 = make_tiny_cfg(num_hidden_layers=2)  # 5 experts, width 96 = 3 groups of 32
PROMPTS = np.random.default_rng(7).integers(0, 1000, (2, 13))  # 2 rows over data=2, 13 tokens > window 8
NEW = 5


def _norm(spec, ndim) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def _params(model) -> dict[str, jax.Array]:
    from flax import nnx

    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _rule_spec(name, shape, mesh_shape, cfg) -> tuple:
    """What the rule table says, computed here directly: a dimension goes on its rule's mesh axis when that
    axis is larger than 1 and the axis' logical size divides (the tensors of an expert split at whole
    MXFP4 groups of its width F, so the logical size of `expert_ffw` is F/32 for every expert tensor)."""
    logical = {"expert": cfg.num_experts, "expert_ffw": cfg.intermediate_size // 32,
               "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size}  # fmt: skip
    rules = dict(sharding.RULES)
    e, m = mesh_shape.get("expert", 1), mesh_shape.get("model", 1)
    if m > 1 and logical["expert_ffw"] % m and cfg.num_experts % (e * m) == 0:
        rules.update(expert=("expert", "model"), expert_ffw=None)  # experts take model instead of their width
    out = []
    for ax, dim in zip(axes_of(name), shape, strict=True):
        live = tuple(a for a in ((rules[ax],) if isinstance(rules[ax], str) else rules[ax] or ())
                     if mesh_shape.get(a, 1) > 1)  # fmt: skip
        size = math.prod(mesh_shape[a] for a in live)
        ok = size > 1 and logical.get(ax, dim) % size == 0 and dim % size == 0
        out.append((live[0] if len(live) == 1 else live) if ok else None)
    return tuple(out)


@pytest.fixture(scope="module")
def ckpt8(tmp_path_factory):
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("shard") / "e8", CFG8, layout="hf", seed=3)


@pytest.fixture(scope="module")
def ckpt5(tmp_path_factory):
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("shard") / "e5", CFG5, layout="hf", seed=4)


@pytest.fixture(scope="module")
def ref8(ckpt8):
    m = gptoss_jax.load(ckpt8, dtype="float32", quiet=True)
    return np.asarray(m(PROMPTS)), gptoss_jax.generate(m, PROMPTS, max_new_tokens=NEW)


# ------------------------------------------------------------------------------------------ rule table
def test_parse_mesh():
    assert sharding.parse_mesh("data=1,expert=4,model=2") == {"data": 1, "expert": 4, "model": 2}
    assert sharding.parse_mesh(" model=8 ") == {"data": 1, "expert": 1, "model": 8}
    for bad in ("", "expert=0", "experts=4", "model=2,model=2", "model", "data=x"):
        with pytest.raises(ValueError, match="mesh spec"):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match="needs 16 devices, found 8"):
        sharding.make_mesh("expert=4,model=4")


def test_collisions_raise():
    rules = dict(sharding.RULES, embed_groups="model")  # mlp1_blocks would put expert_ffw and D/32 on model
    with pytest.raises(ValueError, match="collision.*'expert_ffw' and 'embed_groups'.*'model'"):
        sharding.param_spec("layers.0.mlp.mlp1_blocks", (8, 256, 2, 16), {"model": 2}, CFG8, rules)
    # a collision is a property of the rules, not of the sizes: it raises on a one-device mesh too
    with pytest.raises(ValueError, match="collision"):
        sharding.param_spec("layers.0.mlp.mlp1_blocks", (8, 256, 2, 16), {}, CFG8, rules)
    with pytest.raises(ValueError, match="not a mesh axis"):
        sharding.check_rules({"vocab": "tensor"})
    with pytest.raises(ValueError, match="no logical axes known"):
        axes_of("layers.0.attn.unknown")


@pytest.mark.parametrize("expert_format", ["mxfp4", "dequantized"])
def test_every_parameter_has_logical_axes(expert_format):
    cfg = CFG8.replace(expert_format=expert_format)
    for name, spec in param_specs(cfg).items():
        assert len(axes_of(name, spec.ndim)) == spec.ndim


def test_rule_table_by_hand():
    """The layout on expert=4, model=2, written out."""
    ms = {"data": 1, "expert": 4, "model": 2}
    want = {
        "embedding": ("model", None),
        "unembedding": ("model", None),
        "norm.scale": (None,),
        "layers.0.attn.q_weight": (None, "model", None, None),
        "layers.0.attn.k_bias": ("model", None),
        "layers.0.attn.o_weight": ("model", None, None, None),
        "layers.0.attn.sinks": ("model", None),
        "layers.0.mlp.gate_weight": (None, None),
        "layers.0.mlp.mlp1_blocks": ("expert", "model", None, None),
        "layers.0.mlp.mlp1_scales": ("expert", "model", None),
        "layers.0.mlp.mlp1_bias": ("expert", "model"),
        "layers.0.mlp.mlp2_blocks": ("expert", None, "model", None),
        "layers.0.mlp.mlp2_scales": ("expert", None, "model"),
        "layers.0.mlp.mlp2_bias": ("expert", None),
        "blocks.1.mlp.mlp1_blocks": (None, "expert", "model", None, None),  # stacked layers: never split
    }
    specs = storage_specs(CFG8) | param_specs(CFG8)
    for name, axes in want.items():
        assert _norm(sharding.param_spec(name, specs[name].shape, ms, CFG8), len(axes)) == axes, name
    # model=8 cannot split a width of 4 groups: the 8 experts spread over model instead, each whole
    for name, axes in (("layers.1.mlp.mlp1_blocks", ("model", None, None, None)),
                       ("layers.1.mlp.mlp2_scales", ("model", None, None)),
                       ("layers.1.mlp.mlp1_bias", ("model", None)), ("embedding", ("model", None))):  # fmt: skip
        got = sharding.param_spec(name, specs[name].shape, {"model": 8}, CFG8)
        assert _norm(got, len(axes)) == axes, name
    cfg16 = make_tiny_cfg(num_experts=16)  # width 3 groups: model=4 cannot split it, 16 experts take it
    shape = storage_specs(cfg16)["layers.1.mlp.mlp2_blocks"].shape
    got = sharding.param_spec("layers.1.mlp.mlp2_blocks", shape, {"expert": 2, "model": 4}, cfg16)
    assert _norm(got, 4) == (("expert", "model"), None, None, None)
    # 5 experts on expert=4 and 3 groups of width on model=2 do not divide: the experts stay whole
    specs5 = storage_specs(CFG5)
    for leaf in ("mlp1_blocks", "mlp2_scales", "mlp1_bias", "mlp2_bias"):
        name = f"layers.1.mlp.{leaf}"
        assert set(sharding.param_spec(name, specs5[name].shape, ms, CFG5)) <= {None}, name


def test_activation_constraints_and_cache_layout():
    mesh = sharding.make_mesh("data=2,expert=2,model=2")
    with jax.set_mesh(mesh):
        cache = KVCache.create(CFG8, 2, 24)
        x = jax.jit(lambda a: sharding.constrain(a, ("batch", "seq", "embed")))(
            np.zeros((2, 5, 64), np.float32)
        )
    assert _norm(x.sharding.spec, 3) == ("data", None, None)
    for buf in cache.k + cache.v:  # (repeats, batch, slots, kv heads, head dim)
        assert _norm(buf.sharding.spec, 5) == (None, "data", None, "model", None)
    assert cache.k[0].shape[2] == CFG8.sliding_window and cache.k[1].shape[2] == 24  # ring, then full
    for pos in (cache.full_pos, cache.ring_pos):
        assert _norm(pos.sharding.spec, 2) == ("data", None)
    assert sharding.constrain(np.zeros(3), ("batch",)).shape == (3,)  # no mesh: identity


def test_expert_parallel_is_local(ckpt8):
    """Inside the shard_map each device sees only its E/e experts (and its slice of their width); the
    partial outputs are combined by one psum over (expert, model)."""
    from gptoss_jax.moe import EXPERT_LEAVES, moe_experts

    mesh = sharding.make_mesh("data=1,expert=4,model=2")
    m = gptoss_jax.load(ckpt8, dtype="float32", mesh=mesh, quiet=True)
    mlp = m.blocks[0].mlp
    p = {n: getattr(mlp, n)[...][0] for n in EXPERT_LEAVES if hasattr(mlp, n)}  # layer 0's experts
    x = np.ones((6, 64), np.float32)
    idx = np.tile(np.arange(3, dtype=np.int32), (6, 1))
    w = np.full((6, 3), 1 / 3, np.float32)
    with jax.set_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda x, i, w, p: moe_experts(x, i, w, p, CFG8))(x, idx, w, p)
    sm = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    assert len(sm) == 1
    body = sm[0].params["jaxpr"]
    names = sorted(p)  # pytree order of the params dict
    shapes = {n: tuple(v.aval.shape) for n, v in zip(names, body.invars[3:], strict=True)}
    assert shapes["mlp1_blocks"] == (2, 128, 2, 16)  # 8 experts / 4, 2F=256 rows / 2
    assert shapes["mlp2_blocks"] == (2, 64, 2, 16)  # F/32 = 4 groups / 2
    assert shapes["mlp2_bias"] == (2, 64)
    prims = {e.primitive.name for e in body.eqns}
    assert "psum" in prims or "psum_invariant" in prims or "psum2" in prims, prims


# ------------------------------------------------------------------------------- runs equal one device
@pytest.mark.parametrize("mesh_spec", ["data=1,expert=8,model=1", "data=1,expert=4,model=2",
                                       "data=2,expert=2,model=2", "data=1,expert=1,model=8"])  # fmt: skip
def test_mesh_equals_single_device(ckpt8, ref8, mesh_spec):
    mesh = sharding.make_mesh(mesh_spec)
    ms = dict(mesh.shape)
    m = gptoss_jax.load(ckpt8, dtype="float32", mesh=mesh, quiet=True)

    # every parameter is placed as the rule table says, and each device holds exactly that shard
    per_device = dict.fromkeys(mesh.devices.flat, 0)
    for name, arr in _params(m).items():
        want = _rule_spec(name, arr.shape, ms, CFG8)
        assert _norm(arr.sharding.spec, arr.ndim) == want, name
        local = tuple(d // math.prod(ms[x] for x in ((a,) if isinstance(a, str) else a or ()))
                      for d, a in zip(arr.shape, want, strict=True))  # fmt: skip
        for shard in arr.addressable_shards:
            assert shard.data.shape == local, name
            per_device[shard.device] += shard.data.nbytes
    # ... and the memory plan (`gptoss-jax info`) predicts those bytes on every device
    plan = memory.plan(CFG8.replace(dtype="float32"), ms, context=24, batch=2)
    assert set(per_device.values()) == {plan["weights_total"]}
    with jax.set_mesh(mesh):
        cache = KVCache.create(CFG8.replace(dtype="float32"), 2, 24)
    kv = dict.fromkeys(mesh.devices.flat, 0)
    for a in jax.tree.leaves(cache):
        for shard in a.addressable_shards:
            kv[shard.device] += shard.data.nbytes
    assert set(kv.values()) == {plan["kv_cache"]}

    logits, gen = ref8
    out = np.asarray(m(PROMPTS))
    err = np.linalg.norm(out - logits) / np.linalg.norm(logits)
    assert err < 1e-5, err
    assert gptoss_jax.generate(m, PROMPTS, max_new_tokens=NEW) == gen


def test_kernels_under_a_mesh(ckpt8, ref8):
    """The Pallas kernels (interpret mode on CPU) inside the shard_maps: attention per (batch, kv-head)
    shard, experts per (expert, width) shard."""
    mesh = sharding.make_mesh("data=2,expert=2,model=2")
    m = gptoss_jax.load(
        ckpt8, dtype="float32", mesh=mesh, quiet=True, attention_impl="pallas", moe_impl="pallas"
    )
    out = np.asarray(m(PROMPTS))
    assert np.linalg.norm(out - ref8[0]) / np.linalg.norm(ref8[0]) < 1e-5


def test_replication_fallback_equals_single_device(ckpt5):
    """5 experts on expert=4 and a batch of 1 on data=2: both dimensions stay whole, results unchanged."""
    ref = gptoss_jax.load(ckpt5, dtype="float32", quiet=True)
    mesh = sharding.make_mesh("data=2,expert=4,model=1")
    m = gptoss_jax.load(ckpt5, dtype="float32", mesh=mesh, quiet=True)
    for name, arr in _params(m).items():
        assert _norm(arr.sharding.spec, arr.ndim) == _rule_spec(name, arr.shape, dict(mesh.shape), CFG5), name
        assert arr.sharding.is_fully_replicated, name  # model=1 and the experts cannot split
    row = PROMPTS[:1]
    want = np.asarray(ref(row))
    out = np.asarray(m(row))
    assert np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-5
    assert gptoss_jax.generate(m, row, max_new_tokens=NEW) == gptoss_jax.generate(ref, row, max_new_tokens=NEW)


# -------------------------------------------------------------------------------------------- planning
def _expert_bytes(cfg: Config) -> int:
    """Packed experts of all layers, from the format: per expert mlp1 2F x D and mlp2 D x F at half a
    byte per weight plus one scale byte per 32 weights, and bf16 biases 2F + D."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    per_expert = (2 * F * D + D * F) // 2 + (2 * F * D + D * F) // 32 + 2 * (2 * F + D)
    return cfg.num_hidden_layers * cfg.num_experts * per_expert


def test_plan_matches_parameter_counts():
    from gptoss_jax.weights import param_bytes, param_count

    cfg = Config.gpt_oss_20b()
    one = memory.plan(cfg, {}, context=4096)
    assert one["params"] == param_count(cfg)
    assert one["weights_total"] == one["weights_one_copy"] == param_bytes(cfg) == one["weights_all_devices"]
    assert one["weights"]["experts"] == _expert_bytes(cfg)
    assert one["kv_cache"] == cache_bytes(cfg, 1, 4096)
    assert round(one["params"] / 1e9, 3) == 20.915

    big = Config.gpt_oss_120b()
    p = memory.plan(big, {"expert": 8}, context=8192)
    assert round(p["params"] / 1e9, 3) == 116.829
    experts = _expert_bytes(big)
    rest = p["weights_one_copy"] - experts
    assert p["weights"]["experts"] * 8 == experts  # 128 experts over 8 devices, nothing else split
    assert p["weights_total"] == rest + experts // 8
    assert p["weights_all_devices"] == 8 * rest + experts  # replicated parts counted on every device
    assert p["replicated_fallback"] == []

    # tensor parallel: vocab and kv heads over model=8; the width (90 groups) cannot split by 8, so the
    # 128 experts spread over model instead
    t = memory.plan(big, {"model": 8}, context=8192)
    V, D = big.vocab_size, big.hidden_size
    assert t["weights"]["embedding"] * 8 == 2 * V * D * 2
    assert t["weights"]["experts"] * 8 == experts
    assert t["replicated_fallback"] == []
    # 20b's 32 experts cannot spread over 64 devices: with expert=8, model=8 they stay whole over model
    w = memory.plan(cfg, {"expert": 8, "model": 8}, context=4096)
    assert w["weights"]["experts"] * 8 == _expert_bytes(cfg)
    assert "mlp1_blocks" in w["replicated_fallback"] and "mlp2_bias" not in w["replicated_fallback"]


def test_plan_kv_cache_split():
    cfg = Config.gpt_oss_20b()
    ctx, B = 32768, 4
    p = memory.plan(cfg, {"data": 2, "model": 8}, context=ctx, batch=B)
    slots = sum(cfg.sliding_window if s else ctx for s in cfg.sliding_layers)
    K, H, W = cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window
    kv_one = B * slots * 2 * K * H * 2  # k and v in bf16
    pos_one = B * (ctx + W + 1) * 4  # int32 positions of the full slots and of the ring, once; lengths
    assert p["kv_cache_one_copy"] == kv_one + pos_one == cache_bytes(cfg, B, ctx)
    assert p["kv_cache"] == kv_one // 16 + pos_one // 2  # rows over data, kv heads over model
    q = memory.plan(cfg, {"data": 2, "model": 8}, context=ctx, batch=3)  # 3 rows do not split by 2
    assert q["kv_cache"] == (3 * slots * 2 * K * H * 2) // 8 + 3 * (ctx + W + 1) * 4


def test_plan_allocates_nothing_and_checks_inputs():
    before = len(jax.live_arrays())
    memory.plan(Config.gpt_oss_120b(), {"expert": 4, "model": 2}, context=131072, batch=8)
    assert len(jax.live_arrays()) == before
    with pytest.raises(ValueError, match="exceeds the model's context length 131072"):
        memory.plan(Config.gpt_oss_20b(), {}, context=131073)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        memory.plan(Config.gpt_oss_20b(), {}, context=10, batch=0)
    with pytest.raises(ValueError, match="unknown axis 'pipe'"):
        memory.plan(Config.gpt_oss_20b(), {"pipe": 2}, context=10)


def _info(argv, capsys):
    parser = argparse.ArgumentParser()
    memory.add_info_arguments(parser)
    rc = memory.run_info(parser.parse_args(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_cli(capsys, ckpt8):
    rc, out, _ = _info(
        ["gpt-oss-120b", "--mesh", "expert=8", "--context", "8192", "--device-memory", "16"], capsys
    )
    assert rc == 0 and "116.829B parameters" in out and "fits" in out and "NOT" not in out
    rc, out, _ = _info(["--model", "gpt-oss-120b", "--device-memory", "64"], capsys)
    assert rc == 0 and "does NOT fit" in out
    rc, out, _ = _info(
        ["gpt-oss-20b", "--mesh", "model=2", "--json", "--expert-format", "dequantized"], capsys
    )
    p = json.loads(out)
    assert (
        rc == 0 and p["expert_format"] == "dequantized" and p["mesh"] == {"data": 1, "expert": 1, "model": 2}
    )
    # dequantized bf16 experts: 2 bytes per weight, split over model=2 along the width
    cfg = Config.gpt_oss_20b()
    D, F, E, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_hidden_layers
    assert p["weights"]["experts"] == L * E * (3 * F * D * 2 + 2 * (2 * F)) // 2 + L * E * D * 2
    # a checkpoint folder: its own config
    rc, out, _ = _info([str(ckpt8), "--context", "64"], capsys)
    assert rc == 0 and f"{memory.plan(CFG8, {}, 64)['params'] / 1e6:.3f}M parameters" in out
    for argv, msg in ((["gpt-oss-20b", "--mesh", "expert=three"], "--mesh|mesh spec"),
                      (["nope"], "not a preset"), ([], "no model"),
                      (["gpt-oss-20b", "--context", "200000"], "context length")):  # fmt: skip
        rc, _, err = _info(argv, capsys)
        assert rc == 2 and err.count("\n") == 1, (argv, err)
        assert any(m in err for m in msg.split("|")), err


def test_plan_sum_over_devices():
    """Sum over devices of the per-device bytes = each parameter once per copy held: a parameter split
    over mesh axes of total size s exists n/s times on n devices (norms and the router, never split, n
    times; experts on expert=4, model=2 once)."""
    ms = {"data": 1, "expert": 4, "model": 2}
    p = memory.plan(CFG8, ms, context=16)
    total = 0
    for n, s in param_specs(CFG8).items():
        split = math.prod(ms[a] for a in _rule_spec(n, s.shape, ms, CFG8) if a)
        total += math.prod(s.shape) * s.dtype.itemsize * (8 // split)
    assert p["weights_all_devices"] == total
    experts = sum(
        math.prod(s.shape) * s.dtype.itemsize for n, s in param_specs(CFG8).items() if ".mlp.mlp" in n
    )
    bias2 = CFG8.num_hidden_layers * 8 * 64 * 2  # mlp2_bias (E, D) bf16: split over expert, whole over model
    assert p["weights"]["experts"] * 8 == experts + bias2


# --------------------------------------------------------------------------------- any kind of JAX mesh
@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_meshes_made_by_jax_make_mesh(ckpt8, ref8, tmp_path_factory, axis_type):
    """`jax.make_mesh` straight from JAX (Explicit axes by default, or Auto) for load, model(tokens),
    generate and the Orbax restore: logits equal one device's, greedy tokens identical."""
    from jax.sharding import AxisType

    from conversion.convert import convert

    kw = {} if axis_type == "explicit" else {"axis_types": (AxisType.Auto,) * 3}
    mesh = jax.make_mesh((1, 4, 2), ("data", "expert", "model"), **kw)
    if axis_type == "explicit":
        assert all(t == AxisType.Explicit for t in mesh.axis_types)  # JAX's default, the hard case
    logits, gen = ref8
    orbax = tmp_path_factory.mktemp("mesh") / f"orbax-{axis_type}"
    convert(ckpt8, orbax, quiet=True)
    for path in (ckpt8, orbax):
        m = gptoss_jax.load(path, dtype="float32", mesh=mesh, quiet=True)
        emb = m.embedding[...]
        assert emb.sharding.mesh.devices.shape == (1, 4, 2) and not emb.sharding.is_fully_replicated
        with jax.set_mesh(mesh):  # the user's own mesh set around the calls changes nothing
            out = np.asarray(m(PROMPTS))
            assert np.linalg.norm(out - logits) / np.linalg.norm(logits) < 1e-5
            assert gptoss_jax.generate(m, PROMPTS, max_new_tokens=NEW) == gen
    m2 = jax.make_mesh((2, 4), ("data", "model"), **({} if axis_type == "explicit" else
                                                     {"axis_types": (AxisType.Auto,) * 2}))  # fmt: skip
    m = gptoss_jax.load(ckpt8, dtype="float32", mesh=m2, quiet=True)  # left-out axes count as size 1
    assert np.linalg.norm(np.asarray(m(PROMPTS)) - logits) / np.linalg.norm(logits) < 1e-5


def test_a_mesh_without_our_axes_is_one_line(ckpt8):
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    with pytest.raises(ValueError) as e:
        gptoss_jax.load(ckpt8, mesh=mesh, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "x=2" in msg and "data, expert, model" in msg
    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
        gptoss_jax.load(ckpt8, mesh=8, quiet=True)
    with pytest.raises(ValueError, match="needs 16 devices"):
        gptoss_jax.load(ckpt8, mesh="expert=16", quiet=True)
