"""The serving engine against `gptoss_jax.generate`: every request exactly as alone, whatever else runs.

The tiny float32 checkpoint (window 8) with 1..300-token prompts: far more than the window (the rings wrap
dozens of times) and than a page (16 tokens). Requests arrive at random steps, so decode rows and prefill
chunks of other requests share every step. The references come from one `generate` call over all prompts
(its rows are each exactly the prompt alone: tests/test_generate.py), truncated to each request's
max_tokens (greedy decoding is prefix-stable). Every reference goes through one compiled shape
(`reference`: the prompts padded to 32 rows, 24 new tokens).

Compiles dominate the time here, so every engine uses few buckets (`ENGINE`): decode with 2 or 4 rows,
prefill 32 tokens; the bucket arithmetic itself is tested in test_engine_parts.py, prefix hits wherever they
end in test_prefix_cache.py.
"""

from __future__ import annotations

import asyncio
import threading

import jax
import numpy as np
import pytest
from conftest import assert_one_line
from enginetools import compiles, drive
from hf_reference import our_model

import gptoss_jax
from gptoss_jax import tokenizer
from gptoss_jax.engine import Engine

ENGINE = dict(max_seqs=4, max_context=336, page_size=16, chunk=32, seq_buckets=(2, 4), token_buckets=(32,))
N_REQUESTS = 32
MAX_NEW = 24


@pytest.fixture(scope="module")
def model(hf_ckpt):
    return our_model(hf_ckpt)


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, **ENGINE)
    assert eng.warmup() > 0
    yield eng
    eng.close()


def reference(model, prompts, n=MAX_NEW, **kw):
    """`generate` on each prompt as alone (its rows never see each other), n tokens of each; the prompts
    are padded to one batch shape so that every test's references share two compiles."""
    rows = list(prompts) + [[0] * 300] * (N_REQUESTS - len(prompts))
    seed = kw.pop("seed", 0)
    if not isinstance(seed, int):
        seed = list(seed) + [0] * (N_REQUESTS - len(prompts))
    out = gptoss_jax.generate(model, rows, max_new_tokens=MAX_NEW, seed=seed, **kw)
    return [o[:n] for o in out[: len(prompts)]]


@pytest.fixture(scope="module")
def workload(model, tiny_cfg):
    rng = np.random.default_rng(3)
    v = tiny_cfg.vocab_size
    prompts = [rng.integers(0, v, int(rng.integers(1, 301))).tolist() for _ in range(N_REQUESTS)]
    prompts[0] = prompts[0][:1]  # a 1-token prompt goes straight to decode
    max_tokens = rng.integers(1, MAX_NEW + 1, N_REQUESTS).tolist()
    arrivals = np.sort(rng.integers(0, 80, N_REQUESTS)).tolist()
    ref = reference(model, prompts)
    return prompts, max_tokens, arrivals, [r[:m] for r, m in zip(ref, max_tokens, strict=True)]


def test_requests_at_random_steps_equal_generate_alone(engine, workload):
    prompts, max_tokens, arrivals, want = workload
    before = engine.metrics()
    results, trace = drive(engine, [(p, dict(max_tokens=m)) for p, m in zip(prompts, max_tokens)], arrivals)
    assert [r.tokens for r in results] == want
    assert all(r.finish_reason in ("stop", "length") for r in results)
    after = engine.metrics()
    assert after.preemptions == before.preemptions  # the default pool holds every slot at max_context
    assert max(run for run, _ in trace) == ENGINE["max_seqs"] and max(w for _, w in trace) > 0
    fed = after.prefill_tokens - before.prefill_tokens + after.prefix_hit_tokens - before.prefix_hit_tokens
    assert fed == sum(map(len, prompts))  # every prompt token computed once, or reused


