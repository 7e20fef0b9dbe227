"""Host-side scheduling: admission, pages, the prefix cache, preemption, and each step's plan.

No device work here: `Scheduler.plan()` decides a step and returns its one call as numpy arrays (the same
plan every process runs), `Scheduler.commit()` takes the sampled tokens back and streams them to the
handles.

A sequence's `length` tokens are in the cache, `tokens` are all it knows (prompt, then generated). What it
still has to feed decides what it does in a step: one token (a decode row, which samples the next token) or
several (a prefill chunk, which samples only when it feeds the last one). So a 1-token prompt goes straight
to decode and a preempted sequence, recomputed, resumes where it was.

Pages (`engine.paged`). A sequence's tokens sit in blocks of `page_size` positions; block i holds a full
page (positions i * page_size ...) and, while some sequence's window or a prefix hit may need it, a
sliding page. Every block of a lane's sequences lives in that lane's prefix tree: a full block is a node
keyed by its tokens under its parent, a partial one (the tail of a sequence) hangs under its parent too. A
running sequence holds references (`users`) on its blocks and (`sliding_users`) on the sliding pages of
the blocks its window covers; pages nobody references stay in the tree as the cache, evictable.

Prefix cache (exact). When a sequence is about to compute and has computed nothing since its last match,
its tokens are looked up in the tree: the longest path of full blocks, then the longest shared start of
one more block (a child or a tail: the hit may end mid-page). A hit at position p reuses positions < p,
which needs (1) the full pages of blocks 0 .. (p - 1) // page and (2) the sliding pages of the blocks
holding positions p - window + 1 .. p - 1 (the keys the first new token sees on sliding layers): if one is
missing (evicted), p moves back to the start of that block and is checked again. The path's blocks are
shared (references); a partial last block is copied (copy-on-write: a new page, filled on device before the
step's writes) since the sequence will write its next positions there. Every hit is at most the prompt
minus its last token, whose logits the sequence must compute. The sequence then computes the rest exactly
as it would have (same positions, same keys), so its tokens are those of a cold start.

Why sliding layers stay exact: a sequence writes the keys and values of EVERY position into its sliding
pages (not a ring), and only releases a page when its window moved past it; a released page stays in the
tree (cached) until evicted, so a hit at any position p finds the window before p as long as those pages
survive, and the check above never lets a hit use a window that did not.

Eviction: LRU over what nobody references, oldest release first: a block's sliding page (released when
the window passed it, usually long before the sequence ends) or a whole leaf block (released when its
sequence ended or was preempted; evicting it may make its parent a leaf). Sliding pages deep inside a long
unbranched path go before the others (`_keep`): hits land near where a cached sequence ended or where
prompts diverged, so the windows there are the ones worth keeping; pure LRU threw away every window before
any full page and left cached prefixes unhittable. Cached pages never block
anything: pages are taken from the free list, then by evicting, and only then does a sequence wait or
preempt another.

Each step, first come first served by arrival:
1. admission: a waiting sequence takes a slot when its lane has the pages its tokens need (free or
   cached); the first that cannot be placed holds the queue;
2. decode: every sequence with one token to feed gets the pages that token needs;
3. prefill: per lane, one chunk of the oldest sequence with a prompt to feed (after its prefix match), at
   most `chunk` tokens and, while sequences decode, at most `budget` (with none decoding, a full chunk).
The step is one call: per lane a flat row of the decode tokens, one row each, then the chunk
(`paged.flat_layout`). A sequence that finds no page preempts the newest running sequence of its lane
newer than itself (its references are dropped, its blocks stay cached, it waits again and is recomputed
from its tokens, mostly by hitting them); a decode row that still finds none preempts itself, or, alone
in its lane, ends with "length" (the pool holds no more); a prefill chunk shrinks to the pages it got.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import math
import time

import numpy as np

from ..sampling import pack_mask
from .requests import RequestHandle, Result, TextStream, TokenEvent, allowed_mask

COPIES = 2  # page copies per lane and call: one copy-on-write (a full and a sliding page) per step


def buckets(
    limit: int, smallest: int = 1, given=None, name: str = "buckets", factor: int = 2
) -> tuple[int, ...]:
    """The compiled sizes of one dimension, up to `limit`: by default powers of `factor` from `smallest`,
    then `limit`; `given` sizes are taken as they are (capped at `limit`, which is always added)."""
    if given is None:
        out, n = [], max(1, smallest)
        while n < limit:
            out.append(n)
            n *= factor
        return (*out, limit)
    if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in given):
        raise ValueError(f"{name} must be positive integers, got {given!r}")
    return tuple(sorted({min(b, limit) for b in given} | {limit}))


def bucket(n: int, sizes: tuple[int, ...]) -> int:
    return next(b for b in sizes if b >= n)


class Block:
    """`page_size` positions of one sequence's tokens (fewer in a tail): their full page and sliding page
    (ids into the pool, None when the model has no such layers or the page was evicted), and the block's
    place in its lane's prefix tree."""

    __slots__ = ("children", "full", "in_tree", "key", "parent", "partials", "sliding", "sliding_stamp",
                 "sliding_users", "stamp", "tokens", "users")  # fmt: skip

    def __init__(self, full=None, sliding=None, tokens=None):
        self.full, self.sliding = full, sliding
        self.tokens: list[int] = [] if tokens is None else tokens  # whose keys are computed here
        self.parent: Block | None = None
        self.children: dict[bytes, Block] = {}  # full blocks that follow, by their tokens
        self.partials: list[Block] = []  # tails that follow
        self.key: bytes | None = None
        self.users = self.sliding_users = 0  # running sequences referencing the block / its sliding page
        self.stamp = self.sliding_stamp = 0  # when they last dropped to 0 (LRU)
        self.in_tree = False

    def leaf(self) -> bool:
        return not self.children and not self.partials


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
    blocks: list[Block] = dataclasses.field(default_factory=list)
    full_ids: np.ndarray | None = None  # full page of each block
    length: int = 0  # tokens held in the cache
    hit: int = 0  # length given by the last prefix match (== length: nothing computed since)
    swin: int = 0  # first block whose sliding page it references
    settled: int = 0  # blocks[:settled] are full blocks of the tree (or its own, when detached)
    detached: bool = False  # its blocks stay out of the tree (a duplicate, or prefix caching off)
    started: bool = False
    cached: int = 0
    allowed: np.ndarray | None = None  # this step's allowed-token mask (None: any token)
    first_token: float | None = None
    adapter: int = 0  # the prefix cache's key of its adapter (0: none): trees never mix adapters
    lora_slot: int = 0  # its adapter's slot in the engine's pool (0: none)
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.length

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Lane:
    """One data shard's pages and prefix tree."""

    def __init__(self, pages: range, slots: range):
        self.free = list(reversed(pages))  # taken from the end
        self.slots = list(reversed(slots))
        self.roots: dict[int, Block] = {}  # a prefix tree per adapter (0: the base model)
        self.heap: list = []  # (stamp, n, kind, block): eviction candidates, checked when popped
        self.pinned = 0  # pages referenced by running sequences

    def root(self, adapter: int) -> Block:
        """The root of the prefix tree of `adapter`'s sequences: keys computed with one adapter are never
        another's (nor the base model's)."""
        if adapter not in self.roots:
            self.roots[adapter] = Block()
            self.roots[adapter].in_tree = True
        return self.roots[adapter]


