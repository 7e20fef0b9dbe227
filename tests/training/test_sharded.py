"""Training on 8 fake CPU devices (data=2 x expert=2 x model=2) against one device.

The checkpoint's sizes divide every axis (8 experts, expert width 4 MXFP4 groups, 2 kv heads), so the batch
splits over `data`, the packed experts and their adapters over `expert`, each expert's width (and its
adapters' F side) over `model`: the expert computation, its custom VJP and the psum that combines the
experts all run per device inside `sharding.expert_parallel`.

Losses and gradient norms agree to float32 summation order (1e-5). The adapters after the steps agree to
1e-3 only:
Adam divides each gradient entry by its own running magnitude, so an entry whose gradient is ~0 moves by
~lr whatever its sign, and float-level differences in such entries show at the scale of the update.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import make_tiny_cfg
from hf_reference import rel_err
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gptoss_jax
from gptoss_jax.adapters import apply_adapters, save_adapters
from gptoss_jax.lora import LoraConfig, adapter_shardings, init_adapters
from gptoss_jax.model import model_params
from gptoss_jax.sharding import mesh_of
from gptoss_jax.training.loop import TrainConfig, _mesh_ctx, init_state, make_optimizer, make_step

CFG8 = make_tiny_cfg(num_hidden_layers=2, num_experts=8, experts_per_token=3, intermediate_size=128)
MESH = "data=2,expert=2,model=2"
LCFG = LoraConfig(rank=4, alpha=8, targets="all")
A, B, T = 2, 4, 16  # two micro-batches of 4 rows (2 per data shard), 16 tokens > window 8


@pytest.fixture(scope="module")
def ckpt8(tmp_path_factory):
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("shard") / "e8", CFG8, layout="hf", seed=3)


def make_batch():
    rng = np.random.default_rng(0)
    tok = rng.integers(0, 1000, (A, B, T)).astype(np.int32)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (A, B, T))
    w = (rng.random((A, B, T)) < 0.8).astype(np.float32)
    return {"tokens": tok, "positions": pos, "loss_pos": pos, "targets": np.roll(tok, -1, -1), "weights": w}


def placed(model):
    """(adapters, batch) on the model's devices: expert adapters split with their experts, rows over data."""
    mesh, cfg = mesh_of(model), model.cfg
    ad, batch = init_adapters(cfg, LCFG, 1, b_std=0.05), make_batch()
    if mesh is None:
        return jax.device_put((ad, batch), jax.devices()[0])
    sh = adapter_shardings(cfg, {n: a.shape for n, a in ad.items()}, mesh)
    rows = NamedSharding(mesh, P(None, "data", None))
    return {n: jax.device_put(a, sh[n]) for n, a in ad.items()}, {
        k: jax.device_put(v, rows) for k, v in batch.items()
    }


def run(model):
    """Two optimizer steps of two accumulated micro-batches: (losses, gradient norms, adapters)."""
    mesh, cfg = mesh_of(model), model.cfg
    ad, batch = placed(model)
    params = model_params(model)
    tcfg = TrainConfig(learning_rate=1e-2, steps=2, batch_size=B, grad_accum=A)
    opt, sched = make_optimizer(tcfg, 2)
    step = make_step(cfg, LCFG, tcfg, opt, sched)
    with _mesh_ctx(mesh):
        state = init_state(opt, ad, cfg)
        metrics = []
        for s in range(2):
            ad, state, m = step(ad, state, params, batch, np.int32(s))
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
    if mesh is not None:  # the adapters kept their shardings through the steps
        want = adapter_shardings(cfg, {n: a.shape for n, a in ad.items()}, mesh)
        assert all(ad[n].sharding.is_equivalent_to(want[n], ad[n].ndim) for n in ad)
        assert tuple(ad["blocks.0.mlp.mlp1_lora_b"].sharding.spec)[:3] == (None, "expert", "model")
    return np.array(metrics), jax.device_get(ad)


def test_training_on_8_devices_matches_one(ckpt8, tmp_path):
    one = gptoss_jax.load(ckpt8, dtype="float32", quiet=True)
    eight = gptoss_jax.load(ckpt8, dtype="float32", quiet=True, mesh=MESH)
    assert dict(mesh_of(eight).shape) == {"data": 2, "expert": 2, "model": 2}
    m1, a1 = run(one)
    m8, a8 = run(eight)
    assert np.allclose(m8, m1, rtol=1e-5, atol=0), (m8, m1)  # losses and gradient norms of both steps
    errs = {n: rel_err(a8[n], a1[n]) for n in a1}
    assert max(errs.values()) < 1e-3, max(errs.items(), key=lambda kv: kv[1])

    # The trained adapters applied for inference on the mesh give the one-device logits.
    folder = save_adapters(tmp_path / "ad", a1, one.cfg, LCFG)
    tokens = make_batch()["tokens"][0]
    want = np.asarray(apply_adapters(one, folder)(tokens))
    got = np.asarray(apply_adapters(eight, folder)(tokens))
    assert rel_err(got, want) < 1e-5