def test_small_pool_waits_preempts_and_stays_exact(model, workload):
    """24 pages of 16 tokens (full and sliding layers) for 4 sequences of up to 336 tokens: requests wait
    for pages, decoding sequences preempt the newest, which are recomputed later (mostly from their own
    cached pages); every request still gets its own tokens."""
    prompts, max_tokens, arrivals, want = workload
    eng = Engine(model, num_pages=24, **ENGINE)
    eng.warmup()
    results, trace = drive(eng, [(p, dict(max_tokens=m)) for p, m in zip(prompts, max_tokens)], arrivals)
    assert [r.tokens for r in results] == want
    m = eng.metrics()
    assert m.preemptions > 0 and any(w > 0 and run < ENGINE["max_seqs"] for run, w in trace), m
    assert m.pages_used <= m.pages_total == 24 and m.evicted_pages > 0
    eng.close()


def test_conversation_turns_reuse_their_prefix(engine, model, tiny_cfg):
    """Turn 2 extends turn 1's tokens: only its new tokens are prefilled. Prompts diverging 3 and 18 tokens
    before turn 1's end reuse exactly what they share (the sliding layers' pages are kept: no limit on how
    far back). Each output equals a cold run's."""
    rng = np.random.default_rng(9)
    v = tiny_cfg.vocab_size
    turn1 = rng.integers(0, v, 150).tolist()
    first = engine.generate([turn1], max_tokens=10, stop_token_ids=())[0]
    fed = turn1 + first.tokens[:-1]  # the last generated token was never fed
    turn2 = turn1 + first.tokens + rng.integers(0, v, 20).tolist()
    near = fed[:-3] + [(fed[-3] + 1) % v] + rng.integers(0, v, 11).tolist()
    far = fed[:-18] + [(fed[-18] + 1) % v] + rng.integers(0, v, 11).tolist()
    cases = ((turn2, len(fed)), (near, len(fed) - 3), (far, len(fed) - 18))
    want = reference(model, [p for p, _ in cases], 8)
    for (prompt, cached), w in zip(cases, want, strict=True):
        m0 = engine.metrics()
        got = engine.generate([prompt], max_tokens=8)[0]
        m1 = engine.metrics()
        assert got.cached_tokens == cached
        assert m1.prefix_hits - m0.prefix_hits == 1 and m1.prefix_hit_tokens - m0.prefix_hit_tokens == cached
        assert m1.prefill_tokens - m0.prefill_tokens == len(prompt) - cached
        assert got.tokens == w


def test_seeded_sampling_does_not_depend_on_the_batch(engine, model, tiny_cfg):
    """Sampled requests (own seeds) batched with greedy ones, arriving in two different orders: each gets
    what `generate(..., seed=[its seed])` draws for its prompt alone."""
    rng = np.random.default_rng(5)
    v = tiny_cfg.vocab_size
    sampled = [rng.integers(0, v, int(rng.integers(5, 120))).tolist() for _ in range(6)]
    seeds = [int(s) for s in rng.integers(0, 2**31, 6)]
    opts = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, max_tokens=12, stop_token_ids=())
    want = reference(model, sampled, 12, temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, seed=seeds,
                     stop_tokens=())  # fmt: skip
    greedy = [rng.integers(0, v, int(rng.integers(5, 120))).tolist() for _ in range(4)]
    requests = [(p, dict(opts, seed=s)) for p, s in zip(sampled, seeds)]
    requests += [(p, dict(max_tokens=12)) for p in greedy]
    for order_seed in (1, 2):
        arrivals = np.random.default_rng(order_seed).integers(0, 20, len(requests)).tolist()
        results, _ = drive(engine, requests, arrivals)
        assert [r.tokens for r in results[:6]] == want
        assert all(r.seed == s for r, s in zip(results, seeds))
    assert len({tuple(w) for w in want}) == 6


