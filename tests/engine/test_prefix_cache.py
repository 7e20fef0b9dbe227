"""Prefix caching across requests, exact: every request gets the tokens `generate` gives its prompt alone,
whether its prompt hits the cache or not, and wherever the hit ends.

The tiny float32 checkpoint has a sliding window of 8; pages of 4 tokens here, so a window spans two or
three pages and a hit can end inside the first window, at a page boundary, mid-page (copy-on-write of the
shared partial page) and with its window across pages. Hits after an eviction, after the preemption of the
sequence that owned the pages, and several requests reading one prefix in the same step are tested too,
and a budget of B bytes is never exceeded under a burst that evicts and preempts.

Two engines (two compiled shapes each): the module's, with room for everything, and a small one.
"""

from __future__ import annotations

import numpy as np
import pytest
from hf_reference import our_model

import gptoss_jax
from gptoss_jax.engine import Engine
from gptoss_jax.engine.paged import page_bytes

ENGINE = dict(max_seqs=4, max_context=160, page_size=4, chunk=16, seq_buckets=(4,), token_buckets=(16,),
              detokenize=False)  # fmt: skip
NEW = 6
ROWS, WIDTH, LONGEST = 12, 150, 40  # every reference batch has this shape: one compile for all of them


@pytest.fixture(scope="module")
def model(hf_ckpt):
    return our_model(hf_ckpt)


@pytest.fixture(scope="module")
def engine(model):
    eng = Engine(model, **ENGINE)
    eng.warmup()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def small(model, tiny_cfg):
    """60 pages of 4 tokens (full and sliding layers alike), given as a budget in bytes."""
    budget = 60 * page_bytes(model.cfg, 4)
    eng = Engine(model, kv_memory=budget, **ENGINE)
    eng.warmup()
    yield eng, budget
    eng.close()


def reference(model, prompts, n=NEW):
    """`generate` on each prompt as alone, n greedy tokens, no stop token."""
    assert len(prompts) <= ROWS and max(map(len, prompts)) <= WIDTH
    rows = list(prompts) + [[0] * WIDTH] * (ROWS - len(prompts))
    out = gptoss_jax.generate(model, rows, max_new_tokens=LONGEST, stop_tokens=())
    return [o[:n] for o in out[: len(prompts)]]


def run(engine, prompt, **kw):
    """One request alone -> (result, prompt tokens computed for it)."""
    m0 = engine.metrics()
    r = engine.generate([prompt], max_tokens=NEW, stop_token_ids=(), **kw)[0]
    return r, engine.metrics().prefill_tokens - m0.prefill_tokens


def diverging(fed, p, rng, vocab, n=5):
    """fed[:p], then a token fed[p] is not, then n random ones."""
    return fed[:p] + [(fed[p] + 1) % vocab] + rng.integers(0, vocab, n).tolist()


def test_hits_wherever_they_end_are_exact(engine, model, tiny_cfg):
    """A 100-token prompt runs; prompts sharing its first p tokens (and its generated ones) then reuse
    exactly p tokens: inside the first window (3, 6), at the window's end and a page boundary (8), mid-page
    with the window across three pages (13, 37, 103), at page boundaries past it (16, 64, 100), the whole
    fed sequence (a second turn). Each gets its cold tokens."""
    rng = np.random.default_rng(1)
    v = tiny_cfg.vocab_size
    base = rng.integers(0, v, 100).tolist()
    first, _ = run(engine, base)
    fed = base + first.tokens[:-1]  # the last generated token was never fed
    cases = [(diverging(fed, p, rng, v), p) for p in (3, 6, 8, 13, 16, 37, 64, 100, 103)]
    cases.append((base + first.tokens + rng.integers(0, v, 7).tolist(), len(fed)))
    want = reference(model, [base] + [c for c, _ in cases])
    assert first.tokens == want[0]
    for (prompt, p), w in zip(cases, want[1:], strict=True):
        r, computed = run(engine, prompt)
        assert (r.cached_tokens, computed, r.tokens) == (p, len(prompt) - p, w), p