@dataclasses.dataclass
class Call:
    """A step's forward call: `arrays` go to the device (every process); `rows` (process 0 only) say which
    sequence each row is: (row, seq, tokens fed, samples, a decode row)."""

    arrays: dict[str, np.ndarray]
    rows: list[tuple[int, Seq, int, bool, bool]]


@dataclasses.dataclass
class Counters:
    prefix_hits: int = 0  # prompts that reused cached tokens
    prefix_hit_tokens: int = 0  # tokens not computed thanks to them
    evicted_pages: int = 0
    prefill_tokens: int = 0  # tokens fed to compute a prompt (or to recompute a preempted sequence)
    decode_tokens: int = 0  # generated tokens fed back
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    steps: int = 0
    adapter_tokens: dict[int, int] = dataclasses.field(default_factory=dict)  # adapter key -> generated


class Scheduler:
    def __init__(self, *, lanes: int, slots: int, pages: int, page_size: int, max_context: int, chunk: int,
                 budget: int, kinds: tuple[bool, ...], window: int, vocab_size: int, eos: tuple[int, ...],
                 prefix_cache: bool, max_top: int, seq_buckets=None, token_buckets=None):  # fmt: skip
        self.lanes, self.page_size, self.max_context = lanes, page_size, max_context
        self.slots_per_lane, self.pages_per_lane = slots // lanes, pages // lanes
        self.chunk, self.budget, self.vocab_size, self.eos = chunk, budget, vocab_size, eos
        self.prefix_cache, self.max_top = prefix_cache, max_top
        self.has_full, self.has_sliding = False in kinds, True in kinds
        self.window = window if self.has_sliding else 0
        self.per_block = self.has_full + self.has_sliding  # pages a new block takes
        self.max_blocks = math.ceil(max_context / page_size)
        self.seq_buckets = buckets(self.slots_per_lane, 1, seq_buckets, "seq_buckets")
        # chunk tokens go by powers of 4 (16, 64, 256, chunk): every bucket is a program per decode bucket, and
        # the compile of each is what `serve`'s start waits for; a chunk pads to at most 4x its tokens
        self.token_buckets = buckets(chunk, min(16, chunk), token_buckets, "token_buckets", factor=4)
        self.waiting: list[Seq] = []
        self.running: dict[int, Seq] = {}  # slot -> seq
        self.lane = [Lane(range(ln * self.pages_per_lane, (ln + 1) * self.pages_per_lane),
                          range(ln * self.slots_per_lane, (ln + 1) * self.slots_per_lane))
                     for ln in range(lanes)]  # fmt: skip
        self.counters = Counters()
        self.recent: collections.deque = collections.deque(maxlen=1024)  # (time, ttft, tpot, n) when finished
        self._clock = itertools.count(1)
        self._copies: list[list[tuple[int, int]]] = [[] for _ in range(lanes)]

    # ------------------------------------------------------------------------------------------ state
    @property
    def pages_used(self) -> int:
        """Pages referenced by running sequences."""
        return sum(ln.pinned for ln in self.lane)

    @property
    def pages_free(self) -> int:
        return sum(len(ln.free) for ln in self.lane)

    @property
    def pages_cached(self) -> int:
        """Pages nobody references, kept for prefix hits (evictable)."""
        return self.lanes * self.pages_per_lane - self.pages_used - self.pages_free

    def available(self, lane: int) -> int:
        """Pages a sequence of `lane` could get: free or cached."""
        return self.pages_per_lane - self.lane[lane].pinned

    def pages_for(self, tokens: int) -> int:
        """Pages a sequence of `tokens` tokens holds at most while computed alone (`paged.pages_for`)."""
        blocks = math.ceil(tokens / self.page_size)
        sliding = min(blocks, math.ceil((self.window - 1 + self.chunk) / self.page_size) + 1)
        return blocks * self.has_full + sliding * self.has_sliding

    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.arrival)

    def cancel(self, seq: Seq) -> None:
        """Drops a sequence wherever it is, freeing its slot and references (its handle is already
        finished)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif self.running.get(seq.slot) is seq:
            self._release(seq)

    # ------------------------------------------------------------------------------------------ plan
    def plan(self) -> Call | None:
        """This step's call: every decoding sequence's next token and at most one prefill chunk per lane,
        in one flat row per lane (None when nothing can run)."""
        self.counters.steps += 1
        self._copies = [[] for _ in range(self.lanes)]
        self._admit()
        by_age = sorted(self.running.values(), key=lambda s: s.arrival)
        decode = []
        for s in by_age:
            if s.slot >= 0 and s.remaining == 1 and self._grow(s, s.length + 1, decode=True) > s.length:
                decode.append(s)
        # the budget keeps prefill from stalling decoding sequences; with none decoding, nothing can stall
        budget = self.budget if decode else max(self.budget, self.chunk)
        chunks = []
        for lane in range(self.lanes):
            for s in by_age:
                if s.lane == lane and s.slot >= 0 and s.remaining > 1:
                    self._start(s)
                    want = min(s.remaining, self.chunk, budget)
                    n = min(want, self._grow(s, s.length + want) - s.length)
                    if n > 0:
                        chunks.append((s, n))
                    break
        # a chunk may have preempted a newer sequence; a failing allowed-tokens hook ends its own request
        decode = [(s, 1) for s in decode if s.slot >= 0 and self._mask(s, 1)]
        chunks = [(s, n) for s, n in chunks if s.slot >= 0 and self._mask(s, n)]
        if not decode and not chunks and not any(self._copies):
            return None
        return self._call(decode, chunks)

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
        (free or cached; a prefix hit may need fewer, never more): admitting one that would at once preempt
        a newer one, or be preempted, only recomputes tokens. The first that cannot be placed stops the
        others (FCFS)."""
        while self.waiting:
            s = self.waiting[0]
            need = self.pages_for(len(s.tokens) + 1)
            fits = [ln for ln in range(self.lanes) if self.lane[ln].slots and self.available(ln) >= need]
            if not fits:
                return
            if len(fits) > 1 and self.prefix_cache and s.handle.options.reuse:  # the lane holding its prefix
                lane = max(fits, key=lambda ln: (self._full_match(ln, s), self.available(ln)))
            else:
                lane = max(fits, key=self.available)
            self.waiting.pop(0)
            s.slot, s.lane = self.lane[lane].slots.pop(), lane
            s.blocks, s.length, s.hit, s.swin, s.settled = [], 0, 0, 0, 0
            s.detached = not self.prefix_cache
            if s.full_ids is None:
                s.full_ids = np.zeros(self.max_blocks, np.int32)
            self.running[s.slot] = s

    # -------------------------------------------------------------------------------- prefix cache
    def _full_match(self, lane: int, s: Seq) -> int:
        """Full blocks of the sequence's tokens (all but the last token) on a path of the lane's tree."""
        ps, node, i = self.page_size, self.lane[lane].root(s.adapter), 0
        arr = np.asarray(s.tokens[: len(s.tokens) - 1], np.int32)
        while (i + 1) * ps <= len(arr):
            node = node.children.get(arr[i * ps : (i + 1) * ps].tobytes())
            if node is None:
                break
            i += 1
        return i

    def _match(self, lane: int, tokens: list[int], adapter: int = 0) -> tuple[list[Block], Block | None, int]:
        """The longest cached prefix of `tokens` but its last token in `adapter`'s tree: (path of full
        blocks, the block a partial extension shares its first tokens with or None, hit length)."""
        ps, node, path = self.page_size, self.lane[lane].root(adapter), []
        limit = len(tokens) - 1
        arr = np.asarray(tokens[:limit], np.int32)
        while (len(path) + 1) * ps <= limit:
            i = len(path)
            child = node.children.get(arr[i * ps : (i + 1) * ps].tobytes())
            if child is None:
                break
            path.append(child)
            node = child
        p = len(path) * ps
        nxt = tokens[p : min(p + ps, limit)]
        best, ext = None, 0
        for cand in itertools.chain(node.children.values(), node.partials):
            t = cand.tokens
            n = 0
            while n < len(nxt) and n < len(t) and t[n] == nxt[n]:
                n += 1
            if n > ext:
                best, ext = cand, n
        return path, best, p + ext

    def _usable(self, path: list[Block], donor: Block | None, p: int) -> int:
        """The largest hit <= p whose sliding window survives: the sliding pages of the blocks holding
        positions p - window + 1 .. p - 1 (module docstring)."""
        ps, W = self.page_size, self.window
        if not W:
            return p
        while p > 0:
            lo, hi = max(0, p - W + 1) // ps, (p - 1) // ps
            miss = next((b for b in range(hi, lo - 1, -1)
                         if (path[b] if b < len(path) else donor).sliding is None), None)  # fmt: skip
            if miss is None:
                return p
            p = miss * ps  # the missing block's keys are not needed from its first position on
        return 0

    def _start(self, s: Seq) -> None:
        """The prefix match of a sequence about to compute (nothing computed since its last match): takes
        the hit when it is longer than what the sequence holds."""
        if s.detached or not s.handle.options.reuse or s.length != s.hit:
            return
        ps = self.page_size
        path, donor, p = self._match(s.lane, s.tokens, s.adapter)
        p = self._usable(path, donor, p)
        if p <= s.length:
            return
        # the hit's blocks are referenced before any page is taken for the copy (taking may evict)
        old, old_swin, old_len = s.blocks, s.swin, s.length
        swin = self._hold(path, p)
        cow = None
        if p % ps:
            parent = path[p // ps - 1] if p >= ps else self.lane[s.lane].root(s.adapter)
            cow = self._copy_block(s.lane, donor, s.tokens[p - p % ps : p], parent)
            if cow is None:  # no room for the copy this step: the hit ends at the page boundary
                self._let_go(s.lane, path, p, swin)
                p = self._usable(path, None, p - p % ps)
                if p <= s.length:
                    return
                swin = self._hold(path, p)
        for i, b in enumerate(old):
            if i >= old_swin:
                self._drop_sliding(s.lane, b)
            self._drop(s.lane, b)
        s.blocks = path[: p // ps] + ([cow] if cow is not None else [])
        s.swin = swin
        if self.has_full:
            s.full_ids[: len(s.blocks)] = [b.full for b in s.blocks]
        s.length = s.hit = p
        s.settled = p // ps
        if old_len == 0:
            self.counters.prefix_hits += 1
        self.counters.prefix_hit_tokens += p - old_len
        if not s.started:
            s.cached = min(p, s.prompt_len)

    def _hold(self, path: list[Block], p: int) -> int:
        """References the full blocks a hit at p shares and the sliding pages of those its window covers;
        returns the first of these."""
        m = p // self.page_size
        swin = max(0, p - self.window + 1) // self.page_size if self.window else m
        for b in path[:m]:
            self._use(b)
        for b in path[swin:m]:
            self._use_sliding(b)
        return swin

    def _let_go(self, lane: int, path: list[Block], p: int, swin: int) -> None:
        m = p // self.page_size
        for i, b in enumerate(path[:m]):
            if i >= swin:
                self._drop_sliding(lane, b)
            self._drop(lane, b)

    def _copy_block(self, lane: int, donor: Block, tokens: list[int], parent: Block) -> Block | None:
        """A copy of `donor`'s pages for a sequence continuing after its first len(tokens) positions (copy on
        write: the copy runs on device before this step's writes), in the tree beside the donor; None when
        no copy fits this step or no page is left."""
        if len(self._copies[lane]) + self.per_block > COPIES:
            return None
        self._use(donor)  # pinned while pages are taken: evicting it now would lose what is copied
        self._use_sliding(donor)
        pages = self._take(lane, self.per_block)
        self._drop_sliding(lane, donor)
        self._drop(lane, donor)
        if pages is None:
            return None
        b = self._new_block(lane, pages)
        b.tokens = list(tokens)
        for src, dst in ((donor.full, b.full), (donor.sliding, b.sliding)):
            if dst is not None:
                self._copies[lane].append((src, dst))
        b.parent, b.in_tree = parent, True
        parent.partials.append(b)
        return b

    # ---------------------------------------------------------------------------------- references
    def _use(self, b: Block) -> None:
        b.users += 1
        if b.users == 1 and b.full is not None:
            self._lane_of_block_pin(b, 1)

    def _use_sliding(self, b: Block) -> None:
        if not self.has_sliding:
            return
        b.sliding_users += 1
        if b.sliding_users == 1 and b.sliding is not None:
            self._lane_of_block_pin(b, 1)

    def _lane_of_block_pin(self, b: Block, d: int) -> None:
        page = b.full if b.full is not None else b.sliding
        self.lane[page // self.pages_per_lane].pinned += d

    def _drop(self, lane: int, b: Block) -> None:
        """Drops a running sequence's reference on a block: a block out of the tree is freed, one in the
        tree becomes cached (a leaf becomes an eviction candidate)."""
        b.users -= 1
        if b.users:
            return
        ln = self.lane[lane]
        if b.full is not None:
            ln.pinned -= 1
        if not b.in_tree:
            self._free(ln, b)
            return
        b.stamp = next(self._clock)
        if b.leaf():
            self._push(ln, (1, b.stamp, next(self._clock), "leaf", b))

    def _drop_sliding(self, lane: int, b: Block) -> None:
        if not self.has_sliding:
            return
        b.sliding_users -= 1
        if b.sliding_users or b.sliding is None:
            return
        ln = self.lane[lane]
        ln.pinned -= 1
        if not b.in_tree:
            ln.free.append(b.sliding)
            b.sliding = None
            return
        b.sliding_stamp = next(self._clock)
        self._push(ln, (self._keep(b), b.sliding_stamp, next(self._clock), "sliding", b))

    def _unlink(self, ln: Lane, b: Block) -> None:
        if not b.in_tree:
            return
        parent = b.parent
        if b.key is not None:
            del parent.children[b.key]
        else:
            parent.partials.remove(b)
        b.in_tree, b.parent, b.key = False, None, None
        if parent.parent is not None and parent.users == 0 and parent.leaf():  # not a root
            self._push(ln, (1, parent.stamp, next(self._clock), "leaf", parent))

    def _free(self, ln: Lane, b: Block) -> int:
        n = 0
        for page in (b.full, b.sliding):
            if page is not None:
                ln.free.append(page)
                n += 1
        b.full = b.sliding = None
        return n

    def _push(self, ln: Lane, entry: tuple) -> None:
        """An eviction candidate. Entries go stale (the block was used again, or evicted) and are skipped when
        popped; when they outnumber what could be valid (two per page), the heap keeps only valid ones."""
        heapq.heappush(ln.heap, entry)
        if len(ln.heap) > 2 * self.pages_per_lane + 1024:
            ln.heap = [e for e in ln.heap if self._candidate(e)]
            heapq.heapify(ln.heap)

    @staticmethod
    def _candidate(entry: tuple) -> bool:
        """Whether a heap entry still names something evictable (its class may have changed: checked when
        popped)."""
        _, stamp, _, kind, b = entry
        if kind == "leaf":
            return b.in_tree and b.users == 0 and b.leaf() and b.stamp == stamp
        return b.in_tree and b.sliding is not None and b.sliding_users == 0 and b.sliding_stamp == stamp

    def _keep(self, b: Block) -> int:
        """1 when b's sliding page serves a likely hit: b is within a window of a leaf (where a cached
        sequence ended: its continuation) or of a branch (where prompts diverged before: a shared prefix);
        0 for one inside a long unbranched path, evicted first."""
        depth = math.ceil((self.window - 1) / self.page_size)
        level = [b]
        for _ in range(depth + 1):
            nxt = []
            for n in level:
                kids = len(n.children) + len(n.partials)
                if kids != 1:
                    return 1
                nxt.extend(n.children.values() or n.partials)
            level = nxt
        return 0

    def _evict_one(self, lane: int) -> bool:
        """Evicts a cached unit of the lane nobody references, least recently released first: a sliding page
        (those deep inside a long path before the others, `_keep`), or a leaf block."""
        ln = self.lane[lane]
        while ln.heap:
            entry = heapq.heappop(ln.heap)
            keep, stamp, _, kind, b = entry
            if not self._candidate(entry):
                continue
            if kind == "leaf":
                self._unlink(ln, b)
                self.counters.evicted_pages += self._free(ln, b)
                return True
            now = self._keep(b)
            if now != keep:  # the tree changed around it since: back in line where it belongs now
                heapq.heappush(ln.heap, (now, stamp, next(self._clock), kind, b))
                continue
            ln.free.append(b.sliding)
            b.sliding = None
            self.counters.evicted_pages += 1
            return True
        return False

    def _take(self, lane: int, n: int) -> list[int] | None:
        """n free pages of the lane, evicting cached ones as needed; None (nothing taken) if there are not
        that many."""
        ln = self.lane[lane]
        while len(ln.free) < n:
            if not self._evict_one(lane):
                return None
        return [ln.free.pop() for _ in range(n)]

    def _new_block(self, lane: int, pages: list[int]) -> Block:
        """A block referenced by one running sequence (its full and its sliding page pinned)."""
        b = Block(pages[0] if self.has_full else None, pages[-1] if self.has_sliding else None)
        b.users = 1
        b.sliding_users = int(self.has_sliding)
        self.lane[lane].pinned += len(pages)
        return b

    # ---------------------------------------------------------------------------------------- growth
    def _grow(self, s: Seq, upto: int, *, decode: bool = False) -> int:
        """Gives `s` the blocks positions < upto need (free pages, else cached ones, else a newer sequence
        of its lane is preempted); returns how many positions it can hold. A decode row that still finds
        none preempts itself, or ends ("length") when it is alone in its lane: the pool holds no more."""
        need = math.ceil(upto / self.page_size) - len(s.blocks)
        while need > 0:
            pages = self._take(s.lane, self.per_block)
            if pages is None:
                newer = [o for o in self.running.values() if o.lane == s.lane and o.arrival > s.arrival]
                if newer:
                    self._preempt(max(newer, key=lambda o: o.arrival))
                    continue
                if decode:
                    if any(o.lane == s.lane and o is not s for o in self.running.values()):
                        self._preempt(s)
                    else:
                        s.handle._push(result=self._result(s, "length", now=time.perf_counter()))
                        self._finish(s)
                    return 0
                break
            b = self._new_block(s.lane, pages)
            if self.has_full:
                s.full_ids[len(s.blocks)] = b.full
            s.blocks.append(b)
            need -= 1
        return len(s.blocks) * self.page_size

    def _preempt(self, s: Seq) -> None:
        self._release(s)
        s.length = s.hit = 0
        self.add(s)
        self.counters.preemptions += 1

    def _release(self, s: Seq) -> None:
        """Drops every reference of a running sequence and frees its slot: its blocks stay cached."""
        for i, b in enumerate(s.blocks):
            if i >= s.swin:
                self._drop_sliding(s.lane, b)
            self._drop(s.lane, b)
        del self.running[s.slot]
        self.lane[s.lane].slots.append(s.slot)
        s.slot, s.lane, s.blocks = -1, -1, []

    def _settle(self, s: Seq) -> None:
        """Puts the blocks the last call filled into the tree: a full block under its parent by its tokens
        (when an equal one is already there, the sequence keeps its own: detached, out of the tree), a tail
        among its parent's partials."""
        ps, root = self.page_size, self.lane[s.lane].root(s.adapter)
        while s.settled < len(s.blocks):
            b = s.blocks[s.settled]
            parent = s.blocks[s.settled - 1] if s.settled else root
            if len(b.tokens) < ps:
                if b.tokens and not b.in_tree and not s.detached:
                    b.parent, b.in_tree = parent, True
                    parent.partials.append(b)
                return
            if not s.detached:
                if b.in_tree:
                    parent.partials.remove(b)
                key = np.asarray(b.tokens, np.int32).tobytes()
                if key in parent.children:
                    b.in_tree, b.parent = False, None
                    s.detached = True
                else:
                    parent.children[key] = b
                    b.key, b.parent, b.in_tree = key, parent, True
            s.settled += 1

    # ------------------------------------------------------------------------------------ the arrays
    def slide_width(self, T: int) -> int:
        """Sliding pages a row of a call with a T-token chunk may attend over: the window before its first
        token and its tokens."""
        if not self.has_sliding:
            return 1
        return math.ceil((self.window - 1 + max(T, 1)) / self.page_size) + 1

    def empty_call(self, n_dec: int, T: int) -> dict[str, np.ndarray]:
        """The arrays of a call of n_dec decode rows and a T-token chunk per lane, every row padding (writes
        nothing). Rows are lane-major, n_dec + 1 per lane, the chunk last (`flat_layout`)."""
        B = self.lanes * (n_dec + 1)  # rows of the call
        none = self.pages_per_lane  # a page id outside the lane: no page
        return {"tokens": np.zeros((self.lanes, n_dec + T), np.int32), "n_new": np.zeros(B, np.int32),
                "start": np.zeros(B, np.int32),
                "full_table": np.full((B, self.max_blocks), none, np.int32),
                "slide_table": np.full((B, self.slide_width(T)), none, np.int32),
                "slide_first": np.zeros(B, np.int32),
                "copy_src": np.zeros((self.lanes, COPIES), np.int32),
                "copy_dst": np.full((self.lanes, COPIES), none, np.int32),
                "temperature": np.zeros(B, np.float32), "top_k": np.zeros(B, np.int32),
                "top_p": np.ones(B, np.float32), "min_p": np.zeros(B, np.float32),
                "penalty": np.ones(B, np.float32),
                "keys": np.zeros((B, 2), np.uint32), "index": np.zeros(B, np.int32),
                "adapter": np.zeros(B, np.int32),
                "logprobs": np.zeros((), bool)}  # fmt: skip

    def shapes(self) -> list[tuple[int, int]]:
        """Every (decode rows, chunk tokens) a call can have, per lane: what the warm-up compiles. A chunk
        longer than the budget runs only when nothing decodes (the fewest decode rows). Page tables are
        data: the count does not depend on the context length."""
        beside = bucket(min(self.budget, self.chunk), self.token_buckets)
        return [(n_dec, T) for n_dec in self.seq_buckets for T in (0, *self.token_buckets)
                if T <= beside or n_dec == self.seq_buckets[0]]  # fmt: skip

    def _call(self, decode: list[tuple[Seq, int]], chunks: list[tuple[Seq, int]]) -> Call:
        per_lane = [[s for s, _ in decode if s.lane == lane] for lane in range(self.lanes)]
        n_dec = bucket(max(1, *map(len, per_lane)), self.seq_buckets)
        T = bucket(max(n for _, n in chunks), self.token_buckets) if chunks else 0
        a = self.empty_call(n_dec, T)
        ps, W = self.page_size, self.window
        masks, seen, out = {}, {}, []
        rows = [(lane * (n_dec + 1) + i, s, 1, True)
                for lane, ss in enumerate(per_lane) for i, s in enumerate(ss)]  # fmt: skip
        rows += [(s.lane * (n_dec + 1) + n_dec, s, n, False) for s, n in chunks]
        for row, s, n, is_decode in rows:
            lane = s.lane
            base = lane * self.pages_per_lane  # page ids go lane-local
            col = row - lane * (n_dec + 1)  # the row's first token in its lane's flat row
            a["tokens"][lane, col : col + n] = s.tokens[s.length : s.length + n]
            a["n_new"][row], a["start"][row] = n, s.length
            a["adapter"][row] = s.lora_slot
            nb = len(s.blocks)
            if self.has_full:
                a["full_table"][row, :nb] = s.full_ids[:nb] - base
            if self.has_sliding:
                first = max(0, s.length - W + 1) // ps
                a["slide_first"][row] = first
                a["slide_table"][row, : nb - first] = [s.blocks[i].sliding - base for i in range(first, nb)]
            samples = s.length + n == len(s.tokens)
            if samples:
                o = s.handle.options
                a["temperature"][row], a["top_k"][row], a["top_p"][row], a["min_p"][row] = (
                    o.temperature, o.top_k, o.top_p, o.min_p)  # fmt: skip
                if o.repetition_penalty != 1.0:  # the tokens it penalizes: the sequence so far
                    a["penalty"][row] = o.repetition_penalty
                    seen[row] = s.tokens
                a["keys"][row], a["index"][row] = s.key, len(s.tokens) - s.prompt_len
                a["logprobs"] |= o.logprobs
                if s.allowed is not None:
                    masks[row] = s.allowed
            out.append((row, s, n, samples, is_decode))
        for lane, copies in enumerate(self._copies):
            for i, (src, dst) in enumerate(copies):
                base = lane * self.pages_per_lane
                a["copy_src"][lane, i], a["copy_dst"][lane, i] = src - base, dst - base
        if masks:
            allowed = np.ones((len(a["n_new"]), self.vocab_size), bool)
            for row, m in masks.items():
                allowed[row] = m
            a["mask"] = pack_mask(allowed)
        if seen:  # else the engine passes no seen token (the penalty of every row is then 1: off)
            bits = np.zeros((len(a["n_new"]), self.vocab_size), bool)
            for row, tokens in seen.items():
                bits[row, tokens] = True
            a["seen"] = pack_mask(bits)
        return Call(a, out)

    # ----------------------------------------------------------------------------------------- commit
    def commit(self, call: Call, out: tuple[np.ndarray, ...]) -> None:
        """Takes the call's (tokens, logprobs, top ids, top logprobs) per row and advances its sequences."""
        now = time.perf_counter()
        toks, lps, top_ids, top_lps = out
        ps, W = self.page_size, self.window
        for row, s, n, samples, is_decode in call.rows:
            if self.running.get(s.slot) is not s:
                continue
            if is_decode and s.generated:
                self.counters.decode_tokens += 1
            else:
                self.counters.prefill_tokens += n
            s.started = True
            for p in range(s.length, s.length + n):  # the keys now computed, block by block
                s.blocks[p // ps].tokens.append(s.tokens[p])
            s.length += n
            self._settle(s)
            if W:  # sliding pages the window moved past: cached now (or freed, out of the tree)
                swin = max(s.swin, max(0, s.length - W + 1) // ps)
                for b in s.blocks[s.swin : swin]:
                    self._drop_sliding(s.lane, b)
                s.swin = swin
            if samples:
                self._emit(s, int(toks[row]), float(lps[row]), top_ids[row], top_lps[row], now)

    def _emit(self, s: Seq, tok: int, lp: float, top_ids, top_lps, now: float) -> None:
        o, h = s.handle.options, s.handle
        s.tokens.append(tok)
        self.counters.generated_tokens += 1
        if s.adapter:
            self.counters.adapter_tokens[s.adapter] = self.counters.adapter_tokens.get(s.adapter, 0) + 1
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
        """A finished sequence drops its references: its blocks stay in the tree as cache."""
        self._release(s)

    def fail_all(self, message: str) -> None:
        """Finishes every request with an error (the engine cannot go on) and frees everything."""
        for s in list(self.running.values()) + list(self.waiting):
            s.handle._push(result=self._result(s, "error", error=message))
            self.cancel(s)
