"""Many adapters, one engine (`engine.adapters`): rows of different LoRA adapters and of none in one step.

Three PEFT adapters on the tiny float32 checkpoint (ranks 2, 4, 3; attention only, every target, experts
only) in one pool of rank 4. Every request must get exactly the tokens `generate` gives its prompt with its
adapter applied alone (`apply_adapters`, the merged path), greedy and seeded sampling, whatever else is
batched; the pooled forward's float32 logits must be PEFT's on transformers for each adapter (1e-5).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from adaptertools import ADAPTERS, adapted_model, peft_logits, write_adapters
from conftest import assert_one_line
from enginetools import compiles, drive
from hf_reference import our_model, rel_err

import gptoss_jax
from gptoss_jax.adapters import save_adapters
from gptoss_jax.engine import AdapterBusy, AdapterError, AdapterPoolFull, Engine, UnknownAdapter
from gptoss_jax.engine.adapters import AdapterPool, PoolHooks, bytes_per_adapter
from gptoss_jax.lora import LoraConfig, init_adapters
from gptoss_jax.model import forward, logits

ENGINE = {
    "max_seqs": 8,
    "max_context": 128,
    "page_size": 16,
    "chunk": 32,
    "seq_buckets": (8,),
    "token_buckets": (32,),
}
MAX_NEW = 8
ROWS = 8  # reference batches padded to one shape
SAMPLED = {"temperature": 0.8, "top_k": 50, "top_p": 0.9}


@pytest.fixture(scope="module")
def dirs(tiny_cfg, tmp_path_factory):
    return write_adapters(tmp_path_factory.mktemp("adapters"), tiny_cfg)


@pytest.fixture(scope="module")
def engine(hf_ckpt, dirs):
    eng = Engine(our_model(hf_ckpt), adapters=dirs, max_adapters=4, **ENGINE)
    eng.warmup()
    yield eng
    eng.close()


def reference(ckpt, folder, prompts, **kw):
    """`generate` with the adapter applied (merged) on each prompt alone, padded to ROWS rows."""
    model = adapted_model(str(ckpt), None if folder is None else str(folder))
    rows = list(prompts) + [[0] * 40] * (ROWS - len(prompts))
    seed = kw.pop("seed", 0)
    if not isinstance(seed, int):
        seed = list(seed) + [0] * (ROWS - len(prompts))
    return gptoss_jax.generate(model, rows, max_new_tokens=MAX_NEW, seed=seed, **kw)[: len(prompts)]


def test_mixed_batch_equals_each_adapter_alone(engine, hf_ckpt, dirs, tiny_cfg):
    """16 requests, four of each (base and three adapters), half greedy and half sampled with their own
    seeds, arriving over a few steps: each step mixes adapters; the same prompt under every adapter."""
    rng = np.random.default_rng(5)
    v = tiny_cfg.vocab_size
    shared = rng.integers(0, v, 37).tolist()  # every adapter runs it: no KV may cross adapters
    names = [None, *ADAPTERS]
    requests, want = [], {}
    for name in names:
        prompts = [shared] + [rng.integers(0, v, int(rng.integers(1, 40))).tolist() for _ in range(3)]
        seeds = [int(s) for s in rng.integers(0, 2**31, 2)]
        folder = None if name is None else dirs[name]
        greedy = reference(hf_ckpt, folder, prompts[:2])
        sampled = reference(hf_ckpt, folder, prompts[2:], seed=seeds, **SAMPLED)
        for i, p in enumerate(prompts):
            opts = {"max_tokens": MAX_NEW, "adapter": name}
            if i >= 2:
                opts |= dict(seed=seeds[i - 2], **SAMPLED)
            requests.append((p, opts))
        want[name] = greedy + sampled
    order = rng.permutation(len(requests))
    arrivals = sorted(rng.integers(0, 6, len(requests)).tolist())
    mixes, execute = [], engine._execute

    def watch(calls):  # the adapter slots of each step's rows that feed tokens
        mixes.extend({int(s) for s, n in zip(a["adapter"], a["n_new"]) if n} for a in calls)
        return execute(calls)

    engine._execute = watch
    try:
        with compiles() as seen:
            results, _ = drive(engine, [requests[i] for i in order], arrivals)
    finally:
        del engine._execute
    assert not seen  # mixing adapters compiles nothing after warmup
    assert any(len(m) >= 3 and 0 in m for m in mixes)  # steps with several adapters and the base
    got = {}
    for i, r in zip(order, results, strict=True):
        got[(requests[i][1]["adapter"], int(i) % 4)] = r.tokens
    for k, name in enumerate(names):
        assert [got[(name, i)] for i in range(4)] == want[name], name
    # the adapters matter: every adapter's greedy tokens of the shared prompt differ from the base's
    assert all(want[n][0] != want[None][0] for n in ADAPTERS)


def test_streamed_cancelled_and_adapters_swapped_mid_run(engine, hf_ckpt, dirs, tiny_cfg):
    """The base and the three adapters (greedy and seeded sampling) streamed in one batch, beside a fifth
    request on a fourth adapter ("spare"). Mid-run, with the four still generating: the spare request is
    cancelled, its adapter unloaded, another ("late", the expert-only folder) loaded into the freed slot,
    and a request on it joins the batch. Every streamed token sequence equals `generate`'s with its
    adapter alone; the cancelled request's tokens are a prefix of its own; nothing compiles."""
    rng = np.random.default_rng(13)
    v = tiny_cfg.vocab_size
    p = [rng.integers(0, v, int(n)).tolist() for n in rng.integers(5, 20, 6)]
    seeds = [int(s) for s in rng.integers(0, 2**31, 2)]
    all4, want_spare = reference(hf_ckpt, dirs["all4"], [p[2], p[4]])
    want = {  # name: (prompt, options, reference tokens)
        "base": (p[0], {"adapter": None}, reference(hf_ckpt, None, p[:1])[0]),
        "attn2": (p[1], dict(adapter="attn2", seed=seeds[0], **SAMPLED),
                  reference(hf_ckpt, dirs["attn2"], p[1:2], seed=seeds[:1], **SAMPLED)[0]),
        "all4": (p[2], {"adapter": "all4"}, all4),
        "experts3": (p[3], dict(adapter="experts3", seed=seeds[1], **SAMPLED),
                     reference(hf_ckpt, dirs["experts3"], p[3:4], seed=seeds[1:], **SAMPLED)[0]),
    }  # fmt: skip
    want_late = reference(hf_ckpt, dirs["experts3"], p[5:6])[0]
    mixes, execute = [], engine._execute

    def watch(calls):  # the adapter slots of each step's rows that feed tokens
        mixes.extend({int(s) for s, n in zip(a["adapter"], a["n_new"]) if n} for a in calls)
        return execute(calls)

    streams: dict[str, list[int]] = {}
    threads = []

    def stream(name, handle):  # a consumer per request, reading its tokens as the steps emit them
        streams[name] = out = []
        threads.append(threading.Thread(target=lambda: out.extend(ev.token for ev in handle)))
        threads[-1].start()
        return handle

    engine._execute = watch
    try:
        with compiles() as seen:
            spare_slot = engine.load_adapter("spare", dirs["all4"]).slot  # the pool's last free slot
            handles = {
                n: stream(n, engine.submit(q, max_tokens=MAX_NEW, **o)) for n, (q, o, _) in want.items()
            }
            spare = stream("spare", engine.submit(p[4], max_tokens=10 * MAX_NEW, adapter="spare"))
            while min(len(h._events) for h in [spare, *handles.values()]) < 2:
                engine.step()
            assert {0, spare_slot, *(engine.adapters[n].slot for n in ADAPTERS)} in mixes  # one batch
            # mid-run: cancel, unload, load, submit, while the others run on
            spare.cancel()
            engine.unload_adapter("spare")
            late = engine.load_adapter("late", dirs["experts3"])
            assert late.slot == spare_slot  # the slot the spare adapter held, overwritten whole
            mark = len(mixes)
            handles["late"] = stream("late", engine.submit(p[5], max_tokens=MAX_NEW, adapter="late"))
            assert not any(handles[n].done for n in want)
            while not all(h.done for h in handles.values()):
                engine.step()
        for t in threads:
            t.join(30)
        assert not seen  # loading and unloading compiled nothing
    finally:
        del engine._execute
        for name in ("spare", "late"):
            if name in engine.adapters:
                engine.unload_adapter(name)
    assert any({late.slot, 0} <= m for m in mixes[mark:])  # the late request ran beside the base
    results = {n: h.result() for n, h in handles.items()}
    for name, (_, _, tokens) in want.items():
        assert streams[name] == results[name].tokens == tokens, name
    assert streams["late"] == results["late"].tokens == want_late
    r = spare.result()
    assert r.finish_reason == "cancelled" and 2 <= len(r.tokens) < MAX_NEW
    assert streams["spare"] == r.tokens == want_spare[: len(r.tokens)]


