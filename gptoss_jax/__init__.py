"""gptoss-jax: OpenAI's gpt-oss (20b, 120b) in JAX / Flax NNX, with MXFP4 experts kept packed."""

from .cache import KVCache
from .config import Config
from .generate import generate, stream
from .loading import load
from .model import Transformer

__all__ = ["Config", "KVCache", "Transformer", "generate", "load", "stream"]
__version__ = "0.1.0"
