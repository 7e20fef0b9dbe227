"""Driving an engine through a workload and watching it compile, shared by the engine tests."""

from __future__ import annotations

import contextlib

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def drive(engine, requests, arrivals):
    """Submits request i (prompt, options) at step arrivals[i], steps until all finish -> (results, trace of
    (running, waiting) after each step)."""
    handles = [None] * len(requests)
    trace, step = [], 0
    while not all(h is not None and h.done for h in handles):
        for i, (prompt, opts) in enumerate(requests):
            if arrivals[i] == step:
                handles[i] = engine.submit(prompt, **opts)
        engine.step()
        m = engine.metrics()
        trace.append((m.running, m.waiting))
        step += 1
    return [h.result() for h in handles], trace


@contextlib.contextmanager
def compiles():
    """The durations of the XLA compiles that happen inside the block (a list, filled as they happen)."""
    seen: list[float] = []

    def listener(event, duration, **kw):
        if event == COMPILE_EVENT:
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