def test_prefix_cache_is_per_adapter(engine, tiny_cfg):
    rng = np.random.default_rng(8)
    prompt = rng.integers(0, tiny_cfg.vocab_size, 40).tolist()
    first = engine.generate([prompt], max_tokens=2, adapter="attn2")[0]
    assert first.cached_tokens == 0
    assert engine.generate([prompt], max_tokens=2, adapter="all4")[0].cached_tokens == 0
    assert engine.generate([prompt], max_tokens=2)[0].cached_tokens == 0
    again = engine.generate([prompt], max_tokens=2, adapter="attn2")[0]
    assert again.cached_tokens == 39 and again.tokens == first.tokens


def test_pooled_logits_match_peft_for_each_adapter(hf_ckpt, dirs, tiny_cfg):
    """One forward pass, four rows (base, then each adapter), 20 tokens each (several windows, the grouped
    expert path): each row's float32 logits are PEFT's with that row's adapter."""
    model = our_model(hf_ckpt)
    pool = AdapterPool(model.cfg, max_adapters=3, rank=4, targets="all")
    slots = [0] + [pool.add(n, pool.prepare(n, dirs[n])).slot for n in ADAPTERS]
    tokens = np.random.default_rng(2).integers(0, tiny_cfg.vocab_size, (4, 20)).astype(np.int32)
    pos = np.broadcast_to(np.arange(20, dtype=np.int32), tokens.shape)
    slot = np.broadcast_to(np.asarray(slots, np.int32)[:, None], tokens.shape)
    h, _, _ = forward(model, tokens, pos, hooks=PoolHooks(pool.arrays, model.cfg, slot))
    ours = np.asarray(logits(model, h))
    for row, name in enumerate([None, *ADAPTERS]):
        want = peft_logits(hf_ckpt, None if name is None else dirs[name], tokens[row : row + 1])[0]
        assert rel_err(ours[row], want) < 1e-5, name