def test_no_recompiles_after_warmup(engine, tiny_cfg):
    """200 random requests (greedy and sampled, log-probs, token masks, stop strings, 1..300-token prompts)
    at random steps: no compilation at all after the warm-up."""
    rng = np.random.default_rng(11)
    v = tiny_cfg.vocab_size
    allowed = rng.choice(v, 40, replace=False).tolist()
    requests = []
    for i in range(200):
        opts = dict(max_tokens=int(rng.integers(1, 5)))
        if i % 3 == 1:
            opts |= dict(temperature=1.0, top_p=0.95, seed=i)
        if i % 5 == 2:
            opts |= dict(logprobs=True, top_logprobs=3)
        if i % 7 == 3:
            opts |= dict(allowed_tokens=lambda gen: allowed)
        if i % 11 == 4:
            opts |= dict(stop=["e"])
        requests.append((rng.integers(0, v, int(rng.integers(1, 301))).tolist(), opts))
    arrivals = np.sort(rng.integers(0, 600, len(requests))).tolist()
    with compiles() as seen:
        results, _ = drive(engine, requests, arrivals)
    assert seen == []
    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert sum(len(r.tokens) for r in results) > 400


def test_compiled_programs_are_the_same_at_8k_and_131k(model):
    """A real warm-up of the tiny model at 8k and at 131k context compiles the same number of programs:
    page tables are data."""
    from gptoss_jax.engine.engine import _base_key

    _base_key(0)  # jax's own small jits behind a request's key, compiled once per process
    counts = []
    for context in (8192, 131072):
        eng = Engine(model, max_seqs=2, max_context=context, chunk=16, seq_buckets=(2,), token_buckets=(16,),
                     num_pages=64, detokenize=False)  # fmt: skip
        with compiles() as seen:
            eng.warmup()
        counts.append((len(eng.scheduler.shapes()), len(seen)))
        eng.close()
    assert counts[0] == counts[1] and counts[0][0] == 2 and counts[0][1] >= 2


def test_cancel_frees_slot_and_pages_at_once(engine, model, tiny_cfg):
    rng = np.random.default_rng(13)
    prompts = [rng.integers(0, tiny_cfg.vocab_size, n).tolist() for n in (60, 90, 40, 70, 20)]
    handles = [engine.submit(p, max_tokens=MAX_NEW, stop_token_ids=(), reuse=False) for p in prompts]
    for _ in range(12):
        engine.step()
    sch = engine.scheduler
    decoding, waiting = handles[1]._seq, handles[4]._seq
    assert decoding.slot >= 0 and len(decoding.generated) > 0 and waiting.slot < 0
    used = sch.pages_used
    pages = 2 * len(decoding.blocks) - decoding.swin  # its full pages, the sliding ones its window covers
    handles[1].cancel()  # the engine is idle between steps: freed at once (its pages stay cached)
    assert sch.pages_used == used - pages and decoding.slot not in sch.running
    assert handles[1].result(timeout=0).finish_reason == "cancelled"
    assert [ev.token for ev in handles[1]] == handles[1].result().tokens
    handles[4].cancel()
    assert waiting not in sch.waiting and handles[4].result(timeout=0).finish_reason == "cancelled"
    while not all(h.done for h in handles):
        engine.step()
    want = reference(model, prompts, stop_tokens=())
    for i in (0, 2, 3):
        assert handles[i].result().tokens == want[i]
    engine.start()  # in the background thread: cancelled mid-stream, freed before the next step
    try:
        h = engine.submit(prompts[0], max_tokens=200, stop_token_ids=(), reuse=False)
        next(iter(h))
        h.cancel()
        assert h.result(timeout=5).finish_reason == "cancelled"
        for _ in range(100):
            if h._seq.slot < 0:
                break
            threading.Event().wait(0.05)
        assert h._seq.slot < 0 and not h._seq.blocks
    finally:
        engine.stop()


