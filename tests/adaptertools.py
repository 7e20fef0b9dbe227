"""Adapters for the serving tests: PEFT folders of different ranks and targets on the tiny checkpoint, the
references `generate` gives with each applied alone, and PEFT's logits for each."""

from __future__ import annotations

import functools
import warnings

import numpy as np

import gptoss_jax
from gptoss_jax.adapters import apply_adapters, save_adapters
from gptoss_jax.lora import LoraConfig, init_adapters

# name -> LoraConfig: different ranks, one with the router, one with expert targets only
ADAPTERS = {
    "attn2": LoraConfig(rank=2, alpha=4.0, targets="attn"),
    "all4": LoraConfig(rank=4, alpha=8.0, targets="all"),
    "experts3": LoraConfig(rank=3, alpha=3.0, targets="experts"),
}
B_STD = 0.3  # B drawn nonzero: each adapter moves the tokens away from the base's


def write_adapters(root, cfg, names=tuple(ADAPTERS)) -> dict:
    """{name: folder} of PEFT adapters (written by `save_adapters`, read back by PEFT in the tests)."""
    out = {}
    for i, name in enumerate(names):
        lcfg = ADAPTERS[name]
        arrays = init_adapters(cfg.replace(dtype="float32"), lcfg, seed=10 + i, b_std=B_STD)
        out[name] = save_adapters(root / name, arrays, cfg, lcfg)
    return out


@functools.lru_cache(maxsize=None)
def adapted_model(ckpt: str, folder: str | None):
    """A fresh float32 model with the adapter folder applied (merged: `apply_adapters`), or the base."""
    model = gptoss_jax.load(ckpt, dtype="float32", quiet=True)
    return model if folder is None else apply_adapters(model, folder)


def peft_logits(ckpt, folder, tokens) -> np.ndarray:
    """transformers + PEFT's float32 logits of `tokens` (B,T) with the adapter folder (None: the base)."""
    import torch
    from peft import PeftModel
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM.from_pretrained(str(ckpt), quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32, attn_implementation="eager")  # fmt: skip
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder))
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
