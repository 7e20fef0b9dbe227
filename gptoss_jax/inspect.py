"""Look inside gpt-oss and change it, exactly, through the model's own forward pass.

- `run(model, tokens, probe=..., intervene=...)`: logits and, per layer, what a `Probe` asks for: attention
  probabilities with the sink's share, router logits, the chosen experts and their weights, the residual
  stream around each block, and the logit lens. Only the layers and tokens asked for are computed and kept.
- `intervention(model, ...)`: an `Intervene` that ablates or forces experts, scales or zeroes attention
  heads, sets sink logits, or patches the residual stream with another run's values (activation patching).
  It is an argument of the same `forward`, not a copy of the model: `run`, `log_probs` and `score` take it.
- `log_probs` / `score`: per-token log-probabilities and perplexity of token ids or texts, batched, the
  vocabulary projected a block of tokens at a time.
- `sink_share`, `expert_load`, `coselection`, `routing_entropy`, `attention_by_distance`: the summaries the
  notebooks plot, from a `Trace`.

Everything runs under jit (the probe is static, the intervention's arrays are arguments) and on a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping, Sequence

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np

from . import tokenizer
from .model import (
    CAPTURES,
    SITES,
    Intervene,
    Probe,
    Transformer,
    check_positions,
    check_tokens,
    forward,
    layer_params,
    logits,
)
from .sharding import to_host, with_model_mesh

__all__ = ["CAPTURES", "SITES", "Intervene", "Probe", "Score", "Trace", "attention_by_distance",
           "coselection", "expert_load", "intervention", "layer_table", "log_probs", "routing_entropy", "run",
           "score", "sink_share"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ capture
@dataclasses.dataclass(frozen=True)
class Trace:
    """What `run` returns: float32 logits (B,T,V) (None when not asked for) and the captures (name ->
    array with a leading axis over `layers`; the token axis holds the tokens `at`, indices along the
    sequence)."""

    logits: jax.Array | None
    captures: dict[str, jax.Array]
    layers: tuple[int, ...]
    at: tuple[int, ...]

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self.captures:
            raise KeyError(f"{name!r} was not captured (captured: {', '.join(self.captures) or 'nothing'}; "
                           f"ask the Probe for it)")  # fmt: skip
        return self.captures[name]

    def layer(self, i: int) -> dict[str, jax.Array]:
        """Layer i's captures (name -> array)."""
        if i not in self.layers:
            raise ValueError(f"layer {i} was not probed (probed: {self.layers})")
        return {n: a[self.layers.index(i)] for n, a in self.captures.items()}


def _positions(tokens, positions):
    if positions is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return check_positions(positions, tokens.shape)


@with_model_mesh
def run(model: Transformer, tokens, positions=None, *, probe: Probe | None = None,
        intervene: Intervene | None = None, with_logits: bool = True) -> Trace:  # fmt: skip
    """`model(tokens)` with captures and interventions: tokens int (B,T) or (T,); positions as for
    `model(tokens)` (default 0..T-1). Returns a `Trace`. with_logits=False skips the (B,T,V) logits (a long
    sequence's are large: 0.8 MB per token)."""
    tokens = check_tokens(tokens, model.cfg.vocab_size)
    positions = _positions(tokens, positions)
    probe = Probe() if probe is None else probe
    if not isinstance(probe, Probe):
        raise ValueError(f"probe must be a gptoss_jax.inspect.Probe, got {type(probe).__name__}")
    if intervene is not None and not isinstance(intervene, Intervene):
        raise ValueError(f"intervene must be a gptoss_jax.inspect.Intervene, got {type(intervene).__name__}")
    graphdef, state = nnx.split(model)
    out, caps = _run_jit(graphdef, state, tokens, positions, probe, intervene, bool(with_logits))
    T = tokens.shape[1]
    layers = range(model.cfg.num_hidden_layers) if probe.layers is None else sorted(set(probe.layers))
    at = tuple(range(T)) if probe.at is None else tuple(i % T for i in probe.at)
    return Trace(out, caps, tuple(layers) if caps else (), at)


@functools.partial(jax.jit, static_argnums=(0, 4, 6))
def _run_jit(graphdef, state, tokens, positions, probe, intervene, with_logits):
    model = nnx.merge(graphdef, state)
    h, _, caps = forward(model, tokens, positions, probe=probe, intervene=intervene)
    return logits(model, h) if with_logits else None, caps


# -------------------------------------------------------------------------------------------- intervene
def _check(value: int, n: int, what: str) -> int:
    if not isinstance(value, int | np.integer) or not 0 <= value < n:
        raise ValueError(f"{what} {value!r} is out of range [0, {n})")
    return int(value)


def layer_table(model: Transformer, path: str) -> np.ndarray:
    """A per-layer weight of every layer, flattened per layer: e.g. "attn.sinks" -> (L, N) float32."""
    group, leaf = path.split(".")
    return np.stack([np.asarray(to_host(layer_params(model, i)[group][leaf]), np.float32).reshape(-1)
                     for i in range(model.cfg.num_hidden_layers)])  # fmt: skip


