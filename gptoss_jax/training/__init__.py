"""Fine-tuning gpt-oss: LoRA on the packed MXFP4 base (or full fine-tuning of dequantized weights).

- `lora.py`: targets, adapter arrays, the training forward pass (adapters merged per layer, remat) and loss
- `peft.py`: adapter folders in Hugging Face PEFT's format, `apply_adapters(model, DIR)`
- `data.py`: OpenAI chat JSONL -> harmony tokens with loss weights, packing, the step -> rows order
- `loop.py`: `finetune(base, data, out)`, optax, gradient accumulation, Orbax checkpoints, loss curve
- `command.py`: `gptoss-jax finetune`

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
    from . import data, loop, lora, peft

    return next(getattr(m, name) for m in (loop, lora, peft, data) if hasattr(m, name))
