"""Serving: continuous batching over a KV page pool with an exact prefix cache (`Engine`), exact per request.
See docs/serving.md."""

from .adapters import AdapterBusy, AdapterError, AdapterPoolFull, UnknownAdapter
from .engine import Engine, Metrics
from .paged import PagedKVCache, pool_plan
from .requests import EngineError, RequestHandle, RequestOptions, Result, TokenEvent

__all__ = [
    "AdapterBusy",
    "AdapterError",
    "AdapterPoolFull",
    "Engine",
    "EngineError",
    "Metrics",
    "PagedKVCache",
    "RequestHandle",
    "RequestOptions",
    "Result",
    "TokenEvent",
    "UnknownAdapter",
    "pool_plan",
]