def intervention(model: Transformer, *, ablate_experts: Mapping[int, Iterable[int]] | None = None,
                 force_experts: Mapping[int, Iterable[int]] | None = None,
                 head_scale: Mapping[tuple[int, int], float] | None = None,
                 sink_logits: Mapping[tuple[int, int], float] | None = None,
                 patch: Trace | None = None, patch_site: str = "resid_post",
                 patch_layers: Sequence[int] | None = None) -> Intervene:  # fmt: skip
    """An `Intervene` for `model`, from plain mappings (layers and heads count from 0; head n is query head n
    of the checkpoint, kv head n // G):

    ablate_experts  {layer: experts}: the router never picks them (the same as a router bias of -inf)
    force_experts   {layer: experts}: every token picks them (at most top-k of them), the other slots go to
                    the best of the rest; weights stay the softmax of the chosen experts' logits
    head_scale      {(layer, head): factor}: the head's attention output times factor (0 zeroes it)
    sink_logits     {(layer, head): logit}: the head's sink logit, instead of the checkpoint's
    patch           a `Trace` with `Probe(residual=True)`: its residual stream at `patch_site` of
                    `patch_layers` (default: every layer it holds), at its tokens, replaces this run's
    """
    cfg = model.cfg
    L, E, N, X = cfg.num_hidden_layers, cfg.num_experts, cfg.num_attention_heads, cfg.experts_per_token
    kw = {}
    if ablate_experts or force_experts:
        select = np.zeros((L, E), np.float32)
        for table, value, what in ((ablate_experts, -np.inf, "ablate_experts"),
                                   (force_experts, np.inf, "force_experts")):  # fmt: skip
            for layer, experts in (table or {}).items():
                layer = _check(layer, L, f"{what}: layer")
                experts = {_check(e, E, f"{what}: layer {layer} expert") for e in experts}
                if any(select[layer, e] not in (0, value) for e in experts):
                    raise ValueError(f"{what}: layer {layer}: an expert cannot be both ablated and forced")
                select[layer, list(experts)] = value
        for layer in range(L):
            if (select[layer] == -np.inf).sum() > E - X or (select[layer] == np.inf).sum() > X:
                raise ValueError(f"layer {layer}: at most {X} experts can be forced and at most {E - X} "
                                 f"ablated (each token chooses {X} of {E})")  # fmt: skip
        kw["experts"] = jnp.asarray(select)
    for table, name, base, what in ((head_scale, "heads", None, "head_scale"),
                                    (sink_logits, "sinks", "attn.sinks", "sink_logits")):  # fmt: skip
        if not table:
            continue
        a = np.ones((L, N), np.float32) if base is None else layer_table(model, base)
        for key, value in table.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"{what}: keys must be (layer, head) pairs, got {key!r}")
            a[_check(key[0], L, f"{what}: layer"), _check(key[1], N, f"{what}: head")] = float(value)
        kw[name] = jnp.asarray(a)
    if patch is not None:
        if patch_site not in SITES:
            raise ValueError(f"patch_site must be one of {', '.join(SITES)}, got {patch_site!r}")
        if patch_site not in patch.captures:
            raise ValueError(f"patch: the trace holds no {patch_site} (run it with Probe(residual=True))")
        layers = patch.layers if patch_layers is None else tuple(int(i) for i in patch_layers)
        missing = [i for i in layers if i not in patch.layers]
        if missing:
            raise ValueError(f"patch_layers: layer {missing[0]} is not in the trace (it holds "
                             f"{patch.layers})")  # fmt: skip
        rows = [patch.layers.index(i) for i in layers]
        kw.update(patch=patch[patch_site][np.asarray(rows)], patch_site=patch_site, patch_layers=layers,
                  patch_at=patch.at)  # fmt: skip
    return Intervene(**kw)


