"""The engine on a mesh (8 fake CPU devices: data=2 lanes, experts and heads split) and on two processes
(process 0 schedules, process 1 follows its plan): the tokens of every request equal single-device
`generate` on its prompt alone, also in a second round whose prompts continue the first round's (prefix
hits in each lane's own cache, copy-on-write included), and nothing compiles after the warm-up.

The worker of the two-process test is this file run as a script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from enginetools import compiles, drive

import gptoss_jax

MESH = "data=2,expert=2,model=2"
ENGINE = dict(max_seqs=4, max_context=336, page_size=16, chunk=32, seq_buckets=(2,), token_buckets=(32,),
              detokenize=False)  # fmt: skip
NEW = 10


def workload(vocab: int):
    """Round 1: six prompts; round 2: each prompt of round 1, its first NEW - 1 generated tokens (known
    from `generate` only after round 1: `round_two`) and new ones."""
    rng = np.random.default_rng(23)
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(1, 200, 6)]
    tails = [rng.integers(0, vocab, int(n)).tolist() for n in rng.integers(1, 30, 6)]
    return prompts, tails, rng.integers(0, 6, len(prompts)).tolist()


def round_two(prompts, tails, first):
    return [p + t[: NEW - 1] + tail for p, t, tail in zip(prompts, first, tails, strict=True)]


def tokens_of(engine, prompts, arrivals) -> tuple[list[list[int]], list[int]]:
    results, _ = drive(engine, [(p, dict(max_tokens=NEW)) for p in prompts], arrivals)
    return [r.tokens for r in results], [r.cached_tokens for r in results]


def both_rounds(engine, prompts, tails, arrivals):
    first, _ = tokens_of(engine, prompts, arrivals)
    second, cached = tokens_of(engine, round_two(prompts, tails, first), arrivals)
    return first, second, cached


def references(model, prompts, tails):
    first = gptoss_jax.generate(model, prompts, max_new_tokens=NEW)
    return first, gptoss_jax.generate(model, round_two(prompts, tails, first), max_new_tokens=NEW)


def test_on_a_mesh_of_eight_devices(hf_ckpt, tiny_cfg):
    from hf_reference import our_model

    from gptoss_jax.engine import Engine

    prompts, tails, arrivals = workload(tiny_cfg.vocab_size)
    want = references(our_model(hf_ckpt), prompts, tails)
    model = gptoss_jax.load(str(hf_ckpt), dtype="float32", mesh=MESH, quiet=True)
    eng = Engine(model, **ENGINE)
    assert eng.scheduler.lanes == 2
    spec = eng._kv[0][0].sharding.spec  # the pool: pages over data, kv heads over model
    assert spec[1] == "data" and spec[3] == "model"
    eng.warmup()
    with compiles() as seen:
        first, second, cached = both_rounds(eng, prompts, tails, arrivals)
    assert (first, second) == want and seen == []
    # a continuation placed in the lane holding its first turn reuses all of it (a lane's cache is its own)
    whole = [len(p) + NEW - 1 for p in prompts]
    assert all(c in (0, w) for c, w in zip(cached, whole, strict=True)) and sum(c > 0 for c in cached) >= 4
    assert all(ln.pinned == 0 and len(ln.free) < eng.scheduler.pages_per_lane for ln in eng.scheduler.lane)


def _worker(process_id: int, port: int, ckpt: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                               process_id=process_id, initialization_timeout=120)  # fmt: skip
    from gptoss_jax.engine import Engine

    model = gptoss_jax.load(ckpt, dtype="float32", mesh=MESH, quiet=True)
    eng = Engine(model, **ENGINE)
    eng.warmup()
    if process_id == 0:
        prompts, tails, arrivals = workload(model.cfg.vocab_size)
        first, second, _ = both_rounds(eng, prompts, tails, arrivals)
        eng.close()  # releases the follower
        Path(out, "tokens.json").write_text(json.dumps([first, second]))
    else:
        with pytest.raises(Exception, match="process 0"):
            eng.submit([1, 2, 3])
        eng.follow()
    jax.distributed.shutdown()


def test_two_processes_run_process_0s_plan(tmp_path, hf_ckpt, tiny_cfg):
    from clitools import cli_env, free_port, workers  # here: this file also runs as the workers' script
    from hf_reference import our_model

    env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = free_port()
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    argvs = [[sys.executable, __file__, str(i), str(port), str(hf_ckpt), str(tmp_path)] for i in range(2)]
    with workers(argvs, logs, env=env, cwd=Path(__file__).parents[2], timeout=400):
        prompts, tails, _ = workload(tiny_cfg.vocab_size)
        want = references(our_model(hf_ckpt), prompts, tails)
    assert json.loads((tmp_path / "tokens.json").read_text()) == list(want)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
