"""Fine-tuning gpt-oss: LoRA on the packed MXFP4 base (or full fine-tuning of dequantized weights).

- `loss.py`: the loss of a batch: the model's own forward pass (`model.apply`) with the adapters as its
  per-layer transform and remat per layer, then a chunked cross-entropy
- `data.py`: OpenAI chat JSONL -> harmony tokens with loss weights, packing, the step -> rows order
- `loop.py`: `finetune(base, data, out)`, optax, gradient accumulation, Orbax checkpoints, loss curve
- `merge.py`: a base with its adapters folded in, written as a checkpoint (`gptoss-jax merge`)
- `memory.py`: training memory per device (`gptoss-jax info --train`)
- `command.py`: `gptoss-jax finetune`, `merge`

LoRA itself (targets, adapter arrays, the per-layer merge) is `gptoss_jax.lora`, and PEFT folders and
`apply_adapters` are `gptoss_jax.adapters`: the server and the CLI use them without training.

The package itself stays light (the CLI imports `command` to build its parser); the names below load their
module on first use.
"""

from __future__ import annotations

__all__ = [
    "LoraConfig",
    "TrainConfig",
    "apply_adapters",
    "finetune",
    "load_adapters",
    "read_jsonl",
    "save_adapters",
]


def __getattr__(name: str):
    if name not in __all__:  # submodules and anything else: the normal lookup (and import) applies
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .. import adapters, lora
    from . import data, loop

    return next(getattr(m, name) for m in (loop, lora, adapters, data) if hasattr(m, name))