# ---------------------------------------------------------------------------------------------- scoring
@with_model_mesh
def log_probs(model: Transformer, tokens, positions=None, *, intervene: Intervene | None = None,
              block: int = 256) -> jax.Array:  # fmt: skip
    """float32 (B, T-1): log p(tokens[:, t+1] | tokens[:, :t+1]), through `forward` (interventions apply).

    The vocabulary projection and its log-softmax run `block` tokens at a time, so (B, T, V) logits never
    exist at once. Entries whose target (or context) is padding (negative position) are 0."""
    tokens = check_tokens(tokens, model.cfg.vocab_size)
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens: log_probs needs at least 2 tokens per row, got {tokens.shape[1]}")
    positions = _positions(tokens, positions)
    graphdef, state = nnx.split(model)
    block = max(1, min(int(block), tokens.shape[1] - 1))  # no block longer than the sequence
    return _log_probs_jit(graphdef, state, tokens, positions, intervene, block)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _log_probs_jit(graphdef, state, tokens, positions, intervene, block):
    model = nnx.merge(graphdef, state)
    h, _ = forward(model, tokens, positions, intervene=intervene)
    h, targets = h[:, :-1], tokens[:, 1:]
    B, T, D = h.shape
    n = -(-T // block)
    hb = jnp.pad(h, ((0, 0), (0, n * block - T), (0, 0))).reshape(B, n, block, D).swapaxes(0, 1)
    tb = jnp.pad(targets, ((0, 0), (0, n * block - T))).reshape(B, n, block).swapaxes(0, 1)

    def one(a):
        z = logits(model, a[0])
        return jnp.take_along_axis(z, a[1][..., None], axis=-1)[..., 0] - jax.nn.logsumexp(z, axis=-1)

    out = jax.lax.map(one, (hb, tb)).swapaxes(0, 1).reshape(B, n * block)[:, :T]
    return jnp.where((positions[:, 1:] >= 0) & (positions[:, :-1] >= 0), out, 0.0)


@dataclasses.dataclass(frozen=True)
class Score:
    """One text's score: its token ids and log p of each token after the first (float32, len - 1)."""

    tokens: np.ndarray
    log_probs: np.ndarray

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per predicted token (nats)."""
        return float(-np.mean(self.log_probs, dtype=np.float64))

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def score(model: Transformer, texts: Sequence[str | Sequence[int]], *, batch_size: int = 8,
          intervene: Intervene | None = None) -> list[Score]:  # fmt: skip
    """Per-token log-probabilities and perplexity of each text (a string, encoded with o200k_harmony, or
    token ids), `batch_size` texts per forward pass, right-padded to a length of a few buckets (fewer
    compiles). A text scores the same alone as in any batch."""
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings or token lists, got one string (wrap it in a list)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ids = [np.asarray(tokenizer.encode(t) if isinstance(t, str) else t, np.int64).reshape(-1) for t in texts]
    for i, t in enumerate(ids):
        if len(t) < 2:
            raise ValueError(f"texts[{i}]: needs at least 2 tokens to score, got {len(t)}")
    out = []
    for start in range(0, len(ids), batch_size):
        group = ids[start : start + batch_size]
        T = max(16, 1 << (max(len(t) for t in group) - 1).bit_length())  # a power of two
        toks = np.zeros((len(group), T), np.int64)
        pos = np.full((len(group), T), -1, np.int64)
        for b, t in enumerate(group):
            toks[b, : len(t)], pos[b, : len(t)] = t, np.arange(len(t))
        lp = np.asarray(to_host(log_probs(model, toks, pos, intervene=intervene)))
        out += [Score(t, lp[b, : len(t) - 1]) for b, t in enumerate(group)]
    return out


# -------------------------------------------------------------------------------------------- summaries
def sink_share(trace: Trace) -> np.ndarray:
    """The attention mass each head gives its sink: (layers, B, N, Q) float32."""
    return np.asarray(to_host(trace["attention"]))[..., -1]


def expert_load(trace: Trace) -> np.ndarray:
    """(layers, E): the fraction of (token, top-k slot) choices that went to each expert (rows sum to 1)."""
    idx = np.asarray(to_host(trace["experts"]))
    E = trace["router_logits"].shape[-1]
    counts = np.stack([np.bincount(layer.ravel(), minlength=E) for layer in idx])
    return counts / counts.sum(axis=1, keepdims=True)


def coselection(trace: Trace) -> np.ndarray:
    """(layers, E, E): how many tokens chose both experts i and j (the diagonal: tokens that chose i)."""
    idx = np.asarray(to_host(trace["experts"]))
    E = trace["router_logits"].shape[-1]
    onehot = np.zeros(idx.shape[:-1] + (E,), np.int64)
    np.put_along_axis(onehot, idx, 1, axis=-1)
    onehot = onehot.reshape(idx.shape[0], -1, E)
    return np.einsum("lte,ltf->lef", onehot, onehot)


def routing_entropy(trace: Trace) -> np.ndarray:
    """(layers,): the mean entropy, in nats, of the router's softmax over all experts (log E = uniform)."""
    z = np.asarray(to_host(trace["router_logits"]), np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1).reshape(z.shape[0], -1).mean(-1)


def attention_by_distance(trace: Trace) -> np.ndarray:
    """(layers, T): the mean attention mass at each distance (query index - key index) back from a query,
    over heads, rows and captured queries, for a run at positions 0..T-1; the sink's share is not in it."""
    p = np.asarray(to_host(trace["attention"]))[..., :-1]  # (L, B, N, Q, T)
    T = p.shape[-1]
    out = np.zeros((p.shape[0], T))
    for qi, t in enumerate(trace.at):
        out[:, : t + 1] += p[:, :, :, qi, t::-1].mean(axis=(1, 2))
    return out / len(trace.at)