def test_load_unload_while_serving(engine, hf_ckpt, dirs, tiny_cfg, tmp_path):
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, tiny_cfg.vocab_size, 12).tolist()
    want = reference(hf_ckpt, dirs["all4"], [prompt])[0]
    r = engine.load_adapter("again", dirs["all4"])  # a fourth slot: the same folder under another name
    assert r.slot == 4 and set(engine.adapters) == {*ADAPTERS, "again"}
    with pytest.raises(AdapterPoolFull) as e:
        engine.load_adapter("fifth", dirs["attn2"])
    assert_one_line(e, "fifth", "max_adapters")
    with compiles() as seen:
        assert engine.generate([prompt], max_tokens=MAX_NEW, adapter="again")[0].tokens == want
    assert not seen
    h = engine.submit(prompt, max_tokens=4, adapter="again")
    with pytest.raises(AdapterBusy) as e:
        engine.unload_adapter("again")
    assert_one_line(e, "again", "in flight")
    while not h.done:
        engine.step()
    engine.unload_adapter("again")
    with pytest.raises(UnknownAdapter) as e:
        engine.submit(prompt, adapter="again")
    assert_one_line(e, "adapter", "again")
    with pytest.raises(UnknownAdapter):
        engine.unload_adapter("again")
    # a bad folder, a rank above the pool's: errors naming the adapter; the engine serves on
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError) as e:
        engine.load_adapter("bad", tmp_path / "empty")
    assert_one_line(e, "bad", "adapter_config.json")
    big = LoraConfig(rank=8, alpha=8.0, targets="attn")
    folder = save_adapters(tmp_path / "r8", init_adapters(tiny_cfg, big), tiny_cfg, big)
    with pytest.raises(AdapterError) as e:
        engine.load_adapter("r8", folder)
    assert_one_line(e, "r8", "rank 8", "max_lora_rank")
    assert engine.generate([prompt], max_tokens=MAX_NEW, adapter="all4")[0].tokens == want


