"""One frozen configuration for gpt-oss: architecture fields, presets, and runtime choices.

Architecture fields use OpenAI's `original/config.json` names. `from_hf_config` and
`from_original_config` build a Config from either on-disk config; `validate` raises one clear
`ValueError` for missing, unknown or inconsistent fields. Runtime fields (dtype, expert format,
kernel choices) are not part of a checkpoint and are set by `gptoss_jax.load(..., **overrides)`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# Fields that describe the network (saved with a checkpoint) vs. fields that only choose how we run it.
RUNTIME_FIELDS = ("dtype", "expert_format", "attention_impl", "moe_impl", "prefill_chunk")

_DTYPES = ("bfloat16", "float32")
_EXPERT_FORMATS = ("mxfp4", "dequantized")
_IMPLS = ("xla", "pallas", "auto")

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
        if self.layer_types is not None and not isinstance(self.layer_types, tuple):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_ids, int):
            object.__setattr__(self, "eos_token_ids", (self.eos_token_ids,))
        elif not isinstance(self.eos_token_ids, tuple):
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

    @property
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
        def bad(msg):
            raise ValueError(f"invalid gpt-oss config: {msg}")

        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                     "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(f"{name} must be a positive integer, got {v!r}")
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
        if self.sliding_window < 0:
            bad(f"sliding_window must be >= 0, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                bad(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            odd = sorted(set(self.layer_types) - {"sliding_attention", "full_attention"})
            if odd:
                bad(f"unknown layer_types {odd}")
        if self.rope_scaling_factor < 1.0 or self.rope_theta <= 0:
            bad("rope_scaling_factor must be >= 1 and rope_theta > 0")
        if self.dtype not in _DTYPES:
            bad(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.expert_format not in _EXPERT_FORMATS:
            bad(f"expert_format must be one of {_EXPERT_FORMATS}, got {self.expert_format!r}")
        for name in ("attention_impl", "moe_impl"):
            if getattr(self, name) not in _IMPLS:
                bad(f"{name} must be one of {_IMPLS}, got {getattr(self, name)!r}")
        if self.prefill_chunk <= 0:
            bad(f"prefill_chunk must be positive, got {self.prefill_chunk}")

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
        if d.get("model_type") not in (None, "gpt_oss"):
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}, expected 'gpt_oss'")
        required = ("num_hidden_layers", "num_local_experts", "vocab_size", "hidden_size",
                    "intermediate_size", "num_attention_heads", "num_key_value_heads")  # fmt: skip
        missing = [k for k in required if k not in d]
        if "num_experts_per_tok" not in d and "experts_per_token" not in d:
            missing.append("num_experts_per_tok")
        if missing:
            raise ValueError(f"config.json is missing field(s): {', '.join(missing)}")
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 150000.0))
        if rope and rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise ValueError(f"config.json rope_scaling type {rope.get('rope_type')!r} is not 'yarn'")
        if rope.get("truncate", False):
            raise ValueError("config.json rope_scaling.truncate is true; gpt-oss uses truncate=false")
        eos = d.get("eos_token_id") or 200002
        args = dict(
            num_hidden_layers=d["num_hidden_layers"],
            num_experts=d["num_local_experts"],
            experts_per_token=d.get("num_experts_per_tok", d.get("experts_per_token")),
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            head_dim=d.get("head_dim", d["hidden_size"] // d["num_attention_heads"]),
            num_attention_heads=d["num_attention_heads"],
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
            layer_types=tuple(d["layer_types"]) if d.get("layer_types") else None,
            max_position_embeddings=d.get("max_position_embeddings"),
            pad_token_id=d.get("pad_token_id") or 199999,
            eos_token_ids=tuple(sorted({*(eos if isinstance(eos, list) else [eos]), 199999, 200002, 200012})),
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
