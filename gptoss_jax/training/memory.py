"""Training memory per device (`gptoss-jax info MODEL --train`): nothing allocated, any mesh planned anywhere.

  weights      the base as `memory.plan` counts it (experts packed unless full fine-tuning)
  trainable    adapters (float32), or the weights themselves for full fine-tuning, split by the same rules
               as at run time (`lora.trainable_specs`)
  gradients    the float32 accumulator and one micro-batch's gradient (in the trainable set's dtype)
  optimizer    AdamW's two moments (float32 for adapters, each weight's dtype for full fine-tuning)
  activations  with rematerialization per layer (`TrainConfig.remat`): each layer's input (B, T, D) kept
               for the backward pass, plus the largest single layer's working set while it is recomputed:
               q/k/v and their gradients, the attention probabilities of the whole layer (the backward pass
               of the XLA attention keeps every query block's: B x heads x T x visible keys, float32, T^2 on
               full-attention layers), the expert rows (sorted copies, their gradients, float32) and the
               cross-entropy chunk (logits and their gradient, at most 2 x 256 MiB)
Not counted: XLA's own workspace and fragmentation, so leave some headroom. Without remat every layer keeps
its working set at once (roughly the last term times the number of layers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from ..config import Config
from ..lora import LoraConfig, adapter_layout, trainable_specs
from ..memory import GiB, plan
from ..sharding import MESH_AXES, check_mesh_shape, parse_mesh, shard_shape
from .loss import LOSS_CHUNK_LOGITS

F32_BYTES = 4


def plan_training(
    cfg: Config,
    mesh_shape: Mapping[str, int] | str,
    seq_len: int,
    batch: int,
    lora: LoraConfig | None,
    *,
    remat: bool = True,
) -> dict:
    """Bytes per device of a training step of `batch` rows of `seq_len` tokens (see the module docstring);
    `lora` None plans full fine-tuning (experts dequantized)."""
    shape = parse_mesh(mesh_shape) if isinstance(mesh_shape, str) else check_mesh_shape(mesh_shape)
    for what, v in (("seq_len", seq_len), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what} must be a positive integer, got {v!r}")
    if lora is None:
        cfg = cfg.replace(expert_format="dequantized")
    base = plan(cfg, shape, 1, 1)
    if lora is None:
        from ..weights import param_layout

        layout = {n: (s, np.dtype(dt).itemsize) for n, (s, dt, _) in param_layout(cfg).items()}
    else:
        layout = {n: (s, F32_BYTES) for n, s in adapter_layout(cfg, lora).items()}
    specs = trainable_specs(cfg, {n: s for n, (s, _) in layout.items()}, shape)
    local = {n: math.prod(shard_shape(s, specs[n], shape)) for n, (s, _) in layout.items()}
    trainable = sum(local[n] * item for n, (_, item) in layout.items())
    grads = sum(local[n] * (F32_BYTES + item) for n, (_, item) in layout.items())  # f32 accumulator + one
    n_train = sum(math.prod(s) for s, _ in layout.values())
    acts = _activations(cfg, shape, seq_len, batch, remat)
    out = {
        "mesh": shape,
        "devices": math.prod(shape.values()),
        "seq_len": seq_len,
        "batch": batch,
        "dtype": cfg.dtype,
        "mode": "full" if lora is None else "lora",
        "remat": remat,
        "lora": None
        if lora is None
        else {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)},
        "trainable_params": n_train,
        "weights": base["weights_total"],
        "trainable": 0 if lora is None else trainable,  # full fine-tuning trains the weights counted above
        "gradients": grads,
        "optimizer": 2 * trainable,
        **acts,
    }
    out["total"] = sum(out[k] for k in ("weights", "trainable", "gradients", "optimizer", "activations"))
    return out


def _activations(cfg: Config, shape: dict, T: int, batch: int, remat: bool) -> dict:
    dt = np.dtype(cfg.dtype).itemsize
    b = -(-batch // shape["data"])  # rows per device
    m = shape["model"]
    K = cfg.num_key_value_heads
    heads = cfg.num_attention_heads // (m if K % m == 0 else 1)  # attention splits over kv heads
    kv = cfg.num_key_value_heads // (m if K % m == 0 else 1)
    D, H, X, F = cfg.hidden_size, cfg.head_dim, cfg.experts_per_token, cfg.intermediate_size
    saved = cfg.num_hidden_layers * b * T * D * dt
    qkv = 2 * b * T * (heads + 2 * kv) * H * dt  # values and their gradients
    probs = {}
    for sliding in set(cfg.layer_unit):
        visible = min(T, cfg.prefill_chunk + cfg.sliding_window) if sliding else T
        probs[sliding] = b * heads * T * visible * F32_BYTES
    rows = b * T * X  # (token, expert) pairs of the local tokens (every device sees its tokens' pairs)
    experts = rows * D * (2 * dt + 2 * F32_BYTES) + b * T * D * F32_BYTES + rows * 2 * F // m * dt
    loss = 2 * min(b * T * cfg.vocab_size, LOSS_CHUNK_LOGITS) * F32_BYTES
    layer = qkv + max(probs.values()) + experts + 2 * b * T * D * dt
    if not remat:
        layer *= cfg.num_hidden_layers
    return {
        "activations": (saved if remat else 0) + layer + loss,
        "activations_saved": saved if remat else 0,
        "activations_layer": layer,
        "activations_loss": loss,
    }


def _gib(b: int) -> str:
    return f"{b / GiB:8.2f} GiB"


def format_training_plan(p: dict, *, name: str = "", device_memory_gib: float | None = None) -> str:
    mesh = ",".join(f"{a}={p['mesh'][a]}" for a in MESH_AXES)
    if p["lora"]:
        lo = p["lora"]
        what = f"LoRA r={lo['rank']} on {','.join(lo['targets'])}, base frozen (experts packed)"
        tlabel = "adapters (float32)"
    else:
        what, tlabel = "full fine-tuning (experts dequantized)", "(the weights are trained)"
    params = p["trainable_params"]
    count = f"{params / 1e9:.3f}B" if params >= 1e9 else f"{params / 1e6:.3f}M"
    devices = f"{p['devices']} device{'s' * (p['devices'] > 1)}"
    lines = [
        f"training {name + ' ' if name else ''}on mesh {mesh} ({devices})",
        f"  {what}; {count} trainable parameters; {p['seq_len']} tokens x batch {p['batch']}, {p['dtype']}, "
        f"{'remat per layer' if p['remat'] else 'no remat'}",
        "per device:",
        f"  {'weights':<34}{_gib(p['weights'])}",
        f"  {tlabel:<34}{_gib(p['trainable'])}",
        f"  {'gradients (accumulator + step)':<34}{_gib(p['gradients'])}",
        f"  {'optimizer (AdamW moments)':<34}{_gib(p['optimizer'])}",
        f"  {'activations':<34}{_gib(p['activations'])}",
        f"    {'layer inputs kept (remat)':<32}{_gib(p['activations_saved'])}",
        f"    {'one layer recomputed':<32}{_gib(p['activations_layer'])}",
        f"    {'cross-entropy chunk':<32}{_gib(p['activations_loss'])}",
        f"  {'total':<34}{_gib(p['total'])}",
    ]
    if device_memory_gib is not None:
        left = device_memory_gib * GiB - p["total"]
        verdict = (
            f"fits, {left / GiB:.2f} GiB left for XLA's workspace"
            if left > 0
            else f"does NOT fit: {-left / GiB:.2f} GiB over"
        )
        lines.append(f"device memory {device_memory_gib:g} GiB: {verdict}")
    return "\n".join(lines)
