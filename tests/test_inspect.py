"""Captures, interventions and scoring (`gptoss_jax.inspect`), in float32 on the tiny checkpoint.

Captures against transformers' own `output_attentions` / `output_router_logits` / `output_hidden_states`
(eager attention) on every layer, 40 tokens = five windows of 8. Interventions against what they claim to be:
ablating an expert = a checkpoint whose router bias rules it out (written to disk, read by our loader);
scaling a head = scaling its slice of o_weight; a sink logit = the model with that sink; patching = the
other run's stream. Scoring against transformers' log-softmax.
"""

from __future__ import annotations

import json
import shutil

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_one_line
from hf_reference import hf_model, our_model, rel_err

import gptoss_jax
from gptoss_jax import inspect as gi
from gptoss_jax.cache import KVCache
from gptoss_jax.checkpoint.safetensors import SafetensorsFile, save_file
from gptoss_jax.inspect import forward
from gptoss_jax.model import layer_params, rms_norm
from gptoss_jax.moe import moe_experts

TOL = 1e-5
SEQ = 40  # five windows of 8
ALL = gi.Probe(attention=True, router=True, residual=True, logit_lens=True)


@pytest.fixture(scope="module")
def ours(hf_ckpt):
    return our_model(hf_ckpt)


@pytest.fixture(scope="module")
def tokens(tiny_cfg):
    return np.random.default_rng(21).integers(0, tiny_cfg.vocab_size, (2, SEQ))


@pytest.fixture(scope="module")
def full(ours, tokens):
    """Every capture of every layer at every token."""
    return gi.run(ours, tokens, probe=ALL)


@pytest.fixture(scope="module")
def hf_out(hf_ckpt, tokens):
    with torch.no_grad():
        return hf_model(hf_ckpt)(torch.as_tensor(tokens), output_attentions=True, output_router_logits=True,
                                 output_hidden_states=True)  # fmt: skip


def _np(a):
    return np.asarray(a, np.float64)


# ---------------------------------------------------------------------------------------------- capture
def test_attention_probabilities_match_hf_every_layer(full, hf_out, tiny_cfg):
    L, N = tiny_cfg.num_hidden_layers, tiny_cfg.num_attention_heads
    assert SEQ >= 3 * tiny_cfg.sliding_window and full.layers == tuple(range(L))
    att = _np(full["attention"])
    assert att.shape == (L, 2, N, SEQ, SEQ + 1)
    for i in range(L):
        want = hf_out.attentions[i].double().numpy()  # (B, N, T, S), the sink column dropped
        assert np.abs(att[i, ..., :-1] - want).max() <= TOL, i
        # the sink's share is what transformers' softmax gave the column it dropped
        assert np.abs(att[i, ..., -1] - (1 - want.sum(-1))).max() <= TOL, i
    np.testing.assert_allclose(att.sum(-1), 1, atol=1e-6)
    sliding = np.asarray(tiny_cfg.sliding_layers)
    W, t = tiny_cfg.sliding_window, np.arange(SEQ)
    outside = (t[None, :] <= t[:, None] - W)  # keys out of the window (query, key)
    assert np.all(att[sliding][..., :-1][..., outside] == 0)
    assert np.any(att[~sliding][..., :-1][..., outside] > 0)


def test_router_logits_and_residuals_match_hf(full, hf_out, tiny_cfg, ours):
    L, E, X = tiny_cfg.num_hidden_layers, tiny_cfg.num_experts, tiny_cfg.experts_per_token
    for i in range(L):
        want = hf_out.router_logits[i].numpy().reshape(2, SEQ, E)
        assert rel_err(full["router_logits"][i], want) <= TOL, i
        top = np.argsort(-want, axis=-1, kind="stable")[..., :X]
        np.testing.assert_array_equal(np.asarray(full["experts"][i]), top)
        w = np.exp(np.take_along_axis(want, top, -1))
        np.testing.assert_allclose(full["expert_weights"][i], w / w.sum(-1, keepdims=True), rtol=1e-5)
        # hidden_states: the embeddings, then each layer's output
        assert rel_err(full["resid_pre"][i], hf_out.hidden_states[i].numpy()) <= TOL, i
        if i < L - 1:
            assert rel_err(full["resid_post"][i], hf_out.hidden_states[i + 1].numpy()) <= TOL, i
            np.testing.assert_array_equal(full["resid_post"][i], full["resid_pre"][i + 1])
    # the logit lens of the last layer is the model's output
    np.testing.assert_array_equal(full["logit_lens"][-1], full.logits)
    assert rel_err(full["logit_lens"][0], full.logits) > 0.1


