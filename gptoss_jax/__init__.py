"""gptoss-jax: OpenAI's gpt-oss (20b, 120b) in JAX / Flax NNX, with MXFP4 experts kept packed."""

from . import loading as _loading
from .adapters import apply_adapters
from .cache import KVCache
from .config import Config
from .generate import generate, stream
from .model import Transformer

__all__ = ["Config", "KVCache", "Transformer", "apply_adapters", "generate", "load", "stream"]
__version__ = "0.1.0"


# Here rather than in loading.py, which sits below `adapters` in the import graph (tests/test_architecture.py).
def load(path, *, dtype: str = "bfloat16", mesh=None, quiet: bool = False, expert_format: str | None = None,
         verify: bool = False, adapters=None, **overrides) -> Transformer:  # fmt: skip
    model = _loading.load(path, dtype=dtype, mesh=mesh, quiet=quiet, expert_format=expert_format, verify=verify,
                          **overrides)  # fmt: skip
    return model if adapters is None else apply_adapters(model, adapters)


_ADAPTERS_DOC = """    adapters: a folder of LoRA adapters in PEFT's format (`gptoss-jax finetune` writes one), applied by
    `apply_adapters` (dense targets merged, expert adapters beside the packed experts).
"""
load.__doc__ = _loading.load.__doc__.replace("    overrides:", _ADAPTERS_DOC + "    overrides:")