def test_first_token_logits_equal_a_cold_prefill(engine, tiny_cfg):
    """Float32 log-probabilities (the logits less their logsumexp) at the first generated position: a hit
    at p against the same prompt prefilled cold (reuse=False), to 1e-6."""
    rng = np.random.default_rng(2)
    v = tiny_cfg.vocab_size
    base = rng.integers(0, v, 90).tolist()
    run(engine, base)
    for p in (5, 12, 33, 90):
        prompt = diverging(base, p, rng, v) if p < len(base) else base + rng.integers(0, v, 4).tolist()
        kw = dict(max_tokens=1, logprobs=True, top_logprobs=20)
        hit = engine.generate([prompt], **kw)[0]
        cold = engine.generate([prompt], reuse=False, **kw)[0]
        assert hit.cached_tokens == p and cold.cached_tokens == 0
        assert [t for t, _ in hit.top_logprobs[0]] == [t for t, _ in cold.top_logprobs[0]]
        np.testing.assert_allclose([x for _, x in hit.top_logprobs[0]], [x for _, x in cold.top_logprobs[0]],
                                   rtol=0, atol=1e-6)  # fmt: skip


def test_several_requests_share_one_prefix_at_the_same_step(engine, model, tiny_cfg):
    """Four prompts with a 50-token common prefix arrive together: the prefix is computed once (the others
    wait for it, then hit it), their decode rows read its pages in the same steps, and each gets its own
    tokens."""
    rng = np.random.default_rng(3)
    v = tiny_cfg.vocab_size
    prefix = rng.integers(0, v, 50).tolist()
    prompts = [prefix + [i] + rng.integers(0, v, int(n)).tolist() for i, n in enumerate((9, 3, 14, 6))]
    want = reference(model, prompts)
    m0 = engine.metrics()
    handles = [engine.submit(p, max_tokens=NEW, stop_token_ids=()) for p in prompts]
    shared_steps = 0
    while not all(h.done for h in handles):
        engine.step()
        running = [h._seq for h in handles if h._seq.slot >= 0 and h._seq.generated]
        shared_steps += len({id(s.blocks[0]) for s in running}) < len(running)
    m1 = engine.metrics()
    assert [h.result().tokens for h in handles] == want
    assert [h.result().cached_tokens for h in handles] == [0, 50, 50, 50]
    assert m1.prefill_tokens - m0.prefill_tokens == 50 + sum(len(p) - 50 for p in prompts)
    assert shared_steps > 0