def test_probe_selects_layers_and_tokens(ours, tokens, full, tiny_cfg):
    probe = gi.Probe(attention=True, router=True, residual=True, logit_lens=True, layers=(3, 0), at=(5, -1))
    tr = gi.run(ours, tokens, probe=probe)
    assert tr.layers == (0, 3) and tr.at == (5, SEQ - 1)
    for name in full.captures:
        a, b = np.asarray(tr[name]), np.asarray(full[name])
        b = b[[0, 3]]
        b = b[:, :, :, [5, SEQ - 1]] if name == "attention" else b[:, :, [5, SEQ - 1]]
        assert a.shape == b.shape and rel_err(a, b) <= 1e-6, name  # other matmul shapes: not bit-equal
    np.testing.assert_array_equal(tr.layer(3)["experts"], full["experts"][3][:, [5, SEQ - 1]])
    # only the asked-for probabilities are computed: no (T x S) capture, and a cond skips the other layers
    B, N, T = 2, tiny_cfg.num_attention_heads, SEQ
    pos = np.tile(np.arange(T), (2, 1))
    jaxpr = str(jax.make_jaxpr(lambda t, p: forward(ours, t, p, probe=probe)[2])(tokens, pos))
    assert f"{T},{T + 1}]" not in jaxpr and f"1,{B},{N},2,{T + 1}]" in jaxpr and "cond[" in jaxpr


def test_plain_path_unchanged(ours, tokens, full):
    """No hook is traced without a probe or an intervention, and a probe does not change the logits."""
    pos = np.tile(np.arange(SEQ), (2, 1))
    plain = str(jax.make_jaxpr(lambda t, p: forward(ours, t, p)[0])(tokens, pos))
    assert "scatter[" not in plain  # what writes the capture buffers
    # an empty probe or intervention traces the very same program
    for kw in ({"probe": gi.Probe()}, {"intervene": gi.Intervene()}):
        assert plain == str(jax.make_jaxpr(lambda t, p, kw=kw: forward(ours, t, p, **kw)[0])(tokens, pos))
    np.testing.assert_array_equal(full.logits, ours(tokens))


def test_captures_and_interventions_with_a_cache(ours, tokens, full):
    """Router and residual captures and interventions work on a cached prefill (the same values as without a
    cache); attention probabilities need the cache-free pass: one-line error."""
    cfg = ours.cfg
    cache = KVCache.create(cfg, 2, SEQ)
    pos = cache.chunk_positions(jnp.full((2,), SEQ, jnp.int32), SEQ)
    probe = gi.Probe(router=True, residual=True, layers=(2,), at=(-1,))
    iv = gi.intervention(ours, ablate_experts={1: [0], 3: [2]})
    _, _, caps = jax.jit(lambda t, c, iv: forward(ours, t, pos, c, probe=probe, intervene=iv))(tokens, cache, iv)
    assert sorted(caps) == sorted(gi.CAPTURES["router"] + gi.SITES)
    want = gi.run(ours, tokens, probe=ALL, intervene=iv)
    for name, a in caps.items():
        assert rel_err(a, want[name][2:3, :, -1:]) <= 1e-6, name
    assert rel_err(want["resid_post"][2], full["resid_post"][2]) > 1e-3  # the intervention shows
    with pytest.raises(ValueError) as e:
        forward(ours, jnp.asarray(tokens), pos, cache, probe=gi.Probe(attention=True))
    assert_one_line(e, "Probe(attention=True)", "cache")


def test_jit_and_values_do_not_recompile(ours, tokens):
    iv1 = gi.intervention(ours, head_scale={(1, 2): 0.0})
    iv2 = gi.intervention(ours, head_scale={(2, 4): 3.0})
    gi.run(ours, tokens, intervene=iv1)
    n = gi._run_jit._cache_size()
    out = gi.run(ours, tokens, intervene=iv2)
    assert gi._run_jit._cache_size() == n  # new values, same trace
    assert rel_err(out.logits, ours(tokens)) > 1e-3


