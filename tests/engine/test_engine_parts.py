"""The engine's parts without a model: bucket sizes, pool sizing (and the planner that reports it, against
the buffers an engine really allocates), each step's flat plan, ring positions after rollbacks, streamed
text with stop strings, token masks, and the plan a multi-process engine sends."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_one_line
from flax import nnx

from gptoss_jax import memory, tokenizer
from gptoss_jax.config import Config
from gptoss_jax.engine import Engine, pool_plan
from gptoss_jax.engine.engine import _decode_plan, _encode_plan
from gptoss_jax.engine.paged import PagedKVCache, _ring_positions
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
    p = pool_plan(tiny_cfg, max_seqs=4, max_context=100, page_size=16, ring_slack=16)
    assert p["pages_per_seq"] == 7 and p["num_pages"] == 28
    assert p["ring_slots"] == tiny_cfg.sliding_window + 16
    # k and v of 2 kv heads x 16 dims in bfloat16, on 2 full (pages) and 2 sliding (rings) layers
    assert p["page_bytes"] == 16 * 2 * (2 * 16 * 2) * 2 and p["ring_bytes"] == 4 * 24 * 2 * (2 * 16 * 2) * 2
    q = pool_plan(tiny_cfg, max_seqs=4, max_context=100, kv_bytes=p["ring_bytes"] + 10 * p["page_bytes"] + 5)
    assert q["num_pages"] == 10
    with pytest.raises(ValueError) as e:
        pool_plan(tiny_cfg, max_seqs=4, max_context=100, kv_bytes=p["ring_bytes"] + 6 * p["page_bytes"])
    assert_one_line(e, "6 pages", "(7)")


def test_planner_reports_the_pool_an_engine_allocates():
    """`gptoss-jax info tiny --max-seqs` (the real entry point) against an engine's buffers for that
    config."""
    info = [sys.executable, "-m", "gptoss_jax", "info", "tiny", "--max-seqs", "6"]
    out = subprocess.run([*info, "--dtype", "float32", "--context", "300", "--page-size", "32", "--json"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    e = json.loads(out.stdout)["engine"]
    model = Transformer(Config.tiny(dtype="float32"), rngs=nnx.Rngs(0))
    eng = Engine(model, max_seqs=6, max_context=300, page_size=32, detokenize=False)
    held = sum(a.nbytes for kv in eng._kv for a in kv)
    assert e["num_pages"] == 6 * 10
    assert e["total_bytes"] == held == e["pool_per_device"] + e["rings_per_device"]
    p = memory.plan(Config.tiny(), {}, 300, max_seqs=6, page_size=32)
    text = memory.format_plan(p, device_memory_gib=1)
    fit = (2**30 - p["weights_total"] - p["engine"]["rings_per_device"]) // p["engine"]["page_per_device"]
    assert "page pool (60 pages)" in text and f"serving engine: {fit} pages" in text


def test_each_step_is_one_flat_call():
    """Two lanes, prompts of 1..40 tokens arriving over time, a pool small enough to preempt: every step's
    plan is one call whose flat row per lane holds each decoding sequence's next token (one row each), then
    at most one prefill chunk (the last row), within the budget while sequences decode; its shape is one
    the warm-up compiles, and the positions and last tokens the cache derives from it are the plan's."""
    sch = Scheduler(lanes=2, slots=6, pages=20, page_size=4, max_context=48, chunk=16, budget=6, ring_len=0,
                    window=8, vocab_size=100, eos=(), reuse=False, resident_pages=0, max_top=0,
                    seq_buckets=(1, 2), token_buckets=(8, 16))  # fmt: skip
    assert (2, 16, 12) not in sch.shapes() and (1, 16, 12) in sch.shapes()  # 16 > budget: nothing decodes
    rng = np.random.default_rng(1)
    seqs = []
    for i in range(12):
        prompt = rng.integers(0, 100, int(rng.integers(1, 41))).tolist()
        h = RequestHandle(i, prompt, RequestOptions(max_tokens=int(rng.integers(1, 6))), 0, None)
        seqs.append(Seq(h, i, list(prompt), len(prompt), np.zeros(2, np.uint32), None))
    mixed = 0
    for step in range(400):
        for s in seqs[2 * step : 2 * step + 2]:
            sch.add(s)
        if sch.idle() and step > 6:
            break
        call = sch.plan()
        if call is None:
            continue
        a, lanes = call.arrays, sch.lanes
        n_dec = a["rows"].shape[0] // lanes - 1
        width = a["tokens"].shape[1]
        assert (n_dec, width - n_dec, a["pages"].shape[1]) in sch.shapes()
        want_pos = np.full((lanes, width), -1)
        decoding = any(dec for *_, dec in call.rows)
        for row, s, n, samples, dec in call.rows:
            lane, col = divmod(row, n_dec + 1)
            assert lane == s.lane and dec == (col < n_dec)
            assert n == 1 if dec else 1 <= n <= (6 if decoding else 16)  # the budget while decoding
            np.testing.assert_array_equal(a["tokens"][lane, col : col + n], s.tokens[s.length : s.length + n])
            assert a["n_new"][row] == n and a["start"][row] == s.length
            assert samples == (s.length + n == len(s.tokens))
            assert a["rows"][row] == s.slot - lane * 3  # shard-local slot and pages
            np.testing.assert_array_equal(a["pages"][row, : len(s.pages)], np.asarray(s.pages) - lane * 10)
            want_pos[lane, col : col + n] = np.arange(s.length, s.length + n)
        assert len({id(s) for _, s, *_ in call.rows}) == len(call.rows)
        mixed += decoding and any(not dec for *_, dec in call.rows)
        fields = ("rows", "pages", "start", "n_new", "ring_lo")
        cache = PagedKVCache((), (), *(jnp.asarray(a[k]) for k in fields))
        np.testing.assert_array_equal(cache.positions(lanes, width), want_pos)
        last = np.asarray(cache.last_token(lanes, width))
        for row, s, n, *_ in call.rows:
            assert last[divmod(row, n_dec + 1)] == row % (n_dec + 1) + n - 1
        B = len(a["rows"])
        sch.commit(call, (rng.integers(0, 100, B), np.zeros(B), np.zeros((B, 0), int), np.zeros((B, 0))))
    assert sch.idle() and all(s.handle.done for s in seqs)
    assert mixed > 5 and sch.counters.preemptions > 0


def test_ring_positions_follow_writes_and_rollbacks():
    """The position each ring slot holds, derived from (start, ring_lo), against a ring actually written
    chunk by chunk, with rollbacks (the slots past the new end become invalid)."""
    W = 11
    rng = np.random.default_rng(0)
    ring = np.full(W, -1)
    length, lo = 0, 0
    for _ in range(60):
        if length > 3 and rng.random() < 0.25:
            d = int(rng.integers(1, 4))
            lo = max(lo, length - W)
            ring[(ring >= length - d)] = -1  # what a rollback leaves is stale: never to be seen
            length -= d
        else:
            n = int(rng.integers(1, 2 * W))
            for p in range(length, length + n):
                ring[p % W] = p
            length += n
        got = np.asarray(_ring_positions(jnp.asarray([length]), jnp.asarray([lo]), W))[0]
        np.testing.assert_array_equal(got, ring)


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
