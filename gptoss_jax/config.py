"""One frozen configuration for gpt-oss: architecture fields, presets, and runtime choices.

Architecture fields use OpenAI's `original/config.json` names. `from_hf_config` and
`from_original_config` build a Config from either on-disk config; `validate` raises one clear
`ValueError` for missing, unknown or inconsistent fields. Configs come from downloaded files, so every
field is type- and range-checked (finite floats, upper bounds no real gpt-oss reaches, window within the
context), in O(layers), before anything is sized from it. Runtime fields (dtype, expert format,
kernel choices) are not part of a checkpoint and are set by `gptoss_jax.load(..., **overrides)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# Fields that describe the network (saved with a checkpoint) vs. fields that only choose how we run it.
RUNTIME_FIELDS = ("dtype", "expert_format", "attention_impl", "moe_impl", "prefill_chunk")

_DTYPES = ("bfloat16", "float32")
_EXPERT_FORMATS = ("mxfp4", "dequantized")
_IMPLS = ("xla", "pallas", "auto")
_LAYER_TYPES = ("sliding_attention", "full_attention")

# Upper bounds far above any gpt-oss (20b: 24 layers, 32 experts, vocab 201088, hidden 2880, 64 heads of 64):
# a config beyond them is damaged or hostile, and sizing tables or models from it would exhaust memory.
# Heads come before head_dim: a missing head_dim is derived from them.
_INT_LIMITS = {"num_hidden_layers": 1024, "num_experts": 1024, "experts_per_token": 1024,
               "vocab_size": 1 << 22, "hidden_size": 65536, "intermediate_size": 1 << 18,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1024}  # fmt: skip
# (name, lower bound, lower bound excluded, upper bound); rope_theta > 1 because YaRN divides by log(theta)
_FLOAT_LIMITS = (("swiglu_limit", 0, True, 1e6), ("swiglu_alpha", 0, True, 1e3), ("rope_theta", 1, True, 1e12),
                 ("rope_scaling_factor", 1, False, 1e4), ("rope_ntk_alpha", 0, True, 1e6),
                 ("rope_ntk_beta", 0, True, 1e6), ("rms_norm_eps", 0, True, 1.0))  # fmt: skip
MAX_CONTEXT = 1 << 24
MAX_TOKEN_ID = (1 << 31) - 1


def _show(v) -> str:
    """A field value for a message: repr (control characters escaped), cut short."""
    try:
        r = repr(v)
    except ValueError:  # an int of more than 4300 digits has no repr
        return f"an integer of {v.bit_length()} bits"
    return r if len(r) <= 80 else r[:80] + "..."


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)

MXFP4_BLOCK = 32  # elements sharing one E8M0 scale
ORIGINAL_KEYS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
    "rope_ntk_alpha", "rope_ntk_beta",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Config:
    # --- architecture (original/config.json names) ---
    num_hidden_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5
    # Layer i is sliding iff layer_types[i] == "sliding_attention". None means the gpt-oss rule (even = sliding).
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int | None = None  # default initial_context_length * rope_scaling_factor
    eos_token_ids: tuple[int, ...] = (200002, 199999, 200012)  # <|return|>, <|endoftext|>, <|call|>
    pad_token_id: int = 199999
    # --- runtime choices ---
    dtype: str = "bfloat16"  # compute and non-expert weight dtype; "float32" for the exact mode
    expert_format: str = "mxfp4"  # keep experts packed ("mxfp4") or dequantize them at load
    attention_impl: str = "auto"  # "xla" | "pallas" | "auto": pallas only where validated (kernels.VALIDATED_PLATFORMS)
    moe_impl: str = "auto"
    prefill_chunk: int = 512  # prompts are prefilled (and model(tokens) attends) this many tokens at a time

    def __post_init__(self):
        # lists (from JSON) become tuples; anything else is left for validate() to name
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if _is_int(self.eos_token_ids):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        elif isinstance(self.eos_token_ids, list):
            object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        self.validate()

    # ----------------------------------------------------------------------------------- derived
    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def context_length(self) -> int:
        if self.max_position_embeddings is not None:
            return self.max_position_embeddings
        return int(self.initial_context_length * self.rope_scaling_factor)

    @functools.cached_property  # built once: the model asks for it once per layer
    def sliding_layers(self) -> tuple[bool, ...]:
        if self.layer_types is None:
            return tuple(i % 2 == 0 for i in range(self.num_hidden_layers))
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def layer_unit(self) -> tuple[bool, ...]:
        """The shortest repeating unit of layer kinds (True = sliding; a window of 0 makes every layer full).

        gpt-oss alternates (sliding, full): the model scans over `layer_repeats` copies of this unit, so its
        compile time does not grow with depth. A pattern without a period gives one unit of all layers.
        """
        kinds = tuple(s and self.sliding_window > 0 for s in self.sliding_layers)
        n = len(kinds)
        for p in range(1, n + 1):
            if n % p == 0 and kinds == kinds[:p] * (n // p):
                return kinds[:p]
        return kinds

    @property
    def layer_repeats(self) -> int:
        return self.num_hidden_layers // len(self.layer_unit)

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def jax_dtype(self):
        import jax.numpy as jnp

        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> Config:
        _check_known(kw)
        return dataclasses.replace(self, **kw)

    @classmethod
    def _build(cls, args: dict, overrides: dict) -> Config:
        _check_known(overrides)
        return cls(**(args | overrides))

    def architecture_dict(self) -> dict:
        """The fields that describe the network (what a checkpoint stores), JSON-ready."""
        d = dataclasses.asdict(self)
        for k in RUNTIME_FIELDS:
            d.pop(k)
        d["layer_types"] = list(self.layer_types) if self.layer_types is not None else None
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    # -------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """One ValueError naming the first bad field; O(layers)."""

        def bad(msg):
            raise ValueError(f"invalid gpt-oss config: {msg}")

        def integer(name, lo, hi, v=...):
            v = getattr(self, name) if v is ... else v
            if not _is_int(v) or not lo <= v <= hi:
                bad(f"{name} must be an integer in [{lo}, {hi}], got {_show(v)}")

        for name, hi in _INT_LIMITS.items():
            integer(name, 1, hi)
        for name, lo, open_lo, hi in _FLOAT_LIMITS:
            v = getattr(self, name)
            try:  # float() of a huge int overflows: that is out of range too
                ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))
            except OverflowError:
                ok = False
            if not ok or not (v > lo if open_lo else v >= lo) or v > hi:
                bad(f"{name} must be a finite number {'>' if open_lo else '>='} {lo} and <= {hi:g}, got {_show(v)}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")  # fmt: skip
        if self.experts_per_token > self.num_experts:
            bad(f"experts_per_token ({self.experts_per_token}) > num_experts ({self.num_experts})")
        if self.head_dim % 2:
            bad(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % MXFP4_BLOCK:
                bad(f"{name} ({getattr(self, name)}) must be a multiple of {MXFP4_BLOCK} for MXFP4 experts")
        integer("initial_context_length", 1, MAX_CONTEXT)
        if self.max_position_embeddings is not None:
            integer("max_position_embeddings", 1, MAX_CONTEXT)
        if self.context_length > MAX_CONTEXT:
            bad(f"context length initial_context_length * rope_scaling_factor = {self.context_length} is more "
                f"than {MAX_CONTEXT}")  # fmt: skip
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple):
                bad(f"layer_types must be a list, got {_show(self.layer_types)}")
            if len(self.layer_types) != self.num_hidden_layers:
                bad(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            odd = next((t for t in self.layer_types if not isinstance(t, str) or t not in _LAYER_TYPES), None)
            if odd is not None:
                bad(f"unknown layer type {_show(odd)} in layer_types (expected {' or '.join(_LAYER_TYPES)})")
        integer("sliding_window", 0, self.context_length)
        if self.sliding_window == 0 and any(self.sliding_layers):
            bad("sliding_window is 0 but layer_types has sliding_attention layers")
        if self.rope_scaling_factor > 1:  # YaRN: the ramp between the two beta frequencies must fit head_dim
            d_half, log_theta = self.head_dim / 2, math.log(self.rope_theta)
            low = d_half * math.log(self.initial_context_length / (self.rope_ntk_beta * 2 * math.pi)) / log_theta
            high = d_half * math.log(self.initial_context_length / (self.rope_ntk_alpha * 2 * math.pi)) / log_theta
            if not 0 < low < high < d_half - 1:
                bad(f"the YaRN ramp from rope_ntk_beta/rope_ntk_alpha ({low:.3g}..{high:.3g}) does not fit "
                    f"head_dim {self.head_dim} (needs 0 < low < high < {d_half - 1:g})")  # fmt: skip
        if not isinstance(self.eos_token_ids, tuple) or not 1 <= len(self.eos_token_ids) <= 64:
            bad(f"eos_token_ids must be a list of 1 to 64 token ids, got {_show(self.eos_token_ids)}")
        for t in self.eos_token_ids:
            integer("eos_token_ids", 0, MAX_TOKEN_ID, t)
        integer("pad_token_id", 0, MAX_TOKEN_ID)
        if self.dtype not in _DTYPES:
            bad(f"dtype must be one of {_DTYPES}, got {_show(self.dtype)}")
        if self.expert_format not in _EXPERT_FORMATS:
            bad(f"expert_format must be one of {_EXPERT_FORMATS}, got {_show(self.expert_format)}")
        for name in ("attention_impl", "moe_impl"):
            if getattr(self, name) not in _IMPLS:
                bad(f"{name} must be one of {_IMPLS}, got {_show(getattr(self, name))}")
        integer("prefill_chunk", 1, 1 << 20)

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def gpt_oss_20b(cls, **kw) -> Config:
        base = dict(num_hidden_layers=24, num_experts=32, experts_per_token=4, vocab_size=201088,
                    hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
                    num_key_value_heads=8)  # fmt: skip
        return cls._build(base, kw)

    @classmethod
    def gpt_oss_120b(cls, **kw) -> Config:
        return cls.gpt_oss_20b(**({"num_hidden_layers": 36, "num_experts": 128} | kw))

    @classmethod
    def tiny(cls, **kw) -> Config:
        """A small model with the real vocabulary and distinct sizes on every axis (a swapped axis fails):
        6 q heads, 2 kv heads, 5 experts, top-3, head_dim 16, hidden 64, expert width 96."""
        base = dict(num_hidden_layers=4, num_experts=5, experts_per_token=3, vocab_size=201088,
                    hidden_size=64, intermediate_size=96, head_dim=16, num_attention_heads=6,
                    num_key_value_heads=2, sliding_window=128, initial_context_length=4096)  # fmt: skip
        return cls._build(base, kw)

    @classmethod
    def preset(cls, name: str, **kw) -> Config:
        table = {"gpt-oss-20b": cls.gpt_oss_20b, "gpt-oss-120b": cls.gpt_oss_120b, "tiny": cls.tiny}
        if name not in table:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
        return table[name](**kw)

    # ------------------------------------------------------------------------------ from files
    @classmethod
    def from_original_config(cls, d: dict, **kw) -> Config:
        """From OpenAI's `original/config.json` (16 keys, OpenAI naming)."""
        if not isinstance(d, dict):
            raise ValueError("original config.json is not a JSON object")
        missing = [k for k in ORIGINAL_KEYS if k not in d]
        if missing:
            raise ValueError(f"original config.json is missing field(s): {', '.join(missing)}")
        args = {k: d[k] for k in ORIGINAL_KEYS}
        for k in ("rms_norm_eps", "swiglu_alpha"):
            if k in d:
                args[k] = d[k]
        return cls._build(args, kw)

    @classmethod
    def from_hf_config(cls, d: dict, **kw) -> Config:
        """From a Hugging Face `config.json` (model_type gpt_oss)."""
        if not isinstance(d, dict):
            raise ValueError("config.json is not a JSON object")
        if d.get("model_type") not in (None, "gpt_oss"):
            raise ValueError(f"config.json has model_type {_show(d.get('model_type'))}, expected 'gpt_oss'")
        required = ("num_hidden_layers", "num_local_experts", "vocab_size", "hidden_size",
                    "intermediate_size", "num_attention_heads", "num_key_value_heads")  # fmt: skip
        missing = [k for k in required if k not in d]
        if "num_experts_per_tok" not in d and "experts_per_token" not in d:
            missing.append("num_experts_per_tok")
        if missing:
            raise ValueError(f"config.json is missing field(s): {', '.join(missing)}")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.json rope_scaling must be an object, got {_show(rope)}")
        theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
        if rope and rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ValueError(f"config.json rope_scaling type {_show(rope.get('rope_type'))} is not 'yarn'")
        if rope.get("truncate", False):
            raise ValueError("config.json rope_scaling.truncate is true; gpt-oss uses truncate=false")
        eos = d.get("eos_token_id") or 200002
        eos = eos if isinstance(eos, list) else [eos]
        if len(eos) > 64 or not all(_is_int(e) for e in eos):
            raise ValueError(f"config.json eos_token_id must be a token id or a list of them, got {_show(eos)}")
        hidden, heads = d["hidden_size"], d["num_attention_heads"]
        # without head_dim, derive it only from valid fields; validate() names a bad one
        head_dim = d.get("head_dim", hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0 else None)
        args = dict(
            num_hidden_layers=d["num_hidden_layers"],
            num_experts=d["num_local_experts"],
            experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token")),
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            head_dim=head_dim,
            num_attention_heads=heads,
            num_key_value_heads=d["num_key_value_heads"],
            swiglu_limit=d.get("swiglu_limit", 7.0),
            sliding_window=d.get("sliding_window") or 0,
            initial_context_length=d.get("initial_context_length",
                                         rope.get("original_max_position_embeddings", 4096)),
            rope_theta=theta,
            rope_scaling_factor=rope.get("factor", 32.0) if rope else 1.0,
            rope_ntk_alpha=rope.get("beta_slow", 1.0),
            rope_ntk_beta=rope.get("beta_fast", 32.0),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            layer_types=d.get("layer_types") or None,
            max_position_embeddings=d.get("max_position_embeddings"),
            pad_token_id=d.get("pad_token_id") or 199999,
            eos_token_ids=tuple(sorted({*eos, 199999, 200002, 200012})),
        )  # fmt: skip
        return cls._build(args, kw)

    def to_hf_config(self) -> dict:
        """A Hugging Face `config.json` for this architecture (used to write synthetic checkpoints)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            # small test vocabularies do not contain the special ids; HF rejects a pad id outside the vocab
            "eos_token_id": 200002 if 200002 < self.vocab_size else None,
            "pad_token_id": self.pad_token_id if self.pad_token_id < self.vocab_size else None,
            "experts_per_token": self.experts_per_token,
            "num_experts_per_tok": self.experts_per_token,
            "num_local_experts": self.num_experts,
            "num_hidden_layers": self.num_hidden_layers,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "initial_context_length": self.initial_context_length,
            "max_position_embeddings": self.context_length,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in self.sliding_layers],
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length,
                "truncate": False,
            },
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            },  # fmt: skip
        }

    def to_original_config(self) -> dict:
        return {k: getattr(self, k) for k in ORIGINAL_KEYS}


def _check_known(kw: dict) -> None:
    unknown = sorted(set(kw) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")



def check_token_ids(ids, vocab_size: int, *, at: bool = True) -> None:
    """Token ids against the vocabulary [0, vocab_size): one prompt (a sequence or a 1-D array) or rows of
    them (a 2-D array, or lists of different lengths). ValueError naming the first id that is not an integer
    in the vocabulary and, with `at`, where it is ("at 3", or "at [row, position]"). The one check behind
    every entry point: the model, `generate`, the engine, the tokenizer, the CLI and the server."""
    if isinstance(getattr(ids, "dtype", None), np.dtype) and ids.dtype.kind in "iu":  # an integer array
        arr = np.asarray(ids)
        bad = np.argwhere((arr < 0) | (arr >= vocab_size))
        if len(bad):
            where = tuple(int(i) for i in bad[0])
            raise ValueError(_outside(arr[where], where if at else None, vocab_size))
        return
    nested = len(ids) > 0 and isinstance(ids[0], Iterable)
    for b, row in enumerate(ids if nested else [ids]):
        for t, tok in enumerate(row):
            if isinstance(tok, bool) or not isinstance(tok, numbers.Integral) or not 0 <= tok < vocab_size:
                raise ValueError(_outside(tok, ((b, t) if nested else (t,)) if at else None, vocab_size))


def _outside(tok, index: tuple[int, ...] | None, vocab_size: int) -> str:
    where = ""
    if index is not None:
        where = f" at {index[0]}" if len(index) == 1 else f" at [{', '.join(map(str, index))}]"
    shown = int(tok) if isinstance(tok, numbers.Integral) and not isinstance(tok, bool) else repr(tok)
    return f"token id {shown}{where} is outside the vocabulary [0, {vocab_size})"