# -------------------------------------------------------------------------------------------- intervene
def _with_router_bias(src, dst, changes: dict[tuple[int, int], float]):
    """A copy of an HF-layout checkpoint whose router bias of (layer, expert) is set, in its bf16 file."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    for (layer, expert), value in changes.items():
        name = f"model.layers.{layer}.mlp.router.bias"
        f = SafetensorsFile(dst / index[name])
        tensors = {k: np.array(f.get(k)) for k in f.keys()}
        f.close()
        tensors[name][expert] = value
        save_file(tensors, dst / index[name])
    return dst


def test_ablating_experts_equals_a_router_that_never_picks_them(ours, tokens, full, hf_ckpt, tmp_path):
    E = ours.cfg.num_experts
    ablate = {1: [int(np.bincount(np.asarray(full["experts"][1]).ravel(), minlength=E).argmax())], 2: [0, 3]}
    assert all(np.isin(np.asarray(full["experts"][i]), e).any() for i, e in ablate.items())  # they were used
    iv = gi.intervention(ours, ablate_experts=ablate)
    got = gi.run(ours, tokens, probe=ALL, intervene=iv)
    for i, e in ablate.items():
        assert not np.isin(np.asarray(got["experts"][i]), e).any()
    bias = {(i, e): -1e9 for i, es in ablate.items() for e in es}
    ckpt = _with_router_bias(hf_ckpt, tmp_path / "ablated", bias)
    want = gptoss_jax.load(ckpt, dtype="float32", quiet=True)(tokens)
    assert rel_err(got.logits, want) <= 1e-6
    assert rel_err(got.logits, full.logits) > 1e-3  # the ablation did something


def test_forcing_experts(ours, tokens, full):
    """Forced experts are chosen by every token, weighted by the softmax of the chosen experts' own logits,
    and the block computes exactly the experts' sum for that choice."""
    layer, forced = 1, [0, 4]
    tr = gi.run(ours, tokens, probe=ALL, intervene=gi.intervention(ours, force_experts={layer: forced}))
    idx, w, z = (np.asarray(tr[n][layer]) for n in ("experts", "expert_weights", "router_logits"))
    X = idx.shape[-1]
    assert all(np.isin(forced, row).all() for row in idx.reshape(-1, X))
    assert not all(np.isin(forced, row).all() for row in np.asarray(full["experts"][layer]).reshape(-1, X))
    zc = np.take_along_axis(z, idx, -1)
    np.testing.assert_allclose(w, np.exp(zc) / np.exp(zc).sum(-1, keepdims=True), rtol=1e-5)
    cfg, p = ours.cfg, layer_params(ours, layer)["mlp"]
    mid = tr["resid_mid"][layer]
    t = rms_norm(mid, p["norm"], cfg.rms_norm_eps).reshape(-1, cfg.hidden_size)
    y = moe_experts(t, jnp.asarray(idx.reshape(-1, X)), jnp.asarray(w.reshape(-1, X)), p, cfg)
    want = mid + y.reshape(mid.shape)
    assert rel_err(tr["resid_post"][layer], want) <= 1e-6


