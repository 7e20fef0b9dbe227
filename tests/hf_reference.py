"""The independent oracle: Hugging Face transformers' `GptOssForCausalLM` and its building blocks.

transformers reads our synthetic checkpoints from disk exactly as it reads the released ones. On CPU it has
no MXFP4 kernel, so `Mxfp4Config(dequantize=True)` makes it unpack the experts itself (its own LUT + ldexp
code) into dense `gate_up_proj (E, D, 2F)` / `down_proj (E, F, D)` tensors. We always ask for the eager
attention (`attn_implementation="eager"`): the only CPU path that applies the sinks, and the one whose
arithmetic is plain torch.

Models are cached per (path, dtype, options) for the whole pytest process, so every test file that needs
the same checkpoint reuses one loaded copy (and, for our JAX model, its compiled functions).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np

# The Hugging Face hub `config.json` of gpt-oss-20b, as listed in the spec (§1.2): the real file we must read.
HUB_CONFIG_20B = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "pad_token_id": 199999,
    "experts_per_token": 4,
    "num_experts_per_tok": 4,
    "num_local_experts": 32,
    "num_hidden_layers": 24,
    "head_dim": 64,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "initial_context_length": 4096,
    "max_position_embeddings": 131072,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "rms_norm_eps": 1e-05,
    "rope_theta": 150000,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.9,
    "output_router_logits": False,
    "use_cache": True,
    "vocab_size": 201088,
    "quantization_config": {"quant_method": "mxfp4",
                            "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"]},
    "transformers_version": "4.55.0.dev0",
}  # fmt: skip
HUB_CONFIG_120B = HUB_CONFIG_20B | {"num_local_experts": 128, "num_hidden_layers": 36,
                                    "layer_types": ["sliding_attention", "full_attention"] * 18}  # fmt: skip

# OpenAI's `original/config.json` (16 keys, spec §1.1).
ORIGINAL_CONFIG_20B = {
    "num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
    "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128, "initial_context_length": 4096,
    "rope_theta": 150000, "rope_scaling_factor": 32.0, "rope_ntk_alpha": 1, "rope_ntk_beta": 32,
}  # fmt: skip
ORIGINAL_CONFIG_120B = ORIGINAL_CONFIG_20B | {"num_hidden_layers": 36, "num_experts": 128}


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference; an all-zero b counts as tiny, not as 0)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torch_f32(a):
    import torch

    return torch.from_numpy(np.array(a, np.float32))


@functools.lru_cache(maxsize=None)
def hf_model(path: str | Path, dtype: str = "float32"):
    """transformers' GptOssForCausalLM read from a HF-layout folder, experts dequantized by transformers."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging

    logging.set_verbosity_error()  # "MXFP4 inference on CPU requires use_kernels=True ... dequantize" is expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM.from_pretrained(
            str(path),
            quantization_config=Mxfp4Config(dequantize=True),
            dtype=getattr(torch, dtype),
            attn_implementation="eager",
        )
    return model.eval()


@functools.lru_cache(maxsize=None)
def our_model(path: str | Path, dtype: str = "float32", **overrides):
    """Our model read by our loader (`gptoss_jax.load`), cached like `hf_model`."""
    import gptoss_jax

    return gptoss_jax.load(str(path), dtype=dtype, quiet=True, **overrides)


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def hf_rotary(config: dict):
    """transformers' GptOssRotaryEmbedding for a `config.json` dict (built from HF's own config class)."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    d = {k: v for k, v in config.items() if k != "quantization_config"}
    return GptOssRotaryEmbedding(GptOssConfig(**d))


def hf_cos_sin(rotary, positions) -> tuple[np.ndarray, np.ndarray]:
    """HF cos/sin (B,T,H/2) float32 for integer positions (B,T)."""
    import torch

    pos = torch.as_tensor(np.asarray(positions), dtype=torch.long)
    cos, sin = rotary(torch.zeros((), dtype=torch.float32), pos)
    return cos.numpy(), sin.numpy()


def hf_mask(batch: int, q_len: int, kv_len: int, *, q_offset: int = 0, window: int = 0):
    """HF's own eager additive mask (B,1,T,S): its causal rule, plus its sliding-window rule when `window`."""
    from transformers import masking_utils as mu

    fn = mu.sliding_window_causal_mask_function(window) if window else mu.causal_mask_function
    return mu.eager_mask(batch_size=batch, q_length=q_len, kv_length=kv_len, q_offset=q_offset, mask_function=fn)


def hf_layer_mask(config, inputs_embeds, position_ids, *, sliding: bool):
    """transformers' own mask for one decoder layer (sliding-window or full causal), built as its model does.

    The no-cache argument is `cache` in current transformers (`past_key_values` is deprecated there and
    warns); older releases only know `past_key_values`.
    """
    import inspect

    from transformers import masking_utils as mu

    make = mu.create_sliding_window_causal_mask if sliding else mu.create_causal_mask
    no_cache = "cache" if "cache" in inspect.signature(make).parameters else "past_key_values"
    return make(config=config, inputs_embeds=inputs_embeds, attention_mask=None, position_ids=position_ids,
                **{no_cache: None})  # fmt: skip