def path_of(engine, tokens):
    """The blocks of the lane-0 prefix tree on the path of `tokens`' full pages."""
    sch, ps = engine.scheduler, engine.scheduler.page_size
    node, out = sch.lane[0].root(0), []
    for i in range(len(tokens) // ps):
        node = node.children.get(np.asarray(tokens[i * ps : (i + 1) * ps], np.int32).tobytes())
        if node is None:
            break
        out.append(node)
    return out


def usable(path, p, window, ps):
    """The largest hit <= p along `path` whose window survives (what the cache may reuse), computed from the
    tree independently of the scheduler's own check."""
    while p > 0:
        need = range(max(0, p - window + 1), p)  # the positions the first new token sees before it
        gone = [q for q in need if q // ps >= len(path) or path[q // ps].sliding is None]
        if not gone:
            return p
        p = (max(gone) // ps) * ps
    return 0


def test_hits_after_eviction_reuse_only_what_survives(engine, model, tiny_cfg):
    """A 120-token sequence runs, then the cache evicts (least recently released first, sliding pages deep
    inside the path before the rest) until some of its sliding pages and then its tail are gone: a prompt
    diverging mid-path reuses only up to where a window survives, a second turn only what is left, and
    both get their cold tokens."""
    rng = np.random.default_rng(4)
    v = tiny_cfg.vocab_size
    sch, W, ps = engine.scheduler, tiny_cfg.sliding_window, 4
    base = rng.integers(0, v, 120).tolist()
    first, _ = run(engine, base)
    fed = base + first.tokens[:-1]
    path = path_of(engine, fed)
    assert len(path) == len(fed) // ps and all(b.sliding is not None for b in path)
    while path[16].sliding is not None:  # positions 64..67: in the window before 70
        assert sch._evict_one(0)
    mid = diverging(fed, 70, rng, v)
    turn2 = base + first.tokens + rng.integers(0, v, 5).tolist()
    want = reference(model, [mid, turn2])
    expect = usable(path, 70, W, ps)
    assert expect < 70
    r, _ = run(engine, mid)
    assert (r.cached_tokens, r.tokens) == (expect, want[0])
    while path[-1].in_tree:  # now the tail block goes too
        assert sch._evict_one(0)
    path = path_of(engine, fed)
    r, _ = run(engine, turn2)
    assert r.cached_tokens == usable(path, len(fed), W, ps) < len(fed) and r.tokens == want[1]
    assert engine.metrics().evicted_pages > 0


def test_budget_holds_under_a_burst_that_evicts_and_preempts(small, model, tiny_cfg):
    """A budget of B bytes (60 pages) and a burst of 12 requests, most sharing prefixes: the pool never holds
    more than B bytes, pages are evicted and sequences preempted, and every request completes with its
    own tokens."""
    eng, budget = small
    rng = np.random.default_rng(5)
    v = tiny_cfg.vocab_size
    bases = [rng.integers(0, v, 80).tolist() for _ in range(3)]
    prompts = [bases[i % 3][: int(rng.integers(10, 80))] + rng.integers(0, v, int(rng.integers(1, 40))).tolist()
               for i in range(12)]  # fmt: skip
    want = reference(model, prompts, 30)
    assert sum(a.nbytes for bufs in eng._kv for a in bufs) <= budget
    handles = [eng.submit(p, max_tokens=30, stop_token_ids=()) for p in prompts]
    while not all(h.done for h in handles):
        eng.step()
        m = eng.metrics()
        assert m.kv_bytes_used <= m.kv_bytes_total <= budget
    assert [h.result().tokens for h in handles] == want
    m = eng.metrics()
    assert m.evicted_pages > 0 and m.preemptions > 0 and m.pages_used == 0


def test_hit_after_the_owner_was_preempted(small, model, tiny_cfg):
    """X decodes long; A (newer) is preempted when X needs its pages; C, continuing what A had computed but
    its last token, arrives while A waits, and reuses the very pages A computed before it was preempted
    (A, readmitted, reuses them too); X, A and C all get their own tokens."""
    eng, _ = small
    rng = np.random.default_rng(6)
    v = tiny_cfg.vocab_size
    x = rng.integers(0, v, 60).tolist()  # X and A together need more than the 60 pages
    a = rng.integers(0, v, 90).tolist()
    want = reference(model, [x, a], 40)
    before = eng.metrics().preemptions
    hx = eng.submit(x, max_tokens=40, stop_token_ids=())
    ha = eng.submit(a, max_tokens=40, stop_token_ids=())
    while eng.metrics().preemptions == before:
        owned = list(ha._seq.blocks)
        eng.step()
        assert not ha.done
    assert ha._seq.slot < 0 and ha._seq.generated  # preempted after it computed and generated
    fed = ha._seq.tokens[:-1]
    c = diverging(fed, len(fed) - 1, rng, v)
    n = min(40, ENGINE["max_context"] - len(c))
    hc = eng.submit(c, max_tokens=n, stop_token_ids=())
    reused = None
    while not (hx.done and ha.done and hc.done):
        eng.step()
        if reused is None and hc._seq.length:
            reused = hc._seq.blocks[: (len(fed) - 1) // 4]
    assert [hx.result().tokens, ha.result().tokens] == want
    assert hc.result().tokens == reference(model, [c], n)[0] and hc.result().cached_tokens == len(fed) - 1
    assert all(b is o for b, o in zip(reused, owned, strict=False)) and len(reused) == (len(fed) - 1) // 4