def test_engine_argument_errors(hf_ckpt, dirs, tiny_cfg, tmp_path):
    model = our_model(hf_ckpt)
    with pytest.raises(AdapterError) as e:
        Engine(model, adapters={"x": tmp_path}, **ENGINE)
    assert_one_line(e, "'x'", "adapter_config.json")
    with pytest.raises(AdapterError) as e:
        Engine(model, adapters=dirs, max_adapters=2, **ENGINE)
    assert_one_line(e, "max_adapters")
    with pytest.raises(AdapterError) as e:
        Engine(model, adapters={"attn2": dirs["attn2"], "experts3": dirs["experts3"]}, lora_targets="attn",
               **ENGINE)  # fmt: skip
    assert_one_line(e, "experts3", "mlp1", "lora_targets")
    plain = Engine(model, **ENGINE)
    with pytest.raises(ValueError) as e:
        plain.submit([1, 2], adapter="attn2")
    assert_one_line(e, "adapter", "attn2")
    # the pool's memory: per slot, float32 A and B of every target at the pool's rank
    cfg = tiny_cfg
    per_layer_attn = 4 * (
        4 * cfg.hidden_size + 4 * (cfg.num_attention_heads * cfg.head_dim)
    )  # q: r x D + out x r
    assert bytes_per_adapter(cfg, 4, "q") == per_layer_attn * cfg.num_hidden_layers


def test_pooled_decode_path_matches_each_adapter_applied(hf_ckpt, dirs, tiny_cfg):
    """One token (fewer (token, expert) pairs than experts: the gather path of the experts, as a decode
    step of one sequence takes) under each adapter's slot: the logits of the model with that adapter applied
    (merged) to 1e-5."""
    model = our_model(hf_ckpt)
    pool = AdapterPool(model.cfg, max_adapters=3, rank=4, targets="all")
    for name in ADAPTERS:
        pool.add(name, pool.prepare(name, dirs[name]))
    tokens, pos = np.array([[417]], np.int32), np.zeros((1, 1), np.int32)
    for name in ADAPTERS:
        slot = np.full((1, 1), pool.get(name).slot, np.int32)
        h, _, _ = forward(model, tokens, pos, hooks=PoolHooks(pool.arrays, model.cfg, slot))
        want = np.asarray(adapted_model(str(hf_ckpt), str(dirs[name]))(tokens))[0]
        assert rel_err(np.asarray(logits(model, h))[0], want) < 1e-5, name


def test_adapters_on_a_mesh_are_refused(hf_ckpt, dirs, tmp_path):
    """The pool lives on one device: an engine with adapters (given, or only slots for runtime loads) over
    a model on a mesh (8 fake CPU devices, conftest) is refused, before any adapter folder is read."""
    import jax

    assert len(jax.devices()) == 8
    model = gptoss_jax.load(str(hf_ckpt), dtype="float32", mesh="data=2,expert=2,model=2", quiet=True)
    (tmp_path / "empty").mkdir()
    for kw in ({"adapters": dirs}, {"max_adapters": 2}, {"adapters": {"x": tmp_path / "empty"}}):
        with pytest.raises(ValueError) as e:
            Engine(model, **ENGINE, **kw)
        assert_one_line(e, "adapters", "one device", "mesh {'data': 2, 'expert': 2, 'model': 2}", "--mesh")
    assert Engine(model, **ENGINE, max_adapters=0).pool is None  # no adapters: the mesh serves as before