def test_streaming_in_order_to_threads_and_asyncio(engine, model, tiny_cfg):
    """Four requests streamed at once from the background thread, two read by threads and two by an event
    loop: each sees its tokens in order, and its text deltas add up to the result's text. One stops on a
    string taken from the middle of its reference text, which never reaches the stream."""
    rng = np.random.default_rng(17)
    prompts = [rng.integers(0, tiny_cfg.vocab_size, n).tolist() for n in (30, 75, 12, 50)]
    ref = reference(model, prompts, 20, stop_tokens=())
    text = tokenizer.decode(ref[3])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    seen: dict[int, list] = {}
    engine.start()
    try:
        handles = [engine.submit(p, max_tokens=20, stop_token_ids=(), stop=[stop] if i == 3 else ())
                   for i, p in enumerate(prompts)]  # fmt: skip

        def read(i):
            seen[i] = list(handles[i])

        threads = [threading.Thread(target=read, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()

        async def aread(i):
            seen[i] = [ev async for ev in handles[i]]
            return await handles[i].wait()

        async def both():
            return await asyncio.gather(aread(2), aread(3))

        asyncio.run(both())
        for t in threads:
            t.join()
    finally:
        engine.stop()
    for i, h in enumerate(handles):
        r = h.result()
        assert [ev.token for ev in seen[i]] == r.tokens
        assert "".join(ev.text for ev in seen[i]) == r.text
        if i < 3:
            assert r.tokens == ref[i] and r.text == tokenizer.decode(ref[i]) and r.finish_reason == "length"
    r = handles[3].result()
    assert r.finish_reason == "stop" and r.stop == stop and r.text == text[:cut] and stop not in r.text
    assert r.tokens == ref[3][: len(r.tokens)] and tokenizer.decode(r.tokens).find(stop) >= 0


def test_logprobs_and_allowed_token_mask(engine, model, tiny_cfg):
    rng = np.random.default_rng(19)
    prompt = rng.integers(0, tiny_cfg.vocab_size, 40).tolist()
    lp = np.asarray(jax.nn.log_softmax(model(prompt)[0, -1]))
    r = engine.generate([prompt], max_tokens=3, logprobs=True, top_logprobs=5)[0]
    ids = np.argsort(-lp)[:5]
    assert r.tokens[0] == ids[0]
    assert [t for t, _ in r.top_logprobs[0]] == ids.tolist()
    np.testing.assert_allclose([x for _, x in r.top_logprobs[0]], lp[ids], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.logprobs[0], lp[ids[0]], rtol=1e-4)
    allowed = sorted(rng.choice(tiny_cfg.vocab_size, 7, replace=False).tolist())
    calls = []

    def hook(generated):
        calls.append(list(generated))
        return allowed

    r = engine.generate([prompt], max_tokens=5, stop_token_ids=(), allowed_tokens=hook)[0]
    assert set(r.tokens) <= set(allowed) and r.tokens[0] == allowed[int(np.argmax(lp[allowed]))]
    assert calls == [r.tokens[:i] for i in range(5)]

    def broken(generated):
        if generated:
            raise RuntimeError("grammar exploded")
        return allowed

    bad = engine.submit(prompt, max_tokens=4, allowed_tokens=broken)
    good = engine.submit(prompt[:20], max_tokens=4, stop_token_ids=())
    while not (bad.done and good.done):
        engine.step()
    r = bad.result()
    assert r.finish_reason == "error" and "grammar exploded" in r.error and len(r.tokens) == 1
    assert good.result().finish_reason == "length"  # a failing hook ends its own request only


@pytest.mark.parametrize("kw, needles", [
    (dict(prompt=[]), ["prompt", "non-empty"]),
    (dict(prompt=[1, 5000]), ["token id 5000", "at 1"]),
    (dict(max_tokens=0), ["max_tokens"]),
    (dict(top_p=2.0), ["top_p"]),
    (dict(top_logprobs=50), ["top_logprobs", "20"]),
    (dict(stop=[""]), ["stop"]),
    (dict(stop_token_ids=[-1]), ["stop_token_ids"]),
    (dict(prompt=list(range(336))), ["max_context 336"]),
    (dict(seed=-3), ["seed"]),
])  # fmt: skip
def test_bad_requests_are_one_line_errors(engine, kw, needles):
    kw = dict(kw)
    prompt = kw.pop("prompt", [1, 2, 3])
    with pytest.raises(ValueError) as e:
        engine.submit(prompt, **kw)
    assert_one_line(e, *needles)


@pytest.mark.parametrize("kw, needles", [
    (dict(max_context=10**9), ["max_context", "131072"]),
    (dict(page_size=0), ["page_size"]),
    (dict(budget=0), ["budget"]),
    (dict(seq_buckets=(0,)), ["seq_buckets"]),
    (dict(kv_memory=1000), ["kv memory of 1000 bytes", "no page"]),
    (dict(memory_fraction=2.0), ["memory_fraction"]),
])  # fmt: skip
def test_engine_arguments_are_one_line_errors(model, kw, needles):
    with pytest.raises(ValueError) as e:
        Engine(model, **(dict(max_seqs=2, max_context=64) | kw))
    assert_one_line(e, *needles)


def test_a_100k_prompt_is_admitted_at_the_default_context(model):
    """The default max_context is the model's (131072); a 100k-token prompt fits a 64 MiB pool and starts
    (its first chunk computed; not waited for to the end)."""
    eng = Engine(model, max_seqs=2, chunk=16, seq_buckets=(2,), token_buckets=(16,), kv_memory=64 << 20,
                 detokenize=False)  # fmt: skip
    assert eng.scheduler.max_context == model.cfg.context_length == 131072
    h = eng.submit([i % 997 for i in range(100_000)], max_tokens=10)
    eng.step()
    assert h._seq.slot >= 0 and h._seq.length == 16
    h.cancel()
    eng.close()


def test_memory_fraction_sizes_the_pool_from_what_is_left(model):
    """memory_fraction F: F x (the memory left - the largest step's working memory, measured by compiling
    it); on CPU the memory left is the host's available memory."""
    from gptoss_jax.engine.engine import _free_device_bytes

    free = _free_device_bytes(None)
    eng = Engine(model, max_seqs=2, max_context=64, chunk=16, memory_fraction=0.001, detokenize=False)
    held = eng.plan["bytes_per_device"]
    assert 0 < held <= 0.001 * free and held > 0.0009 * free - eng.plan["page_bytes"] - 2**20


def test_a_prompt_the_pool_could_never_hold_is_refused(model):
    eng = Engine(model, max_seqs=2, max_context=64, page_size=16, num_pages=5)
    with pytest.raises(ValueError) as e:
        eng.submit([1] * 40)  # 3 full pages + 3 sliding pages > the 5 of the pool: it could never run
    assert_one_line(e, "prompt of 40 tokens", "6 pages of 16 tokens", "5 pages")
    assert eng.submit([1] * 30, max_tokens=100).result  # what generation would need is no reason to refuse


def test_repetition_penalty_is_transformers_rule_on_prompt_and_output(engine, model, tiny_cfg):
    """Greedy with a repetition penalty equals a reference loop: the model's logits at each step, penalized by
    transformers' own `RepetitionPenaltyLogitsProcessor` over prompt + output, then argmax; a row without a
    penalty batched beside it gets exactly the tokens it gets alone."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(29)
    prompt = rng.permutation(tiny_cfg.vocab_size)[:300].tolist()  # 30% of the vocabulary: penalized
    other = rng.integers(0, tiny_cfg.vocab_size, 30).tolist()
    n, penalty = 8, 1.7
    hs = [engine.submit(prompt, max_tokens=n, stop_token_ids=(), repetition_penalty=penalty, reuse=False),
          engine.submit(other, max_tokens=n, stop_token_ids=(), reuse=False),
          engine.submit(prompt, max_tokens=n, stop_token_ids=(), reuse=False)]  # fmt: skip
    while not all(h.done for h in hs):
        engine.step()
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    seq = list(prompt)
    for _ in range(n):
        lg = torch.from_numpy(np.array(model(seq)[0, -1], np.float32))[None]
        seq.append(int(proc(torch.tensor([seq]), lg).argmax()))
    assert hs[0].result().tokens == seq[len(prompt) :]
    assert hs[2].result().tokens != seq[len(prompt) :]  # the penalty changed the answer: not vacuous
    assert hs[1].result().tokens == reference(model, [other], n=n, stop_tokens=())[0]
    with pytest.raises(ValueError, match="repetition_penalty"):
        engine.submit(prompt, repetition_penalty=0.0)
