"""The serving engine: continuous batching over a paged KV pool with a prefix cache, each request exactly as
it runs alone.

    engine = Engine(model, max_seqs=16, kv_memory=8 << 30)   # the model's full context by default
    engine.warmup()                      # compiles every call shape ahead; returns the seconds it took
    with engine:                         # steps in a background thread
        h = engine.submit(prompt_ids, max_tokens=64, temperature=0.7, seed=1, stop=["\\n\\n"])
        for ev in h: ...                 # or `async for ev in h`: TokenEvent(token, text, logprob, ...)
        h.result()                       # Result(tokens, text, finish_reason, cached_tokens, ...)

Each step (`Engine.step`) is one plan from the scheduler (`engine.scheduler`) and ONE jitted forward call:
per lane, a flat row of tokens holding one token for every sequence that is generating, then a prefill
chunk of a waiting prompt under a per-step token budget (`paged.flat_layout`), so the weights are read
once per step; the cache's step writes every token's keys and values into its pages and runs a ragged
paged attention per row over the row's own pages (`engine.paged`, `kernels.paged_attention`), and per-row
sampling runs on device. Shapes are bucketed (decode rows, chunk tokens) and page tables are data, so the
compiled programs do not depend on the context length, and after `warmup()` nothing compiles.

Memory: one pool of pages for every layer, sized by a budget (`kv_memory` bytes per device, or
`memory_fraction` of the device memory left after the weights and the largest step's working memory, or
`num_pages`); sequences share it, and what finished or preempted sequences computed stays in it as the
prefix cache (evicted least recently used, before anything waits or is preempted).

Exactness: a row's keys are its own tokens only (positions mask everything else), a prefix hit reuses keys
computed at the same positions from the same tokens (the sliding layers' window included), its sampling
settings and key are its own, and token i of a request is drawn with fold_in(its key, i): so every request
gets the tokens `gptoss_jax.generate` gives its prompt alone (bit-for-bit in greedy float32 up to ties
within rounding; the tests check it), whatever else is batched, cached or preempted.

LoRA adapters (`engine.adapters`): `Engine(model, adapters={name: folder}, max_adapters=N)` keeps them in
one fixed pool of slots; each request names its adapter (`adapter=`, None for the base), each row of a
step carries its slot as data, and every token gets its own adapter's low-rank product, so one step mixes
adapters without recompiling; the prefix cache never shares KV across adapters.

Meshes and hosts: on a mesh the pool's pages are split over `data` (the scheduler's lanes, each with its
own prefix cache), heads and experts as the model is. With several processes every process builds the
same engine; process 0 schedules (`submit`, `step`, or the background thread) and sends each step's plan
to the others (`multihost_utils.broadcast_one_to_all`), which run the same calls in `follow()` until
process 0 `close()`s.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ..config import check_token_ids
from ..kernels.paged_attention import BlockSizes
from ..model import forward, logits
from ..sampling import SamplingParams, request_key, sample, step_keys, token_logprobs, unpack_mask
from ..sharding import cache_sharding, mesh_of, to_host
from .adapters import AdapterBusy, AdapterError, AdapterPool, PoolHooks, Resident, check_name, initial_pool
from .paged import MEMORY_FRACTION, PagedKVCache, cpu_budget, flat_layout, paged_layout, pool_plan
from .requests import EngineError, RequestHandle, RequestOptions, Result, TextStream
from .scheduler import Scheduler, Seq

log = logging.getLogger("gptoss_jax.engine")


@partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _run(graphdef, n_top, block_sizes, state, kv, a, lora=None):
    """One step: the call's page copies, one forward pass over each lane's flat row of tokens (decode rows,
    then a prefill chunk: `paged.flat_layout`), then a token sampled from each row's last one -> (kv,
    tokens, their log-probs, top ids, top log-probs), one per row. lora: the adapter pool's arrays (each
    token runs with its row's slot, `a["adapter"]`), or None."""
    model = nnx.merge(graphdef, state)
    cache = PagedKVCache.of(model.cfg, kv, a, block_sizes).copy_pages(a["copy_src"], a["copy_dst"])
    lanes, width = a["tokens"].shape
    if lora is None:
        h, cache = forward(model, a["tokens"], cache.positions(lanes, width), cache)
    else:
        per_lane = a["n_new"].shape[0] // lanes
        tok_row, _ = flat_layout(per_lane, width)
        slot = a["adapter"].reshape(lanes, per_lane)[:, tok_row]  # (lanes, width): each token's row's slot
        hooks = PoolHooks(lora, model.cfg, slot)
        h, cache, _ = forward(model, a["tokens"], cache.positions(lanes, width), cache, hooks=hooks)
    # a decode-only call has no chunk: its row is padding
    last = jnp.minimum(cache.last_token(lanes, width), width - 1)
    lg = logits(model, jnp.take_along_axis(h, last[..., None], axis=1).reshape(-1, h.shape[-1]))
    sp = SamplingParams(a["temperature"], a["top_k"], a["top_p"], a["min_p"], a["penalty"])
    keys = step_keys(jax.random.wrap_key_data(a["keys"]), a["index"])
    V = lg.shape[-1]
    # the repetition penalty of a row that has none is 1 (x / 1 and x * 1 are exact): nothing changes
    tok = sample(lg, keys, sp, allowed=unpack_mask(a["mask"], V), seen=unpack_mask(a["seen"], V))
    # log-probs cost a log-softmax and a top-k over the vocabulary: only when some row asked for them
    B = tok.shape[0]
    none = (jnp.zeros(B, jnp.float32), jnp.zeros((B, n_top), jnp.int32), jnp.zeros((B, n_top), jnp.float32))
    lp = jax.lax.cond(a["logprobs"], lambda: token_logprobs(lg, tok, n_top), lambda: none)
    return cache.buffers, tok, *lp


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A snapshot of the engine (`Engine.metrics()`; `as_dict()` for a server). Times in seconds, rates
    over the last `window` seconds; ttft/tpot over the last 1024 finished requests."""

    running: int
    waiting: int
    pages_total: int
    pages_used: int  # referenced by running sequences
    pages_cached: int  # kept for prefix hits, evictable
    pages_free: int
    page_size: int
    kv_bytes_used: int  # pages in use or cached (per device)
    kv_bytes_total: int  # the pool (per device)
    prefix_hits: int  # prompts that reused cached tokens
    prefix_hit_tokens: int  # tokens not computed thanks to them
    evicted_pages: int
    prefill_tokens: int
    decode_tokens: int
    generated_tokens: int
    preemptions: int
    finished: int
    steps: int
    tokens_per_s: float  # generated tokens per second
    ttft_mean: float | None
    ttft_p50: float | None
    ttft_p99: float | None
    tpot_mean: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    warmup_seconds: float | None
    # per LoRA adapter name, since the start (an adapter unloaded and loaded again adds up): requests
    # submitted with it, and the tokens generated with its slot
    adapter_requests: dict[str, int] = dataclasses.field(default_factory=dict)
    adapter_tokens: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Engine:
    """Continuous batching for one model (see the module docstring).

    max_seqs: sequences running at once (decode rows per step). max_context: tokens a sequence may reach,
    prompt included (default the model's context length). page_size: tokens per page. The pool: num_pages
    pages, or what kv_memory bytes PER DEVICE hold, or memory_fraction of the device memory left after the
    weights and the largest step's working memory (GPU/TPU; default MEMORY_FRACTION); with none of them, on
    CPU, CPU_KV_MEMORY (never more than max_seqs sequences at max_context need). chunk: most tokens of one
    prefill chunk (default the config's prefill_chunk); budget: prefill tokens per step and data shard while
    sequences decode (default chunk): smaller keeps decoding smooth while long prompts arrive, larger fills
    the cache faster. prefix_cache: reuse the KV of earlier sequences' prefixes (exact; see
    `engine.scheduler`). max_top_logprobs: the most alternatives a request may ask for (compiled in).
    detokenize: stream text and allow stop strings (o200k_harmony). seq_buckets (decode rows per data shard)
    and token_buckets (tokens of a prefill chunk): the compiled sizes, by default powers of two (rows, from 1)
    and of four (chunk tokens, from 16) up to the limit; every call is padded to the next one, and `warmup` compiles each reachable combination
    (`Scheduler.shapes`: at most len(seq_buckets) x (1 + len(token_buckets)), whatever the context).
    block_sizes: the paged attention's blocks (`kernels.paged_attention.BlockSizes`).
    adapters: LoRA adapters served beside the base, {name: PEFT folder or (arrays, LoraConfig)}; a request
    picks one by name (`adapter=`, None for the base) and one step mixes them (`engine.adapters`).
    max_adapters: the pool's slots (default: as many as given; 0 or None with none: no pool, no cost);
    max_lora_rank / lora_targets: the pool's rank and targets (default: the largest rank and the union
    of the targets given, else 16 and every target). `load_adapter` / `unload_adapter` change the
    residents while serving, without recompiling.
    """

    def __init__(self, model, *, max_seqs: int = 16, max_context: int | None = None, page_size: int = 16,
                 kv_memory: int | None = None, memory_fraction: float | None = None,
                 num_pages: int | None = None, chunk: int | None = None, budget: int | None = None,
                 prefix_cache: bool = True, max_top_logprobs: int = 20, detokenize: bool = True,
                 seq_buckets: Sequence[int] | None = None, token_buckets: Sequence[int] | None = None,
                 block_sizes: BlockSizes | None = None, adapters=None, max_adapters: int | None = None,
                 max_lora_rank: int | None = None, lora_targets=None):  # fmt: skip
        cfg = model.cfg
        self.cfg = cfg
        self.mesh = mesh_of(model)
        self._mesh_shape = dict(self.mesh.shape) if self.mesh is not None else {}
        lanes = int(self._mesh_shape.get("data", 1))
        limit = cfg.context_length
        max_context = limit if max_context is None else max_context
        if not isinstance(max_context, int) or isinstance(max_context, bool) or not 1 < max_context <= limit:
            raise ValueError(f"max_context must be an integer in [2, {limit}], got {max_context!r}")
        chunk = cfg.prefill_chunk if chunk is None else chunk
        budget = chunk if budget is None else budget
        for name, v in (("max_seqs", max_seqs), ("page_size", page_size), ("chunk", chunk),
                        ("budget", budget), ("max_top_logprobs", max_top_logprobs + 1)):  # fmt: skip
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if max_seqs % lanes:
            raise ValueError(f"max_seqs ({max_seqs}) must divide by the mesh's data axis ({lanes}): each "
                             f"data shard runs its own sequences")  # fmt: skip
        fraction_ok = isinstance(memory_fraction, (int, float)) and 0 < memory_fraction <= 1
        if memory_fraction is not None and not fraction_ok:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        self.max_top_logprobs, self.detokenize = max_top_logprobs, detokenize
        self.block_sizes = block_sizes
        self._graphdef, self._state = nnx.split(model)
        self._lanes, self._chunk, self._page_size = lanes, chunk, page_size
        adapters = dict(adapters or {})
        if adapters or max_adapters:  # checked before any adapter file is read
            _check_single_device(self.mesh)
        self.pool: AdapterPool | None = initial_pool(cfg, adapters, max_adapters, max_lora_rank, lora_targets)
        if self.pool is not None:
            for name, src in adapters.items():
                self.pool.add(name, self.pool.prepare(name, src))
        self._pool_lock = threading.Lock()  # the residents and their requests in flight
        self._in_flight: dict[int, list[RequestHandle]] = {}  # adapter key -> its requests not done
        self._key_names = {r.key: n for n, r in self.pool.resident.items()} if self.pool is not None else {}
        self._adapter_requests: collections.Counter[str] = collections.Counter()
        self._ones: dict[int, np.ndarray] = {}  # rows -> the masks a call leaves out (`_with_defaults`)
        self._zeros: dict[int, np.ndarray] = {}
        if num_pages is None and kv_memory is None:
            kv_memory = self._default_budget(max_seqs, max_context, page_size, memory_fraction,
                                             seq_buckets, token_buckets, budget)  # fmt: skip
        self.plan = pool_plan(cfg, page_size=page_size, num_pages=num_pages, kv_memory=kv_memory, lanes=lanes,
                              mesh_shape=self._mesh_shape)  # fmt: skip
        num_pages = self.plan["num_pages"]
        self.scheduler = Scheduler(
            lanes=lanes, slots=max_seqs, pages=num_pages, page_size=page_size, max_context=max_context,
            chunk=chunk, budget=budget, kinds=tuple(cfg.layer_unit), window=cfg.sliding_window,
            vocab_size=cfg.vocab_size, eos=tuple(cfg.eos_token_ids), prefix_cache=prefix_cache,
            max_top=max_top_logprobs, seq_buckets=seq_buckets, token_buckets=token_buckets,
        )  # fmt: skip
        with self._on_mesh():
            cache = PagedKVCache.create(cfg, num_pages=num_pages, page_size=page_size)
        self._kv = cache.buffers
        if self.mesh is None:  # committed, as every call's output is: the first call compiles once, not twice
            self._kv = jax.device_put(self._kv, jax.devices()[0])
        self._lock = threading.RLock()
        self._inbox: collections.deque = collections.deque()
        self._work = threading.Event()
        self._ids, self._arrivals = itertools.count(), itertools.count()
        self._rate: collections.deque = collections.deque()  # (time, generated tokens) per step
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.warmup_seconds: float | None = None
        self.last_step = (0.0, 0.0, 0.0)  # seconds of the last step: planning, device calls, commit
        self.error: BaseException | None = None  # what ended the background thread
        self._failure = ""

    def _default_budget(self, max_seqs, max_context, page_size, fraction, seq_buckets, token_buckets,
                        budget) -> int:  # fmt: skip
        """KV bytes per device when none are given (class docstring)."""
        cfg = self.cfg
        platform = (self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]).platform
        if platform == "cpu" and fraction is None:
            return cpu_budget(cfg, seqs_per_lane=max_seqs // self._lanes, max_context=max_context,
                              page_size=page_size, mesh_shape=self._mesh_shape)  # fmt: skip
        fraction = MEMORY_FRACTION if fraction is None else fraction
        free = _free_device_bytes(self.mesh)
        working = self._working_bytes(page_size, max_seqs, max_context, seq_buckets, token_buckets, budget)
        left = free - working
        if left <= 0:
            raise ValueError(f"no device memory left for the KV pool: {free / 2**30:.2f} GiB free after the "
                             f"weights, the largest step needs {working / 2**30:.2f} GiB; give kv_memory")  # fmt: skip
        return int(fraction * left)

    def _working_bytes(self, page_size, max_seqs, max_context, seq_buckets, token_buckets, budget) -> int:
        """The working memory (XLA's temporaries) of the largest step, measured: the step compiled for a
        one-page pool (compiled, not run)."""
        cfg, lanes = self.cfg, self._lanes
        sch = Scheduler(lanes=lanes, slots=max_seqs, pages=lanes, page_size=page_size,
                        max_context=max_context, chunk=self._chunk, budget=budget,
                        kinds=tuple(cfg.layer_unit), window=cfg.sliding_window, vocab_size=cfg.vocab_size,
                        eos=(), prefix_cache=False,
                        max_top=self.max_top_logprobs, seq_buckets=seq_buckets,
                        token_buckets=token_buckets)  # fmt: skip
        n_dec, T = max(sch.shapes(), key=lambda sh: sh[0] + sh[1])
        layout = paged_layout(cfg, num_pages=lanes, page_size=page_size)
        n = len(layout) // 2
        with self._on_mesh():
            spec = {k: jax.ShapeDtypeStruct(sh, dt, sharding=cache_sharding(ax, sh))
                    for k, (sh, dt, ax) in layout.items()}  # fmt: skip
        kv = (tuple(spec[f"k.{e}"] for e in range(n)), tuple(spec[f"v.{e}"] for e in range(n)))
        compiled = self._compile(self._with_defaults(sch.empty_call(n_dec, T)), kv)
        analysis = compiled.memory_analysis()
        return int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0

    # ------------------------------------------------------------------------------------------ public
    def submit(self, prompt: Sequence[int], options: RequestOptions | None = None, **kw) -> RequestHandle:
        """Queues a request (token ids; options as `RequestOptions` or keywords) -> its handle. Thread-safe.
        ValueError naming the bad argument."""
        if options is None:
            options = RequestOptions(**kw)
        elif kw:
            options = dataclasses.replace(options, **kw)
        if self._closed:
            raise EngineError("the engine is closed")
        if self.error is not None:
            raise EngineError(self._failure)
        if jax.process_index() != 0:
            raise EngineError("submit on process 0: the other processes follow its plan (Engine.follow)")
        cfg, sch = self.cfg, self.scheduler
        prompt = _check_prompt(prompt, cfg.vocab_size)
        options.validate(cfg.vocab_size, self.max_top_logprobs)
        if options.stop and not self.detokenize:
            raise ValueError("stop: stop strings need detokenize=True")
        if len(prompt) >= sch.max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room to generate within max_context "
                             f"{sch.max_context}")  # fmt: skip
        need = sch.pages_for(len(prompt) + 1)
        if need > sch.pages_per_lane:
            raise ValueError(f"prompt of {len(prompt)} tokens needs {need} pages of {sch.page_size} tokens "
                             f"(full and sliding layers), more than the {sch.pages_per_lane} pages of the KV "
                             f"pool (per data shard): give the engine more KV memory (kv_memory, "
                             f"--kv-memory, --memory-fraction) or send a shorter prompt")  # fmt: skip
        seed = secrets.randbits(63) if options.seed is None else int(options.seed)
        key = _base_key(seed)
        handle = RequestHandle(next(self._ids), prompt, options, seed, self._cancel)
        seq = Seq(handle, next(self._arrivals), list(prompt), len(prompt), key,
                  TextStream(options.stop) if self.detokenize else None)  # fmt: skip
        handle._seq = seq
        if options.adapter is not None:
            with self._pool_lock:  # resolved and counted at once: an unload sees this request
                r = self._resident(options.adapter)
                seq.adapter, seq.lora_slot = r.key, r.slot
                live = self._in_flight.setdefault(r.key, [])
                live[:] = [h for h in live if not h.done]
                live.append(handle)
                self._adapter_requests[options.adapter] += 1
        self._inbox.append(("add", seq))
        self._work.set()
        if self.error is not None:  # the thread died meanwhile (it set `error` before failing the inbox)
            self._fail_inbox(self._failure)
        return handle

    # -------------------------------------------------------------------------------------- adapters
    @property
    def adapters(self) -> dict[str, Resident]:
        """The adapters served now, by name (empty without a pool)."""
        with self._pool_lock:
            return dict(self.pool.resident) if self.pool is not None else {}

    def load_adapter(self, name: str, source) -> Resident:
        """Loads an adapter (a PEFT folder, or (arrays, LoraConfig)) into a free slot of the pool while
        serving; nothing recompiles. AdapterError (a ValueError) naming the adapter and the problem: a bad
        folder, a rank or target the pool lacks, a name in use, a full pool (AdapterPoolFull)."""
        pool = self._need_pool()
        check_name(name)
        with self._pool_lock:
            if name in pool.resident:
                raise AdapterError(f"adapter {name!r} is already loaded; unload it first")
        prepared = pool.prepare(name, source)  # file reading, outside the locks
        with self._lock, self._pool_lock:
            r = pool.add(name, prepared)
            self._key_names[r.key] = name
            return r

    def unload_adapter(self, name: str) -> Resident:
        """Frees an adapter's slot. AdapterBusy while requests that use it are queued or running (they are
        not cut short: wait for them, or cancel them, then unload); UnknownAdapter for a name not loaded.
        Its prefix-cache pages stay until evicted, under a key no later load reuses."""
        pool = self._need_pool()
        with self._lock:
            self._drain()  # cancelled requests leave the schedule first
            with self._pool_lock:
                r = pool.get(name)
                live = [h for h in self._in_flight.get(r.key, []) if not h.done]
                if live:
                    raise AdapterBusy(f"adapter {name!r} has {len(live)} request(s) in flight; unload it "
                                      f"when they finish")  # fmt: skip
                self._in_flight.pop(r.key, None)
                return pool.remove(name)

    def _need_pool(self) -> AdapterPool:
        if self.pool is None:
            raise AdapterError("this engine serves no adapters: start it with adapters= or max_adapters=")
        return self.pool

    def _resident(self, name) -> Resident:
        if self.pool is None:
            raise ValueError(f"adapter: {name!r} is not loaded (this engine serves no adapters)")
        try:
            return self.pool.get(name)
        except AdapterError as e:
            raise type(e)(f"adapter: {e}") from None

    def _lora(self):
        return None if self.pool is None else self.pool.arrays

    def generate(self, prompts: Sequence[Sequence[int]], **kw) -> list[Result]:
        """Submits every prompt and waits for all (steps here unless the background thread runs)."""
        handles = [self.submit(p, **kw) for p in prompts]
        while self._thread is None and not all(h.done for h in handles):
            self.step()
        return [h.result() for h in handles]

    def step(self) -> bool:
        """One step of the schedule (process 0); False when there was nothing to do."""
        with self._lock:
            self._drain()
            if self.scheduler.idle():
                return False
            t0 = time.perf_counter()
            call = self.scheduler.plan()
            plan = [] if call is None else [call.arrays]
            if jax.process_count() > 1:
                self._send(plan)
            t1 = time.perf_counter()
            outs = self._execute(plan)
            t2 = time.perf_counter()
            if call is not None:
                self.scheduler.commit(call, outs[0])
            t3 = time.perf_counter()
            self.last_step = (t1 - t0, t2 - t1, t3 - t2)
            self._rate.append((t3, self.scheduler.counters.generated_tokens))
            return True

    def warmup(self, workers: int | None = None) -> float:
        """Compiles (and runs once, writing nothing) every call shape the engine can produce; returns the
        seconds it took (also `warmup_seconds`). Every process calls it (same shapes, same order).

        The shapes are compiled ahead, `workers` at a time (default: one per CPU core, at most 8): XLA's
        compiler is mostly single-threaded, each compile fills jit's own cache, and the run that follows
        only executes. workers=1 compiles them one by one as they run."""
        t0 = time.perf_counter()
        calls = [self._with_defaults(self.scheduler.empty_call(*shape)) for shape in self.scheduler.shapes()]
        n = min(len(calls), workers if workers is not None else min(8, os.cpu_count() or 1))
        if n < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}")
        with self._lock:
            if n > 1:  # the largest shapes first: the pool ends evenly
                order = sorted(calls, key=lambda a: -a["tokens"].size)
                with concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="gptoss-compile") as pool:
                    list(pool.map(self._compile, order))
            self._execute(calls)
        _base_key(0)  # jax's own small jits behind a request's key
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    def _compile(self, a: dict, kv=None):
        """The step compiled for call `a`'s shapes (into jit's cache; nothing runs), over the pool's buffers
        or `kv` (buffers or their shapes)."""
        kv = self._kv if kv is None else kv
        with self._on_mesh():  # the mesh context is per thread
            return _run.lower(self._graphdef, self.max_top_logprobs, self.block_sizes, self._state, kv, a,
                              self._lora()).compile()  # fmt: skip

    def metrics(self) -> Metrics:
        with self._lock:  # a consistent snapshot: waits for a step in flight
            return self._metrics()

    def _metrics(self) -> Metrics:
        sch, c = self.scheduler, self.scheduler.counters
        now = time.perf_counter()
        while len(self._rate) > 1 and self._rate[0][0] < now - 10.0:
            self._rate.popleft()
        rate = 0.0
        if len(self._rate) > 1:
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            rate = (n1 - n0) / max(t1 - t0, 1e-9)
        recent = list(sch.recent)
        ttft = [r[1] for r in recent if r[1] is not None]
        tpot = [r[2] for r in recent if r[2] is not None]
        tt, tp = _stats(ttft), _stats(tpot)
        queued = sum(1 for k, _ in list(self._inbox) if k == "add")
        page = self.plan["page_bytes"]
        total = sch.lanes * sch.pages_per_lane
        return Metrics(
            running=len(sch.running), waiting=len(sch.waiting) + queued, pages_total=total,
            pages_used=sch.pages_used, pages_cached=sch.pages_cached, pages_free=sch.pages_free,
            page_size=sch.page_size, kv_bytes_used=(total - sch.pages_free) // sch.lanes * page,
            kv_bytes_total=self.plan["bytes_per_device"], prefix_hits=c.prefix_hits,
            prefix_hit_tokens=c.prefix_hit_tokens, evicted_pages=c.evicted_pages,
            prefill_tokens=c.prefill_tokens, decode_tokens=c.decode_tokens,
            generated_tokens=c.generated_tokens,
            preemptions=c.preemptions, finished=c.finished, steps=c.steps, tokens_per_s=rate,
            ttft_mean=tt[0], ttft_p50=tt[1], ttft_p99=tt[2], tpot_mean=tp[0], tpot_p50=tp[1], tpot_p99=tp[2],
            warmup_seconds=self.warmup_seconds, adapter_requests=dict(self._adapter_requests),
            adapter_tokens=_by_name(c.adapter_tokens, self._key_names),
        )  # fmt: skip

    # --------------------------------------------------------------------------------- background thread
    def start(self) -> Engine:
        """Steps in a background thread until `stop()` (process 0)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="gptoss-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._work.set()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Stops the thread, fails what is still in flight, and (process 0 of several) releases the
        followers."""
        self.stop()
        if self._closed:
            return
        with self._lock:
            self._drain()
            self.scheduler.fail_all("the engine was closed")
            if jax.process_count() > 1 and jax.process_index() == 0:
                self._send(None)
        self._closed = True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        idle_since = time.monotonic()
        while not self._stopping:
            try:
                worked = self.step()
                if worked:
                    idle_since = time.monotonic()
                elif jax.process_count() > 1 and time.monotonic() - idle_since > 5.0:
                    with self._lock:  # an empty plan now and then: followers never wait long in one broadcast
                        self._send([])
                    idle_since = time.monotonic()
            except BaseException as e:  # handed to every request (and logged), then the thread ends
                log.error("the engine's thread stopped: its step failed", exc_info=e)
                self._failure = f"engine step failed: {type(e).__name__}: {e}"
                self.error = e  # before the inbox is failed: a submit that sees no error is drained below
                self._fail_inbox(self._failure)
                return
            if not worked:
                self._work.wait(0.5)
                self._work.clear()

    # -------------------------------------------------------------------------------------- followers
    def follow(self) -> None:
        """Runs process 0's plans on this process until it closes (processes other than 0)."""
        while True:
            head = multihost_utils.broadcast_one_to_all(np.zeros(2, np.int32))
            n, size = (int(x) for x in np.asarray(head))
            if n < 0:
                return
            buf = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(size, np.uint8)))
            with self._lock:
                self._execute(_decode_plan(buf[:n].tobytes()))

    def _send(self, arrays: list[dict] | None) -> None:
        payload = b"" if arrays is None else _encode_plan(arrays)
        size = max(4096, 1 << max(len(payload) - 1, 1).bit_length())  # few shapes: few compiles
        head = np.array([-1 if arrays is None else len(payload), size], np.int32)
        multihost_utils.broadcast_one_to_all(head)
        if arrays is not None:
            buf = np.zeros(size, np.uint8)
            buf[: len(payload)] = np.frombuffer(payload, np.uint8)
            multihost_utils.broadcast_one_to_all(buf)

    # ----------------------------------------------------------------------------------------- device
    def _on_mesh(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _with_defaults(self, a: dict) -> dict:
        """Call `a` with the masks it left out: every token allowed, none seen (no repetition penalty)."""
        a = dict(a)
        B = a["n_new"].shape[0]
        if B not in self._ones:
            self._ones[B] = np.full((B, -(-self.cfg.vocab_size // 8)), 255, np.uint8)
            self._zeros[B] = np.zeros_like(self._ones[B])
        a.setdefault("mask", self._ones[B])
        a.setdefault("seen", self._zeros[B])
        return a

    def _execute(self, calls: list[dict]) -> list[tuple[np.ndarray, ...]]:
        """Runs the calls in order (each donates the KV buffers to the next) -> each call's host outputs."""
        outs = []
        with self._on_mesh():
            for a in calls:
                a = self._with_defaults(a)
                self._kv, *out = _run(self._graphdef, self.max_top_logprobs, self.block_sizes, self._state,
                                      self._kv, a, self._lora())  # fmt: skip
                outs.append(out)
            return [tuple(to_host(x) for x in out) for out in outs]

    def _fail_inbox(self, message: str) -> None:
        """Fails every request, queued or running (the thread is gone; nothing will step them)."""
        with self._lock:
            while self._inbox:
                kind, seq = self._inbox.popleft()
                if kind == "add" and not seq.handle.done:
                    seq.handle._push(result=self.scheduler._result(seq, "error", error=message))
            self.scheduler.fail_all(message)

    def _cancel(self, handle: RequestHandle) -> None:
        self._inbox.append(("cancel", handle._seq))
        self._work.set()
        if self._lock.acquire(blocking=False):  # idle: free it now
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        while self._inbox:
            kind, seq = self._inbox.popleft()
            if kind == "add":
                self.scheduler.add(seq)
            elif not seq.handle.done:
                seq.handle._push(result=self.scheduler._result(seq, "cancelled"))
                self.scheduler.cancel(seq)


def _free_device_bytes(mesh) -> int:
    """Memory left on the fullest device (GPU/TPU: its allocator's limit minus what is in use, the weights
    included); on CPU, the host's available memory."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()
    devices = [d for d in devices if d.process_index == jax.process_index()]
    stats = [d.memory_stats() for d in devices]
    if all(st and "bytes_limit" in st for st in stats):
        return min(int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0)) for st in stats)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        raise ValueError("the device does not report its memory: give kv_memory (bytes per device)") from None


def _check_single_device(mesh) -> None:
    """The adapter pool lives on one device (its arrays are not sharded, its updates not broadcast to other
    processes): an engine with adapters on a mesh, or across processes, is refused."""
    if mesh is not None:
        raise ValueError(f"adapters: LoRA adapters are served on one device for now, and this model is on a "
                         f"mesh {dict(mesh.shape)}; load it without a mesh (serve: no --mesh) to serve "
                         f"adapters")  # fmt: skip
    if jax.process_count() > 1:
        raise ValueError(f"adapters: LoRA adapters are served by one process for now, and this engine runs "
                         f"in {jax.process_count()}")  # fmt: skip


def _by_name(by_key: dict[int, int], names: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in by_key.items():
        out[names[key]] = out.get(names[key], 0) + n
    return out


def _stats(xs: list[float]) -> tuple:
    if not xs:
        return None, None, None
    return float(np.mean(xs)), float(np.percentile(xs, 50)), float(np.percentile(xs, 99))


def _base_key(seed: int) -> np.ndarray:
    """(2,) uint32 data of the key a request samples with (`sampling.request_key`)."""
    return np.asarray(jax.random.key_data(request_key(seed)), np.uint32)


def _check_prompt(prompt, vocab_size: int) -> list[int]:
    try:
        arr = np.asarray(prompt)
    except (ValueError, TypeError):
        arr = np.asarray([], object)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("prompt must be a non-empty sequence of token ids")
    try:
        check_token_ids(arr, vocab_size)
    except ValueError as e:
        raise ValueError(f"prompt: {e}") from None
    return arr.astype(np.int64).tolist()


def _encode_plan(calls: list[dict]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"{i}/{k}": v for i, a in enumerate(calls) for k, v in a.items()})
    return buf.getvalue()


def _decode_plan(payload: bytes) -> list[dict]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        calls: dict[int, dict] = {}
        for name in z.files:
            i, k = name.split("/", 1)
            calls.setdefault(int(i), {})[k] = z[name]
    return [calls[i] for i in sorted(calls)]