def _edited(model, leaf: str, layer: int, fn):
    """A copy of the model with layer `layer`'s attention weight `leaf` replaced by fn(weight)."""
    m = nnx.clone(model)
    p = len(m.cfg.layer_unit)
    param = getattr(m.blocks[layer % p].attn, leaf)
    param[...] = param[...].at[layer // p].set(fn(param[layer // p]))
    return m


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_scaling_a_head_equals_scaling_its_o_weight(ours, tokens, scale):
    cfg = ours.cfg
    layer, head = 2, 4
    k, g = divmod(head, cfg.q_per_kv)
    got = gi.run(ours, tokens, intervene=gi.intervention(ours, head_scale={(layer, head): scale})).logits
    want = _edited(ours, "o_weight", layer, lambda w: w.at[k, g].multiply(scale))(tokens)
    assert rel_err(got, want) <= 1e-6
    assert rel_err(got, ours(tokens)) > 1e-4


def test_sink_logit(ours, tokens, full):
    cfg = ours.cfg
    layer, head = 1, 3
    k, g = divmod(head, cfg.q_per_kv)
    tr = gi.run(ours, tokens, probe=ALL, intervene=gi.intervention(ours, sink_logits={(layer, head): 6.0}))
    want = _edited(ours, "sinks", layer, lambda s: s.at[k, g].set(6.0))(tokens)
    assert rel_err(tr.logits, want) <= 1e-6
    before, after = gi.sink_share(full)[layer, :, head], gi.sink_share(tr)[layer, :, head]
    assert np.all(after > before)  # a larger sink logit takes more of the mass
    other = np.arange(ours.cfg.num_attention_heads) != head  # the layer's other heads and the earlier layers
    assert rel_err(gi.sink_share(tr)[layer, :, other], gi.sink_share(full)[layer, :, other]) <= 1e-6
    assert rel_err(gi.sink_share(tr)[:layer], gi.sink_share(full)[:layer]) <= 1e-6


def test_activation_patching(ours, tokens, full):
    other = gi.run(ours, np.random.default_rng(5).integers(0, ours.cfg.vocab_size, tokens.shape), probe=ALL)
    # the whole stream after layer 1 from the other run: the rest of the model computes the other run
    out = gi.run(ours, tokens, intervene=gi.intervention(ours, patch=other, patch_layers=[1]))
    assert rel_err(out.logits, other.logits) <= 1e-6
    # one token, between the blocks of layer 2: earlier tokens cannot see it, later ones change
    t = 25
    iv = gi.Intervene(patch=other["resid_mid"][2:3, :, t : t + 1], patch_site="resid_mid", patch_layers=(2,),
                      patch_at=(t,))  # fmt: skip
    a, b = np.asarray(gi.run(ours, tokens, intervene=iv).logits), np.asarray(full.logits)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert rel_err(a[:, t:], b[:, t:]) > 1e-3
    # patching a run with its own values changes nothing
    same = gi.run(ours, tokens, intervene=gi.intervention(ours, patch=full, patch_layers=[1]))
    np.testing.assert_array_equal(same.logits, full.logits)


def test_bad_probes_and_interventions_are_one_line(ours, tokens, full):
    cases = [
        (lambda: gi.run(ours, tokens, probe=gi.Probe(router=True, layers=(4,))), ["Probe.layers", "layer 4"]),
        (lambda: gi.run(ours, tokens, probe=gi.Probe(router=True, at=(SEQ,))), ["Probe.at", str(SEQ)]),
        (lambda: gi.Probe(at=("x",)), ["Probe.at"]),
        (lambda: gi.run(ours, tokens, probe=gi.Probe(router=True, at=())), ["Probe.at", "at least one"]),
        (lambda: gi.run(ours, tokens, probe=gi.Probe(router=True, layers=[])), ["Probe.layers", "one layer"]),
        (lambda: gi.intervention(ours, ablate_experts={0: [5]}), ["ablate_experts", "expert 5"]),
        (lambda: gi.intervention(ours, ablate_experts={0: [0, 1, 2]}), ["layer 0", "ablated"]),
        (lambda: gi.intervention(ours, force_experts={0: [0, 1, 2, 3]}), ["layer 0", "forced"]),
        (lambda: gi.intervention(ours, ablate_experts={0: [1]}, force_experts={0: [1]}), ["both"]),
        (lambda: gi.intervention(ours, head_scale={(0, 6): 0.0}), ["head_scale", "head 6"]),
        (lambda: gi.intervention(ours, sink_logits={9: 1.0}), ["sink_logits", "(layer, head)"]),
        (lambda: gi.intervention(ours, patch=full, patch_site="resid"), ["patch_site", "resid_pre"]),
        (lambda: gi.intervention(ours, patch=gi.Trace(full.logits, {}, (), full.at)), ["Probe(residual"]),
        (lambda: gi.run(ours, tokens[:1], intervene=gi.intervention(ours, patch=full)), ["Intervene.patch"]),
        (lambda: gi.run(ours, tokens, intervene=gi.Intervene(heads=np.ones((2, 6)))), ["Intervene.heads"]),
        (lambda: gi.log_probs(ours, tokens[:, :1]), ["at least 2"]),
        (lambda: gi.score(ours, [[1, 2], [3]]), ["texts[1]"]),
    ]
    for fn, needles in cases:
        with pytest.raises(ValueError) as e:
            fn()
        assert_one_line(e, *needles)
    with pytest.raises(KeyError, match="ask the Probe"):
        gi.Trace(full.logits, {}, (), full.at)["attention"]


# ---------------------------------------------------------------------------------------------- scoring
def test_log_probs_match_hf(ours, tokens, hf_out):
    want = torch.log_softmax(hf_out.logits.double(), -1).numpy()
    want = np.take_along_axis(want[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    for block in (256, 7):  # one block, and ragged blocks of the vocabulary projection
        got = np.asarray(gi.log_probs(ours, tokens, block=block))
        assert got.shape == (2, SEQ - 1) and np.abs(got - want).max() <= TOL


def test_score_batches_and_perplexity(ours, tokens):
    texts = [tokens[0], tokens[1, :33], tokens[0, :36]]  # padded to 64 alone and together
    alone = np.asarray(gi.log_probs(ours, tokens))  # a prefix scores as the start of its row
    for text, s, row in zip(texts, gi.score(ours, texts), (0, 1, 0), strict=True):
        want = alone[row, : len(text) - 1]
        np.testing.assert_array_equal(s.tokens, text)
        np.testing.assert_allclose(s.log_probs, want, atol=1e-5)
        assert s.perplexity == pytest.approx(np.exp(-want.astype(np.float64).mean()), rel=1e-5)
    # an intervention goes through scoring too: the log-softmax of the intervened run's logits
    iv = gi.intervention(ours, ablate_experts={0: [1, 2]})
    lp = np.asarray(gi.log_probs(ours, tokens, intervene=iv))
    z = np.asarray(jax.nn.log_softmax(gi.run(ours, tokens, probe=ALL, intervene=iv).logits))
    np.testing.assert_allclose(lp, np.take_along_axis(z[:, :-1], tokens[:, 1:, None], -1)[..., 0], atol=1e-5)
    assert np.abs(lp - np.asarray(gi.log_probs(ours, tokens))).max() > 1e-3


# -------------------------------------------------------------------------------------------- summaries
def test_summaries(full, tiny_cfg):
    c = tiny_cfg
    L, E, X, W = c.num_hidden_layers, c.num_experts, c.experts_per_token, c.sliding_window
    load = gi.expert_load(full)
    np.testing.assert_allclose(load.sum(1), 1)
    co = gi.coselection(full)
    assert co.shape == (L, E, E) and np.all(co == co.transpose(0, 2, 1))
    np.testing.assert_allclose(np.diagonal(co, axis1=1, axis2=2), load * 2 * SEQ * X)
    ent = gi.routing_entropy(full)
    assert ent.shape == (L,) and np.all((ent > 0) & (ent < np.log(E)))
    dist = gi.attention_by_distance(full)
    share = gi.sink_share(full).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(dist.sum(1) + share, 1, atol=1e-6)
    sliding = np.asarray(tiny_cfg.sliding_layers)
    assert np.all(dist[sliding, W:] == 0) and np.all(dist[~sliding, W:].sum(1) > 0)


# ------------------------------------------------------------------------------------------------- mesh
def test_on_a_mesh(hf_ckpt, ours, tokens, full):
    """The same captures, interventions and scores on 8 devices (data 1, expert 4, model 2)."""
    mesh = jax.make_mesh((1, 4, 2), ("data", "expert", "model"))
    sharded = gptoss_jax.load(hf_ckpt, dtype="float32", mesh=mesh, quiet=True)
    assert len(sharded.blocks[0].attn.q_weight[...].sharding.device_set) == 8
    iv = lambda m: gi.intervention(m, ablate_experts={1: [2]}, head_scale={(0, 1): 0.0})  # noqa: E731
    got = gi.run(sharded, tokens, probe=ALL, intervene=iv(sharded))
    want = gi.run(ours, tokens, probe=ALL, intervene=iv(ours))
    assert rel_err(got.logits, want.logits) <= 1e-5
    for name in want.captures:
        assert rel_err(got[name], want[name]) <= 1e-5, name
