"""Serving: continuous batching over a paged KV cache (`Engine`), exact per request. See docs/serving.md."""

from .engine import Engine, Metrics
from .paged import PagedKVCache, pool_plan
from .requests import EngineError, RequestHandle, RequestOptions, Result, TokenEvent

__all__ = ["Engine", "EngineError", "Metrics", "PagedKVCache", "RequestHandle", "RequestOptions", "Result",
           "TokenEvent", "pool_plan"]
