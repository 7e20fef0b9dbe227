"""Expert-parallel combine: one psum (what `sharding.expert_parallel` does) vs an all-to-all dispatch.

Both variants compute exactly the same thing (checked before timing) on a mesh data=1, expert=e, model=1
with the residual stream replicated over `expert`, as in the model:

  psum   every device routes all T tokens, runs its E/e experts on the (token, expert) pairs that chose
         them, and one float32 psum over `expert` sums the partial outputs.         Moves ~2 T D (e-1)/e.
  a2a    every device takes T/e of the tokens, sends each (token, choice) row to the device owning the
         expert (all_to_all), that device runs its experts, the rows come back (all_to_all), are combined,
         and an all_gather restores the replicated stream. Static shapes and no dropped tokens need a
         buffer of T/e * X rows per destination, so each all_to_all moves ~T X D (e-1)/e.

Usage (CPU, fake devices; on GPU/TPU leave out --fake-devices):
  python benchmarks/ep_dispatch.py --fake-devices 8 --tokens 1 16 256 2048

Timings on fake CPU devices share the host's cores and memcpy for the links, so they compare the
variants' extra work (buffers, collectives, gathers), not ICI/NVLink bandwidth. See docs/sharding.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--fake-devices", type=int, default=0, help="force this many CPU devices (0: real devices)"
    )
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffw", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    if args.fake_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fake_devices}"

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from gptoss_jax import sharding
    from gptoss_jax.config import Config
    from gptoss_jax.moe import moe_experts

    e = len(jax.devices())
    E, X, D, F = args.experts, args.topk, args.hidden, args.ffw
    if E % e:
        print(f"--experts {E} must divide by the {e} devices", file=sys.stderr)
        return 2
    cfg = Config.tiny(num_experts=E, experts_per_token=X, hidden_size=D, intermediate_size=F, dtype="float32")
    mesh = sharding.make_mesh({"expert": e})
    rng = np.random.default_rng(0)
    host = {
        "mlp1_blocks": rng.integers(0, 256, (E, 2 * F, D // 32, 16), dtype=np.uint8),
        "mlp1_scales": rng.integers(118, 121, (E, 2 * F, D // 32), dtype=np.uint8),
        "mlp1_bias": rng.standard_normal((E, 2 * F), dtype=np.float32) * 0.1,
        "mlp2_blocks": rng.integers(0, 256, (E, D, F // 32, 16), dtype=np.uint8),
        "mlp2_scales": rng.integers(118, 121, (E, D, F // 32), dtype=np.uint8),
        "mlp2_bias": rng.standard_normal((E, D), dtype=np.float32) * 0.1,
    }
    p = {
        n: jax.device_put(a, sharding.param_sharding(f"layers.0.mlp.{n}", a.shape, mesh, cfg))
        for n, a in host.items()
    }
    specs = {n: a.sharding.spec for n, a in p.items()}
    El = E // e

    def psum_fn(x, idx, w, p):
        return moe_experts(x, idx, w, p, cfg)  # under the mesh: sharding.expert_parallel

    def a2a_local(x, idx, w, p):
        me = jax.lax.axis_index("expert")
        T = x.shape[0]
        Tl = T // e
        xs = jax.lax.dynamic_slice_in_dim(x, me * Tl, Tl)
        ids = jax.lax.dynamic_slice_in_dim(idx, me * Tl, Tl).reshape(-1)
        ws = jax.lax.dynamic_slice_in_dim(w, me * Tl, Tl)
        M = Tl * X
        dest, local_e = ids // El, ids % El
        onehot = dest[:, None] == jnp.arange(e)
        slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, dest[:, None], axis=1)[:, 0]
        send = jnp.zeros((e, M, D), x.dtype).at[dest, slot].set(xs[jnp.arange(M) // X])
        send_e = jnp.full((e, M), El, jnp.int32).at[dest, slot].set(local_e)  # El: empty row, skipped
        recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)
        y = moe_experts(
            recv.reshape(e * M, D), recv_e.reshape(e * M, 1), jnp.ones((e * M, 1), x.dtype), p, cfg
        )
        back = jax.lax.all_to_all(y.reshape(e, M, D), "expert", 0, 0, tiled=True)
        rows = back[dest, slot].reshape(Tl, X, D).astype(jnp.float32)
        yl = jnp.einsum("TXD,TX->TD", rows, ws.astype(jnp.float32)).astype(x.dtype)
        return jax.lax.all_gather(yl, "expert", tiled=True)

    def a2a_fn(x, idx, w, p):
        return jax.shard_map(a2a_local, mesh=mesh, in_specs=(P(), P(), P(), specs), out_specs=P(),
                             check_vma=False)(x, idx, w, p)  # fmt: skip

    rep = NamedSharding(mesh, P())
    print(f"{e} devices ({jax.devices()[0].platform}), E={E} top-{X} D={D} F={F}, float32")
    print(f"{'tokens':>7} {'psum ms':>9} {'a2a ms':>9} {'psum MiB/dev':>13} {'a2a MiB/dev':>12}  max |diff|")
    for T in args.tokens:
        Tp = -(-T // e) * e  # a2a splits the tokens evenly over the devices
        key = jax.random.key(T)
        x = jax.device_put(jax.random.normal(key, (Tp, D), jnp.float32), rep)
        logits = jax.random.normal(jax.random.fold_in(key, 1), (Tp, E))
        vals, idx = jax.lax.top_k(logits, X)
        w = jax.nn.softmax(vals, axis=-1)
        idx, w = jax.device_put(idx.astype(jnp.int32), rep), jax.device_put(w, rep)
        with jax.set_mesh(mesh):
            fns = {"psum": jax.jit(psum_fn), "a2a": jax.jit(a2a_fn)}
            outs = {k: f(x, idx, w, p).block_until_ready() for k, f in fns.items()}
            times = {}
            for k, f in fns.items():
                ts = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    f(x, idx, w, p).block_until_ready()
                    ts.append(time.perf_counter() - t0)
                times[k] = 1e3 * float(np.median(ts))
        diff = float(jnp.max(jnp.abs(outs["psum"] - outs["a2a"])))
        frac = (e - 1) / e
        psum_b = 2 * Tp * D * 4 * frac
        a2a_b = (2 * Tp * X * D * 4 + 4 * Tp * X) * frac + Tp * D * 4 * frac  # two all_to_alls + all_gather
        print(f"{T:>7} {times['psum']:>9.2f} {times['a2a']:>9.2f} {psum_b / 2**20:>13.3f} {a2a_b / 2**20:>12.3f}"
              f"  {diff:.2e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
