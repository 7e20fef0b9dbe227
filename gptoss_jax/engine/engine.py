"""The serving engine: continuous batching over the paged KV cache, one request exactly as it runs alone.

    engine = Engine(model, max_seqs=16, max_context=8192, num_pages=4096)
    engine.warmup()                      # compiles every call shape ahead; returns the seconds it took
    with engine:                         # steps in a background thread
        h = engine.submit(prompt_ids, max_tokens=64, temperature=0.7, seed=1, stop=["\\n\\n"])
        for ev in h: ...                 # or `async for ev in h`: TokenEvent(token, text, logprob, ...)
        h.result()                       # Result(tokens, text, finish_reason, ...)

Each step (`Engine.step`) is one plan from the scheduler (`engine.scheduler`) and ONE jitted forward call:
per lane, a flat row of tokens holding one token for every sequence that is generating, then a prefill
chunk of a waiting prompt under a per-step token budget (`paged.flat_layout`), so the weights are read
once per step; the cache's step splits the row per sequence for attention (`engine.paged`), and per-row
sampling runs on device. Shapes are bucketed (decode rows, chunk tokens, pages), so after `warmup()`
nothing compiles.

Exactness: a row's keys are its own tokens only (positions mask everything else), its sampling settings
and key are its own, and token i of a request is drawn with fold_in(its key, i): so every request gets the
tokens `gptoss_jax.generate` gives its prompt alone (bit-for-bit in greedy float32 up to ties within
rounding; the tests check it), whatever else is batched and however often it was preempted.

Meshes and hosts: on a mesh the cache's pages and slots are split over `data` (the scheduler's lanes), heads
and experts as the model is. With several processes every process builds the same engine; process 0
schedules (`submit`, `step`, or the background thread) and sends each step's plan to the others
(`multihost_utils.broadcast_one_to_all`), which run the same calls in `follow()` until process 0 `close()`s.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import itertools
import math
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
from ..model import forward, logits
from ..sampling import SamplingParams, request_key, sample, step_keys, token_logprobs, unpack_mask
from ..sharding import mesh_of, to_host
from .paged import PagedKVCache, pool_plan, token_bytes
from .requests import EngineError, RequestHandle, RequestOptions, Result, TextStream
from .scheduler import Scheduler, Seq


@partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def _run(graphdef, sliding, n_top, state, kv, a):
    """One step: one forward pass over each lane's flat row of tokens (decode rows, then a prefill chunk:
    `paged.flat_layout`), then a token sampled from each row's last one -> (kv, tokens, their log-probs,
    top ids, top log-probs), one per row."""
    model = nnx.merge(graphdef, state)
    k, v = kv
    cache = PagedKVCache(k, v, a["rows"], a["pages"], a["start"], a["n_new"], a["ring_lo"], sliding)
    lanes, width = a["tokens"].shape
    h, cache = forward(model, a["tokens"], cache.positions(lanes, width), cache)
    # a decode-only call has no chunk: its row is padding
    last = jnp.minimum(cache.last_token(lanes, width), width - 1)
    lg = logits(model, jnp.take_along_axis(h, last[..., None], axis=1).reshape(-1, h.shape[-1]))
    sp = SamplingParams(a["temperature"], a["top_k"], a["top_p"], a["min_p"], jnp.ones_like(a["top_p"]))
    keys = step_keys(jax.random.wrap_key_data(a["keys"]), a["index"])
    tok = sample(lg, keys, sp, allowed=unpack_mask(a["mask"], lg.shape[-1]))
    # log-probs cost a log-softmax and a top-k over the vocabulary: only when some row asked for them
    B = tok.shape[0]
    none = (jnp.zeros(B, jnp.float32), jnp.zeros((B, n_top), jnp.int32), jnp.zeros((B, n_top), jnp.float32))
    lp = jax.lax.cond(a["logprobs"], lambda: token_logprobs(lg, tok, n_top), lambda: none)
    return (cache.k, cache.v), tok, *lp


@dataclasses.dataclass(frozen=True)
class Metrics:
    """A snapshot of the engine (`Engine.metrics()`; `as_dict()` for a server). Times in seconds, rates
    over the last `window` seconds; ttft/tpot over the last 1024 finished requests."""

    running: int
    waiting: int
    resident: int
    pages_total: int
    pages_used: int
    pages_free: int
    page_size: int
    kv_bytes_used: int  # pages in use plus the rings of occupied slots
    kv_bytes_total: int
    reuse_hits: int
    reuse_tokens: int  # prompt tokens not prefilled thanks to reuse
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

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Engine:
    """Continuous batching for one model (see the module docstring).

    max_seqs: slots (sequences in flight, running or resident). max_context: tokens a sequence may reach
    (default min(model context, 8192)). page_size: tokens per page. num_pages: the pool; default enough for
    every slot at max_context, or what `kv_memory` bytes hold after the rings (then sequences wait or are
    preempted when it runs out). chunk: most tokens of one prefill chunk (default the config's prefill_chunk);
    budget: prefill tokens per step and data shard while sequences decode (default chunk): smaller keeps
    decoding smooth while long prompts arrive, larger fills the cache faster. ring_slack: extra ring slots per
    slot, the rollback conversation reuse may do. reuse: keep finished sequences resident; resident_pages caps
    the pages they hold (default all: residents give their pages and slots back whenever live work needs
    them). max_top_logprobs: the most alternatives a request may ask for (compiled in). detokenize: stream
    text and allow stop strings (o200k_harmony). seq_buckets (decode rows per data shard), page_buckets (pages
    gathered per row) and token_buckets (tokens of a prefill chunk): the compiled sizes, default powers of two
    up to the limit; every call is padded to the next one, and `warmup` compiles each reachable combination
    (`Scheduler.shapes`: at most len(seq_buckets) x (1 + len(token_buckets)) x len(page_buckets)).
    """

    def __init__(self, model, *, max_seqs: int = 16, max_context: int | None = None, page_size: int = 16,
                 num_pages: int | None = None, kv_memory: int | None = None, chunk: int | None = None,
                 budget: int | None = None, ring_slack: int = 16, reuse: bool = True,
                 resident_pages: int | None = None, max_top_logprobs: int = 20, detokenize: bool = True,
                 seq_buckets: Sequence[int] | None = None, page_buckets: Sequence[int] | None = None,
                 token_buckets: Sequence[int] | None = None):  # fmt: skip
        cfg = model.cfg
        self.cfg = cfg
        self.mesh = mesh_of(model)
        lanes = int(dict(self.mesh.shape).get("data", 1)) if self.mesh is not None else 1
        max_context = min(cfg.context_length, 8192) if max_context is None else max_context
        limit = cfg.context_length
        if not isinstance(max_context, int) or isinstance(max_context, bool) or not 1 < max_context <= limit:
            raise ValueError(f"max_context must be an integer in [2, {limit}], got {max_context!r}")
        chunk = cfg.prefill_chunk if chunk is None else chunk
        budget = chunk if budget is None else budget
        for name, v in (("chunk", chunk), ("budget", budget), ("max_top_logprobs", max_top_logprobs + 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.plan = pool_plan(cfg, max_seqs=max_seqs, max_context=max_context, page_size=page_size,
                              ring_slack=ring_slack, num_pages=num_pages, kv_bytes=kv_memory)  # fmt: skip
        num_pages = self.plan["num_pages"]
        if max_seqs % lanes or num_pages % lanes:
            raise ValueError(f"max_seqs ({max_seqs}) and num_pages ({num_pages}) must divide by the mesh's "
                             f"data axis ({lanes}): each data shard holds its own slots and pages")
        if num_pages // lanes < 1:
            raise ValueError(f"num_pages must be at least 1 per data shard, got {num_pages}")
        self.max_top_logprobs, self.detokenize = max_top_logprobs, detokenize
        self.scheduler = Scheduler(
            lanes=lanes, slots=max_seqs, pages=num_pages, page_size=page_size, max_context=max_context,
            chunk=chunk, budget=budget, ring_len=self.plan["ring_slots"],
            window=cfg.sliding_window, vocab_size=cfg.vocab_size, eos=tuple(cfg.eos_token_ids), reuse=reuse,
            resident_pages=num_pages if resident_pages is None else resident_pages, max_top=max_top_logprobs,
            seq_buckets=seq_buckets, page_buckets=page_buckets, token_buckets=token_buckets,
        )  # fmt: skip
        self._graphdef, self._state = nnx.split(model)
        with self._on_mesh():
            cache = PagedKVCache.create(cfg, num_pages=num_pages, page_size=page_size, max_seqs=max_seqs,
                                        ring_slack=ring_slack)  # fmt: skip
        self._kv, self._sliding = (cache.k, cache.v), cache.sliding
        if self.mesh is None:  # committed, as every call's output is: the first call compiles once, not twice
            self._kv = jax.device_put(self._kv, jax.devices()[0])
        self._lock = threading.RLock()
        self._inbox: collections.deque = collections.deque()
        self._work = threading.Event()
        self._ids, self._arrivals = itertools.count(), itertools.count()
        self._ones: dict[int, np.ndarray] = {}
        self._rate: collections.deque = collections.deque()  # (time, generated tokens) per step
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.warmup_seconds: float | None = None
        self.last_step = (0.0, 0.0, 0.0)  # seconds of the last step: planning, device calls, commit
        self.error: BaseException | None = None

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
        need = math.ceil(min(len(prompt) + options.max_tokens, sch.max_context) / sch.page_size)
        if need > sch.pages_per_lane:
            raise ValueError(f"prompt + max_tokens need {need} pages of {sch.page_size} tokens, more than "
                             f"the {sch.pages_per_lane} pages a data shard holds: lower max_tokens or give "
                             f"the engine more pages")  # fmt: skip
        seed = secrets.randbits(63) if options.seed is None else int(options.seed)
        key = _base_key(seed)
        handle = RequestHandle(next(self._ids), prompt, options, seed, self._cancel)
        seq = Seq(handle, next(self._arrivals), list(prompt), len(prompt), key,
                  TextStream(options.stop) if self.detokenize else None)  # fmt: skip
        handle._seq = seq
        self._inbox.append(("add", seq))
        self._work.set()
        return handle

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

    def warmup(self) -> float:
        """Compiles (and runs once, writing nothing) every call shape the engine can produce; returns the
        seconds it took (also `warmup_seconds`). Every process calls it (same shapes, same order)."""
        t0 = time.perf_counter()
        with self._lock:
            self._execute([self.scheduler.empty_call(*shape) for shape in self.scheduler.shapes()])
        _base_key(0)  # jax's own small jits behind a request's key
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

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
        ring_bytes = self.plan["ring_slots"] * token_bytes(self.cfg)[1]
        slots_used = len(sch.running) + len(sch.resident)
        tt, tp = _stats(ttft), _stats(tpot)
        queued = sum(1 for k, _ in list(self._inbox) if k == "add")
        return Metrics(
            running=len(sch.running), waiting=len(sch.waiting) + queued,
            resident=len(sch.resident), pages_total=sch.lanes * sch.pages_per_lane, pages_used=sch.pages_used,
            pages_free=sch.lanes * sch.pages_per_lane - sch.pages_used, page_size=sch.page_size,
            kv_bytes_used=sch.pages_used * self.plan["page_bytes"] + slots_used * ring_bytes,
            kv_bytes_total=self.plan["total_bytes"], reuse_hits=c.reuse_hits, reuse_tokens=c.reuse_tokens,
            prefill_tokens=c.prefill_tokens, decode_tokens=c.decode_tokens,
            generated_tokens=c.generated_tokens,
            preemptions=c.preemptions, finished=c.finished, steps=c.steps, tokens_per_s=rate,
            ttft_mean=tt[0], ttft_p50=tt[1], ttft_p99=tt[2], tpot_mean=tp[0], tpot_p50=tp[1], tpot_p99=tp[2],
            warmup_seconds=self.warmup_seconds,
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
            except BaseException as e:  # noqa: BLE001 - handed to every request, then the thread ends
                self.error = e
                with self._lock:
                    self.scheduler.fail_all(f"engine step failed: {type(e).__name__}: {e}")
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

    def _execute(self, calls: list[dict]) -> list[tuple[np.ndarray, ...]]:
        """Runs the calls in order (each donates the KV buffers to the next) -> each call's host outputs."""
        outs = []
        with self._on_mesh():
            for a in calls:
                a = dict(a)
                if "mask" not in a:
                    B = a["rows"].shape[0]
                    if B not in self._ones:
                        self._ones[B] = np.full((B, -(-self.cfg.vocab_size // 8)), 255, np.uint8)
                    a["mask"] = self._ones[B]
                self._kv, *out = _run(self._graphdef, self._sliding, self.max_top_logprobs, self._state,
                                      self._kv, a)  # fmt: skip
                outs.append(out)
            return [tuple(to_host(x) for x in out) for out in outs]

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
