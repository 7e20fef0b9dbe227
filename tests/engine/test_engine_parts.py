"""The engine's parts without a model: bucket sizes, pool sizing (and the planner that reports it, against
the buffers an engine really allocates), each step's flat plan and the prefix cache's bookkeeping (every
page owned once, references counted right) over a random workload with shared prefixes, preemption and
eviction, the compiled shapes at 8k and 131k context, streamed text with stop strings, token masks, and
the plan a multi-process engine sends."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_line
from flax import nnx

from gptoss_jax import tokenizer
from gptoss_jax.config import Config
from gptoss_jax.engine import Engine, pool_plan
from gptoss_jax.engine.engine import _decode_plan, _encode_plan
from gptoss_jax.engine.paged import PagedKVCache, page_bytes
from gptoss_jax.engine.requests import RequestHandle, RequestOptions, TextStream, allowed_mask
from gptoss_jax.engine.scheduler import Scheduler, Seq, bucket, buckets
from gptoss_jax.model import Transformer


def test_buckets():
    assert buckets(16) == (1, 2, 4, 8, 16) and buckets(21) == (1, 2, 4, 8, 16, 21)
    assert buckets(512, 16) == (16, 32, 64, 128, 256, 512)
    assert buckets(21, given=(8, 64)) == (8, 21) and buckets(21, given=()) == (21,)
    assert [bucket(n, (2, 4, 21)) for n in (1, 2, 3, 5, 21)] == [2, 2, 4, 21, 21]
    with pytest.raises(ValueError, match="page_buckets"):
        buckets(4, given=(0,), name="page_buckets")


def test_pool_plan(tiny_cfg):
    # k and v of 2 kv heads x 16 dims in bfloat16, 2 layers of a kind (the pool's one buffer: R = 2)
    one = 2 * 2 * 16 * (2 * 16) * 2
    assert page_bytes(tiny_cfg, 16) == one
    assert page_bytes(tiny_cfg, 16, mesh_shape={"data": 2, "model": 2}) == one // 2  # heads split, pages whole
    p = pool_plan(tiny_cfg, page_size=16, kv_memory=10 * one + 5)
    assert p["num_pages"] == 10 and p["tokens_per_lane"] == 160 and p["total_bytes"] == 10 * one
    q = pool_plan(tiny_cfg, page_size=16, kv_memory=10 * one // 2, lanes=2, mesh_shape={"data": 2, "model": 2})
    assert q["pages_per_lane"] == 10 and q["num_pages"] == 20 and q["bytes_per_device"] == 10 * one // 2
    with pytest.raises(ValueError) as e:
        pool_plan(tiny_cfg, page_size=16, kv_memory=one - 1)
    assert_one_line(e, f"kv memory of {one - 1} bytes", "no page")
    with pytest.raises(ValueError) as e:
        pool_plan(tiny_cfg, page_size=16, num_pages=5, lanes=2)
    assert_one_line(e, "num_pages", "data shards (2)")


def test_planner_reports_the_pool_an_engine_allocates():
    """`gptoss-jax info tiny --serve` (the real entry point) against an engine's buffers for that budget."""
    info = [sys.executable, "-m", "gptoss_jax", "info", "tiny", "--serve", "--max-seqs", "6"]
    budget = 3 / 1024  # GiB
    out = subprocess.run([*info, "--dtype", "float32", "--kv-memory", str(budget), "--page-size", "32", "--json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    e = json.loads(out.stdout)["engine"]
    model = Transformer(Config.tiny(dtype="float32"), rngs=nnx.Rngs(0))
    eng = Engine(model, max_seqs=6, page_size=32, kv_memory=int(budget * 2**30), detokenize=False)
    held = sum(a.nbytes for bufs in eng._kv for a in bufs)
    assert e["num_pages"] == eng.plan["num_pages"] == eng.scheduler.pages_per_lane
    assert e["total_bytes"] == held == e["bytes_per_device"] <= budget * 2**30
    window = -(-(128 - 1 + 512) // 32) + 1  # sliding pages of one sequence: its window and a chunk
    assert e["tokens_one_sequence"] == (e["num_pages"] - window) * 32
    text = subprocess.run([*info, "--kv-memory", "1", "--mesh", "data=2,model=2"], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert "KV budget" in text and "pages per data shard" in text and "2 data shards" in text


def check_pool(sch: Scheduler) -> None:
    """Every page of every lane is owned exactly once (free, a block of the prefix tree, or a running
    sequence's own block), blocks hold the tokens of their positions, and the reference counts and pinned
    pages are what the running sequences hold."""
    ps, ppl = sch.page_size, sch.pages_per_lane
    for li, ln in enumerate(sch.lane):
        owner: dict[int, str] = {}

        def own(page, what, li=li, owner=owner):
            assert li * ppl <= page < (li + 1) * ppl, (page, what)
            assert page not in owner, (page, what, owner.get(page))
            owner[page] = what

        for page in ln.free:
            own(page, "free")
        blocks, stack = {}, list(ln.roots.values())
        while stack:
            b = stack.pop()
            for c in [*b.children.values(), *b.partials]:
                assert c.parent is b and c.in_tree
                if c.key is not None:
                    assert len(c.tokens) == ps and c.key == np.asarray(c.tokens, np.int32).tobytes()
                else:
                    assert 0 < len(c.tokens) < ps
                assert c.full is not None  # a block in the tree keeps its full page until it is evicted
                blocks[id(c)] = c
                stack.append(c)
        users, sliding_users = collections.Counter(), collections.Counter()
        for s in sch.running.values():
            if s.lane != li:
                continue
            for i, b in enumerate(s.blocks):
                blocks.setdefault(id(b), b)
                users[id(b)] += 1
                if i >= s.swin:
                    sliding_users[id(b)] += 1
                    assert b.sliding is not None
                held = min(ps, max(0, s.length - i * ps))
                assert b.tokens == s.tokens[i * ps : i * ps + held] and len(b.tokens) == held
                assert b.full == s.full_ids[i]
            assert s.swin * ps <= max(0, s.length - sch.window + 1)
        pinned = 0
        for b in blocks.values():
            for page, kind in ((b.full, "full"), (b.sliding, "sliding")):
                if page is not None:
                    own(page, kind)
            assert b.users == users[id(b)] and b.sliding_users == sliding_users[id(b)]
            pinned += (b.users > 0 and b.full is not None) + (b.sliding_users > 0 and b.sliding is not None)
        assert len(owner) == ppl and ln.pinned == pinned and len(ln.heap) <= 2 * ppl + 1025


def seqs_sharing_prefixes(n: int, rng, vocab: int = 100) -> list[Seq]:
    """Prompts of 1..60 tokens, most continuing one of a few bases (shared prefixes of any length)."""
    bases = [rng.integers(0, vocab, 50).tolist() for _ in range(3)]
    out = []
    for i in range(n):
        base = bases[int(rng.integers(0, 3))]
        cut = int(rng.integers(0, 51)) if rng.random() < 0.8 else 0
        prompt = base[:cut] + rng.integers(0, vocab, int(rng.integers(1, 12))).tolist()
        h = RequestHandle(i, prompt, RequestOptions(max_tokens=int(rng.integers(1, 30))), 0, None)
        out.append(Seq(h, i, list(prompt), len(prompt), np.zeros(2, np.uint32), None))
    return out


@pytest.mark.parametrize("pages", [60, 400])  # a pool that evicts and preempts, one that mostly caches
def test_each_step_is_one_flat_call_and_the_pool_stays_consistent(pages):
    """Two lanes, prompts sharing prefixes of every length arriving over time, a pool small enough to
    evict and preempt: every step's plan is one call whose flat row per lane holds each decoding
    sequence's next token (one row each), then at most one prefill chunk (the last row), within the budget
    while sequences decode; its shape is one the warm-up compiles; the tables it carries are the sequences'
    pages; and after every step the pool's bookkeeping holds (`check_pool`)."""
    sch = Scheduler(lanes=2, slots=6, pages=pages, page_size=4, max_context=80, chunk=16, budget=6,
                    kinds=(True, False), window=6, vocab_size=100, eos=(), prefix_cache=True, max_top=0,
                    seq_buckets=(1, 2), token_buckets=(8, 16))  # fmt: skip
    assert (2, 16) not in sch.shapes() and (1, 16) in sch.shapes()  # 16 > budget: only when nothing decodes
    ppl = pages // 2
    rng = np.random.default_rng(1)
    seqs = seqs_sharing_prefixes(40, rng)
    mixed = copies = 0
    for step in range(2000):
        for s in seqs[2 * step : 2 * step + 2]:
            sch.add(s)
        if sch.idle() and step > 20:
            break
        call = sch.plan()
        if call is None:
            continue
        a, lanes = call.arrays, sch.lanes
        n_dec = a["n_new"].shape[0] // lanes - 1
        width = a["tokens"].shape[1]
        assert (n_dec, width - n_dec) in sch.shapes()
        want_pos = np.full((lanes, width), -1)
        decoding = any(dec for *_, dec in call.rows)
        for row, s, n, samples, dec in call.rows:
            lane, col = divmod(row, n_dec + 1)
            assert lane == s.lane and dec == (col < n_dec)
            assert n == 1 if dec else 1 <= n <= (6 if decoding else 16)  # the budget while decoding
            np.testing.assert_array_equal(a["tokens"][lane, col : col + n], s.tokens[s.length : s.length + n])
            assert a["n_new"][row] == n and a["start"][row] == s.length
            assert samples == (s.length + n == len(s.tokens))
            last = (s.length + n - 1) // 4  # the row's pages cover its tokens, lane-local
            full = [b.full - lane * ppl for b in s.blocks[: last + 1]]
            np.testing.assert_array_equal(a["full_table"][row, : last + 1], full)
            first = a["slide_first"][row]
            assert first == max(0, s.length - 6 + 1) // 4
            slide = [b.sliding - lane * ppl for b in s.blocks[first : last + 1]]
            np.testing.assert_array_equal(a["slide_table"][row, : last + 1 - first], slide)
            want_pos[lane, col : col + n] = np.arange(s.length, s.length + n)
        copies += int((a["copy_dst"] < ppl).sum())
        assert len({id(s) for _, s, *_ in call.rows}) == len(call.rows)
        mixed += decoding and any(not dec for *_, dec in call.rows)
        fields = ("start", "n_new", "full_table", "slide_table", "slide_first")
        cache = PagedKVCache((), (), *(jnp.asarray(a[k]) for k in fields))
        np.testing.assert_array_equal(cache.positions(lanes, width), want_pos)
        last = np.asarray(cache.last_token(lanes, width))
        for row, s, n, *_ in call.rows:
            assert last[divmod(row, n_dec + 1)] == row % (n_dec + 1) + n - 1
        B = len(a["n_new"])
        sch.commit(call, (rng.integers(0, 100, B), np.zeros(B), np.zeros((B, 0), int), np.zeros((B, 0))))
        check_pool(sch)
    assert sch.idle() and all(s.handle.done for s in seqs)
    c = sch.counters
    assert mixed > 5 and copies > 0 and c.prefix_hits > 3
    if pages == 60:
        assert c.preemptions > 0 and c.evicted_pages > 0
    else:
        assert c.preemptions == 0 and c.prefix_hits > 10 and c.prefix_hit_tokens > 300
    assert sch.pages_used == 0 and sch.pages_cached + sch.pages_free == pages  # what is left is cache


def test_compiled_shapes_do_not_depend_on_the_context():
    """The scheduler's shape list at 8k and at 131k context, with the engine's defaults (16 sequences,
    chunks of 512): the same programs (the issue's engine listed 350 and 490): 5 decode buckets (1-16) x
    (decode only + 4 chunk buckets: 16, 64, 256, 512)."""

    def shapes(context):
        return Scheduler(lanes=1, slots=16, pages=64, page_size=16, max_context=context, chunk=512, budget=512,
                         kinds=(True, False), window=128, vocab_size=10, eos=(), prefix_cache=True, max_top=0
                         ).shapes()  # fmt: skip

    assert shapes(8192) == shapes(131072) and len(shapes(8192)) == 25


def test_text_stream_holds_back_stop_strings_and_split_characters():
    text = "naïve café → done. The END is near END"
    toks = tokenizer.encode(text)
    s = TextStream(["END", "zzz"])
    out, stop = [], None
    for t in toks:
        piece, stop = s.add(t)
        out.append(piece)
        assert "END" not in "".join(out)
        if stop:
            break
    assert stop == "END" and "".join(out) == s.text == "naïve café → done. The "
    # a character split over byte tokens comes out whole
    s = TextStream(())
    pieces = [s.add(t)[0] for t in tokenizer.encode("→")] + [s.finish()]
    assert "".join(pieces) == "→" and all("\ufffd" not in p for p in pieces)
    # a held-back prefix ("EN") is released once it turns out not to be a stop string
    s = TextStream(["END"])
    got = "".join(s.add(t)[0] for t in tokenizer.encode("AN ENTRY")) + s.finish()
    assert got == "AN ENTRY"


def test_allowed_mask():
    m = allowed_mask([3, 5], 8)
    assert m.tolist() == [False, False, False, True, False, True, False, False]
    assert allowed_mask(None, 8) is None and allowed_mask(np.ones(8, bool), 8).all()
    for bad, needle in (([], "allowed no token"), ([9], "[0, 8)"), (np.ones(7, bool), "(8,)")):
        with pytest.raises(ValueError) as e:
            allowed_mask(bad, 8)
        assert_one_line(e, needle)


def test_plan_roundtrip():
    calls = [{"tokens": np.arange(6, dtype=np.int32).reshape(2, 3), "keys": np.ones((2, 2), np.uint32)},
             {"mask": np.full((1, 4), 255, np.uint8)}]  # fmt: skip
    back = _decode_plan(_encode_plan(calls))
    assert len(back) == 2 and back[1].keys() == {"mask"}
    for a, b in zip(calls, back, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].dtype == b[k].dtype
