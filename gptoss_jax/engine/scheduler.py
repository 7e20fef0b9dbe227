"""Host-side scheduling: slots, pages, admission, preemption, conversation reuse, and each step's plan.

No device work here: `Scheduler.plan()` decides a step and returns its one call as numpy arrays (the same
plan every process runs), `Scheduler.commit()` takes the sampled tokens back and streams them to the
handles.

A sequence holds a slot (its ring, in its lane) and pages (its full-layer KV, in the same lane); `length`
tokens of it are in the cache, `tokens` are all it knows (prompt, then generated). What it still has to feed
decides what it does in a step: one token (a decode row, which samples the next token) or several (a
prefill chunk, which samples only when it feeds the last one). So a 1-token prompt goes straight to decode
and a preempted sequence, recomputed, resumes where it was.

Each step, first come first served by arrival:
1. admission: waiting sequences take a free slot, or the slot of a resident sequence they extend (reuse),
   or evict the least recently used resident sequence;
2. decode: every sequence with one token to feed gets the page that token needs;
3. prefill: per lane, one chunk of the oldest sequence with a prompt to feed, at most `chunk` tokens and,
   while sequences decode, at most `budget` (with none decoding nothing waits on the step: a full chunk).
The step is one call: per lane a flat row of the decode tokens, one row each, then the chunk
(`paged.flat_layout`).
Pages come from the sequence's lane: a free one, else a resident sequence's (least recently used first),
else the newest running sequence of the lane newer than the one asking is preempted (its slot and pages
freed; it waits again and is recomputed from its tokens: nothing is lost). A decode row that still finds
no page preempts itself when it is the newest; a prefill chunk shrinks to the pages it got, or waits.

Conversation reuse: a finished sequence stays resident (its slot, pages and ring) in an LRU capped at
`resident_pages` pages. A new prompt whose tokens extend a resident sequence's fed tokens takes that slot
and prefills only the new tokens. It may also diverge from them in the last few tokens: the ring holds
`ring_slack` tokens more than the window, so rolling back by up to `ring_slack + 1` tokens keeps every key
the next token sees (the full layers keep everything anyway). A prompt equal to the fed tokens rolls back
one token, to get its logits.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time

import numpy as np

from ..sampling import pack_mask
from .requests import RequestHandle, Result, TextStream, TokenEvent, allowed_mask


def buckets(limit: int, smallest: int = 1, given=None, name: str = "buckets") -> tuple[int, ...]:
    """The compiled sizes of one dimension, up to `limit`: by default powers of two from `smallest`, then
    `limit`; `given` sizes are taken as they are (capped at `limit`, which is always added)."""
    if given is None:
        out, n = [], max(1, smallest)
        while n < limit:
            out.append(n)
            n *= 2
        return (*out, limit)
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in given):
        raise ValueError(f"{name} must be positive integers, got {given!r}")
    return tuple(sorted({min(b, limit) for b in given} | {limit}))


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    return next(b for b in sizes if b >= n)


@dataclasses.dataclass(eq=False)
class Seq:
    handle: RequestHandle
    arrival: int
    tokens: list[int]  # prompt, then generated
    prompt_len: int
    key: np.ndarray  # (2,) uint32 the request's key data
    text: TextStream | None
    slot: int = -1  # -1: waiting
    lane: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    length: int = 0  # tokens held in the cache
    ring_lo: int = 0
    cached: int = 0
    allowed: np.ndarray | None = None  # this step's allowed-token mask (None: any token)
    first_token: float | None = None
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.length

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclasses.dataclass(eq=False)
class Resident:
    """A finished sequence kept for reuse: its slot, pages and ring hold the KV of `fed`."""

    slot: int
    lane: int
    pages: list[int]
    fed: list[int]
    ring_lo: int


@dataclasses.dataclass
class Call:
    """A step's forward call: `arrays` go to the device (every process); `rows` (process 0 only) say which
    sequence each row is: (row, seq, tokens fed, samples, a decode row)."""

    arrays: dict[str, np.ndarray]
    rows: list[tuple[int, Seq, int, bool, bool]]


@dataclasses.dataclass
class Counters:
    reuse_hits: int = 0
    reuse_tokens: int = 0
    prefill_tokens: int = 0  # tokens fed to compute a prompt (or to recompute a preempted sequence)
    decode_tokens: int = 0  # generated tokens fed back
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    steps: int = 0


class Scheduler:
    def __init__(self, *, lanes: int, slots: int, pages: int, page_size: int, max_context: int, chunk: int,
                 budget: int, ring_len: int, window: int, vocab_size: int, eos: tuple[int, ...],
                 reuse: bool, resident_pages: int, max_top: int, seq_buckets=None, page_buckets=None,
                 token_buckets=None):  # fmt: skip
        self.lanes, self.page_size, self.max_context = lanes, page_size, max_context
        self.slots_per_lane, self.pages_per_lane = slots // lanes, pages // lanes
        self.chunk, self.budget, self.vocab_size, self.eos = chunk, budget, vocab_size, eos
        self.reuse, self.resident_cap, self.max_top = reuse, resident_pages, max_top
        self.ring_len = ring_len
        # a rollback by d tokens keeps the ring valid for the next token iff d <= ring - window + 1
        self.max_rollback = ring_len - window + 1 if ring_len else max_context
        self.seq_buckets = buckets(self.slots_per_lane, 1, seq_buckets, "seq_buckets")
        self.page_buckets = buckets(math.ceil(max_context / page_size), 1, page_buckets, "page_buckets")
        self.token_buckets = buckets(chunk, min(16, chunk), token_buckets, "token_buckets")
        self.waiting: list[Seq] = []
        self.running: dict[int, Seq] = {}  # slot -> seq
        self.resident: collections.OrderedDict[int, Resident] = collections.OrderedDict()  # LRU first
        self.free_slots = [list(range(lane * self.slots_per_lane, (lane + 1) * self.slots_per_lane))
                           for lane in range(lanes)]  # fmt: skip
        self.free_pages = [list(range(lane * self.pages_per_lane, (lane + 1) * self.pages_per_lane))
                           for lane in range(lanes)]  # fmt: skip
        self.counters = Counters()
        self.recent: collections.deque = collections.deque(maxlen=1024)  # (ttft, tpot) of finished requests

    # ------------------------------------------------------------------------------------------ state
    @property
    def pages_used(self) -> int:
        return self.lanes * self.pages_per_lane - sum(len(f) for f in self.free_pages)

    @property
    def resident_pages(self) -> int:
        return sum(len(r.pages) for r in self.resident.values())

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.arrival)

    def cancel(self, seq: Seq) -> None:
        """Drops a sequence wherever it is, freeing its slot and pages (its handle is already finished)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif self.running.get(seq.slot) is seq:
            self._release(seq)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self) -> Call | None:
        """This step's call: every decoding sequence's next token and at most one prefill chunk per lane,
        in one flat row per lane (None when nothing can run)."""
        self.counters.steps += 1
        self._admit()
        by_age = sorted(self.running.values(), key=lambda s: s.arrival)
        decode = []
        for s in by_age:
            if s.remaining == 1 and s.slot >= 0 and self._grow(s, s.length + 1, preempt_self=True):
                decode.append(s)
        # the budget keeps prefill from stalling decoding sequences; with none decoding, nothing can stall
        budget = self.budget if decode else max(self.budget, self.chunk)
        chunks = []
        for lane in range(self.lanes):
            for s in by_age:
                if s.lane == lane and s.slot >= 0 and s.remaining > 1:
                    want = min(s.remaining, self.chunk, budget)
                    n = min(want, self._grow(s, s.length + want) - s.length)
                    if n > 0:
                        chunks.append((s, n))
                        break
        # a chunk may have preempted a newer sequence; a failing allowed-tokens hook ends its own request
        decode = [(s, 1) for s in decode if s.slot >= 0 and self._mask(s, 1)]
        chunks = [(s, n) for s, n in chunks if s.slot >= 0 and self._mask(s, n)]
        return self._call(decode, chunks) if decode or chunks else None

    def _mask(self, s: Seq, n: int) -> bool:
        """Asks the request's allowed-tokens hook for the token this row samples (kept in `s.allowed`); a
        hook that fails or returns nonsense ends its own request ("error"), not the engine."""
        s.allowed = None
        hook = s.handle.options.allowed_tokens
        if hook is None or s.length + n != len(s.tokens):
            return True
        try:
            s.allowed = allowed_mask(hook(list(s.generated)), self.vocab_size)
            return True
        except Exception as e:  # noqa: BLE001 - the user's code: reported on its request
            why = f"allowed_tokens failed: {type(e).__name__}: {e}"
            s.handle._push(result=self._result(s, "error", error=why))
            self._release(s)
            return False

    def _admit(self) -> None:
        """Waiting sequences in arrival order take a slot while their lane has the pages their tokens need
        (free or held by resident sequences): admitting one that would at once preempt a newer one, or be
        preempted, only recomputes tokens. The first that cannot be placed stops the others (FCFS)."""
        while self.waiting:
            s = self.waiting[0]
            need = math.ceil((len(s.tokens) + 1) / self.page_size)
            match = self._match(s) if self.reuse and s.handle.options.reuse else None
            kept = math.ceil(match[1] / self.page_size) if match is not None else 0
            if match is not None and self._available(match[0].lane, match[0]) >= need - kept:
                self._take_resident(s, *match)
            else:
                lanes = [ln for ln in range(self.lanes) if self._available(ln) >= need and self._slot_in(ln)]
                if not lanes:
                    return
                lane = max(lanes, key=lambda ln: (len(self.free_slots[ln]) > 0, len(self.free_pages[ln])))
                if not self.free_slots[lane]:
                    self._evict(next(slot for slot, r in self.resident.items() if r.lane == lane))
                s.slot, s.lane = self.free_slots[lane].pop(0), lane
                s.pages, s.length, s.ring_lo = [], 0, 0
            self.waiting.pop(0)
            self.running[s.slot] = s

    def _slot_in(self, lane: int) -> bool:
        return bool(self.free_slots[lane]) or any(r.lane == lane for r in self.resident.values())

    def _available(self, lane: int, keep: Resident | None = None) -> int:
        """Pages a new sequence could get in `lane`: free, or held by resident sequences (but `keep`)."""
        held = sum(len(r.pages) for r in self.resident.values() if r.lane == lane and r is not keep)
        return len(self.free_pages[lane]) + held

    def _match(self, s: Seq) -> tuple[Resident, int] | None:
        best = None
        for r in self.resident.values():
            n = min(len(r.fed), len(s.tokens) - 1)
            common = next((i for i in range(n) if r.fed[i] != s.tokens[i]), n)
            ok = common >= 1 and len(r.fed) - common <= self.max_rollback
            if ok and (best is None or common > best[1]):
                best = (r, common)
        return best

    def _take_resident(self, s: Seq, r: Resident, common: int) -> None:
        del self.resident[r.slot]
        keep = math.ceil(common / self.page_size)
        self.free_pages[r.lane].extend(r.pages[keep:])
        rollback = len(r.fed) - common
        s.slot, s.lane, s.pages, s.length = r.slot, r.lane, r.pages[:keep], common
        s.ring_lo = max(r.ring_lo, len(r.fed) - self.ring_len) if rollback else r.ring_lo
        s.cached = min(common, s.prompt_len)
        self.counters.reuse_hits += 1
        self.counters.reuse_tokens += common

    def _grow(self, s: Seq, upto: int, *, preempt_self: bool = False) -> int:
        """Takes pages until `s` can hold `upto` tokens (or none are left to take); returns how many it can
        hold. With `preempt_self`, a sequence that is the newest of its lane and still short is preempted."""
        need = math.ceil(upto / self.page_size) - len(s.pages)
        while need > 0:
            free = self.free_pages[s.lane]
            if free:
                s.pages.append(free.pop(0))
                need -= 1
                continue
            lru = next((slot for slot, r in self.resident.items() if r.lane == s.lane), None)
            if lru is not None:
                self._evict(lru)
                continue
            newer = [o for o in self.running.values() if o.lane == s.lane and o.arrival > s.arrival]
            if newer:
                self._preempt(max(newer, key=lambda o: o.arrival))
                continue
            if preempt_self:
                self._preempt(s)
                return 0
            break
        return len(s.pages) * self.page_size

    def _preempt(self, s: Seq) -> None:
        self._release(s)
        s.length, s.ring_lo = 0, 0
        self.add(s)
        self.counters.preemptions += 1

    def _release(self, s: Seq) -> None:
        del self.running[s.slot]
        self.free_slots[s.lane].append(s.slot)
        self.free_pages[s.lane].extend(s.pages)
        s.slot, s.lane, s.pages = -1, -1, []

    def _evict(self, slot: int) -> None:
        r = self.resident.pop(slot)
        self.free_slots[r.lane].append(slot)
        self.free_pages[r.lane].extend(r.pages)

    # ------------------------------------------------------------------------------------ the arrays
    def empty_call(self, n_dec: int, T: int, NP: int) -> dict[str, np.ndarray]:
        """The arrays of a call of n_dec decode rows and a T-token chunk per lane, NP pages per row, every row
        padding (writes nothing). Rows are lane-major, n_dec + 1 per lane, the chunk last (`flat_layout`)."""
        B = self.lanes * (n_dec + 1)  # rows of the call
        return {"tokens": np.zeros((self.lanes, n_dec + T), np.int32), "n_new": np.zeros(B, np.int32),
                "rows": np.full(B, self.slots_per_lane, np.int32),
                "pages": np.full((B, NP), self.pages_per_lane, np.int32),
                "start": np.zeros(B, np.int32), "ring_lo": np.zeros(B, np.int32),
                "temperature": np.zeros(B, np.float32), "top_k": np.zeros(B, np.int32),
                "top_p": np.ones(B, np.float32), "min_p": np.zeros(B, np.float32),
                "keys": np.zeros((B, 2), np.uint32), "index": np.zeros(B, np.int32),
                "logprobs": np.zeros((), bool)}  # fmt: skip

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (decode rows, chunk tokens, pages) a call can have, per lane: what the warm-up compiles. A
        chunk longer than the budget runs only when nothing decodes (the fewest decode rows)."""
        beside = bucket(min(self.budget, self.chunk), self.token_buckets)
        return [(n_dec, T, NP) for n_dec in self.seq_buckets for T in (0, *self.token_buckets)
                if T <= beside or n_dec == self.seq_buckets[0] for NP in self.page_buckets]  # fmt: skip

    def _call(self, decode: list[tuple[Seq, int]], chunks: list[tuple[Seq, int]]) -> Call:
        per_lane = [[s for s, _ in decode if s.lane == lane] for lane in range(self.lanes)]
        n_dec = bucket(max(1, *map(len, per_lane)), self.seq_buckets)
        T = bucket(max(n for _, n in chunks), self.token_buckets) if chunks else 0
        pages = max(math.ceil((s.length + n) / self.page_size) for s, n in decode + chunks)
        NP = bucket(pages, self.page_buckets)
        a = self.empty_call(n_dec, T, NP)
        masks, out = {}, []
        rows = [(lane * (n_dec + 1) + i, s, 1, True)
                for lane, ss in enumerate(per_lane) for i, s in enumerate(ss)]  # fmt: skip
        rows += [(s.lane * (n_dec + 1) + n_dec, s, n, False) for s, n in chunks]
        for row, s, n, is_decode in rows:
            lane = s.lane
            col = row - lane * (n_dec + 1)  # the row's first token in its lane's flat row
            a["tokens"][lane, col : col + n] = s.tokens[s.length : s.length + n]
            a["n_new"][row], a["start"][row], a["ring_lo"][row] = n, s.length, s.ring_lo
            a["rows"][row] = s.slot - lane * self.slots_per_lane
            a["pages"][row, : len(s.pages)] = np.asarray(s.pages, np.int32) - lane * self.pages_per_lane
            samples = s.length + n == len(s.tokens)
            if samples:
                o = s.handle.options
                a["temperature"][row], a["top_k"][row], a["top_p"][row], a["min_p"][row] = (
                    o.temperature, o.top_k, o.top_p, o.min_p)  # fmt: skip
                a["keys"][row], a["index"][row] = s.key, len(s.tokens) - s.prompt_len
                a["logprobs"] |= o.logprobs
                if s.allowed is not None:
                    masks[row] = s.allowed
            out.append((row, s, n, samples, is_decode))
        if masks:
            allowed = np.ones((len(a["rows"]), self.vocab_size), bool)
            for row, m in masks.items():
                allowed[row] = m
            a["mask"] = pack_mask(allowed)
        return Call(a, out)

    # ----------------------------------------------------------------------------------------- commit
    def commit(self, call: Call, out: tuple[np.ndarray, ...]) -> None:
        """Takes the call's (tokens, logprobs, top ids, top logprobs) per row and advances its sequences."""
        now = time.perf_counter()
        toks, lps, top_ids, top_lps = out
        for row, s, n, samples, is_decode in call.rows:
            if self.running.get(s.slot) is not s:
                continue
            if is_decode and s.generated:
                self.counters.decode_tokens += 1
            else:
                self.counters.prefill_tokens += n
            s.length += n
            if samples:
                self._emit(s, int(toks[row]), float(lps[row]), top_ids[row], top_lps[row], now)

    def _emit(self, s: Seq, tok: int, lp: float, top_ids, top_lps, now: float) -> None:
        o, h = s.handle.options, s.handle
        s.tokens.append(tok)
        self.counters.generated_tokens += 1
        if s.first_token is None:
            s.first_token = now
        if h.done:  # cancelled: the next step frees it
            return
        text, stop_str = s.text.add(tok) if s.text is not None else ("", None)
        top = tuple(zip(top_ids[: o.top_logprobs].tolist(), top_lps[: o.top_logprobs].tolist()))
        ev = TokenEvent(tok, text, lp if o.logprobs else None, top)
        if o.logprobs:
            s.logprobs.append(lp)
            s.top.append(top)
        stops = self.eos if o.stop_token_ids is None else o.stop_token_ids
        reason, stop = None, None
        if tok in stops:
            reason, stop = "stop", tok
        elif stop_str is not None:
            reason, stop = "stop", stop_str
        elif len(s.generated) >= o.max_tokens or len(s.tokens) >= self.max_context:
            reason = "length"
        if reason is None:
            h._push(ev)
            return
        if s.text is not None and stop_str is None:
            ev = dataclasses.replace(ev, text=ev.text + s.text.finish())
        h._push(ev, self._result(s, reason, stop, now))
        self._finish(s)

    def _result(self, s: Seq, reason: str, stop=None, now: float | None = None, error: str | None = None):
        h = s.handle
        ttft = None if s.first_token is None else s.first_token - h.submitted
        n = len(s.generated)
        tpot = None
        if now is not None and s.first_token is not None and n > 1:
            tpot = (now - s.first_token) / (n - 1)
        if reason in ("stop", "length"):
            self.counters.finished += 1
            self.recent.append((now, ttft, tpot, n))
        return Result(tokens=list(s.generated), text=s.text.text if s.text is not None else "",
                      finish_reason=reason, prompt_tokens=s.prompt_len, cached_tokens=s.cached, seed=h.seed,
                      ttft=ttft, tpot=tpot, logprobs=list(s.logprobs) if h.options.logprobs else None,
                      top_logprobs=list(s.top) if h.options.logprobs and h.options.top_logprobs else None,
                      stop=stop, error=error)  # fmt: skip

    def _finish(self, s: Seq) -> None:
        """A finished sequence stays resident for reuse (LRU, capped), or frees its slot and pages."""
        slot, lane, pages = s.slot, s.lane, s.pages
        del self.running[slot]
        s.slot, s.lane, s.pages = -1, -1, []
        if not (self.reuse and self.resident_cap > 0 and s.length):
            self.free_slots[lane].append(slot)
            self.free_pages[lane].extend(pages)
            return
        self.resident[slot] = Resident(slot, lane, pages, s.tokens[: s.length], s.ring_lo)
        while self.resident and self.resident_pages > self.resident_cap:
            self._evict(next(iter(self.resident)))

    def fail_all(self, message: str) -> None:
        """Finishes every request with an error (the engine cannot go on) and frees everything."""
        for s in list(self.running.values()) + list(self.waiting):
            s.handle._push(result=self._result(s, "error", error=message))
            self.cancel(s)
