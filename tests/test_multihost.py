"""Multi-controller JAX on localhost: two processes with four CPU devices each form one global 8-device mesh.

Each process runs `jax.distributed.initialize` (CPU collectives over gloo), restores the converted Orbax
checkpoint onto the global mesh (every process reading only the shards its devices hold), computes the
logits of a batch and a greedy generation, and gathers them to the host. Both processes must produce the
logits and tokens of the single-device run in the pytest process.

The worker is this file run as a script: `python tests/test_multihost.py WORKER_ARGS...`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROMPTS = np.random.default_rng(11).integers(0, 1000, (2, 13))  # 13 tokens > window 8
NEW = 4
MESH = "data=2,expert=2,model=2"  # data spans the two processes; expert and model stay inside each


def _worker(process_id: int, num_processes: int, port: int, ckpt: str, out: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)  # fmt: skip
    import gptoss_jax
    from gptoss_jax import sharding

    assert jax.process_count() == num_processes and len(jax.local_devices()) == 4 and len(jax.devices()) == 8
    mesh = sharding.make_mesh(MESH)
    model = gptoss_jax.load(ckpt, dtype="float32", mesh=mesh, quiet=True)
    emb = model.embedding[...]
    assert not emb.is_fully_addressable and len(emb.addressable_shards) == 4  # this process: its devices only
    logits = sharding.to_host(model(PROMPTS))
    tokens = np.asarray(gptoss_jax.generate(model, PROMPTS, max_new_tokens=NEW), np.int32)
    np.save(Path(out) / f"logits{process_id}.npy", logits)
    np.save(Path(out) / f"tokens{process_id}.npy", tokens)
    jax.distributed.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import make_tiny_cfg

    from conversion.convert import Options, convert
    from gptoss_jax.checkpoint.synthetic import write_checkpoint

    tmp = tmp_path_factory.mktemp("multihost")
    cfg = make_tiny_cfg(num_hidden_layers=2, num_experts=8, experts_per_token=3, intermediate_size=128)
    src = write_checkpoint(tmp / "hf", cfg, layout="hf", seed=5)
    convert(src, tmp / "orbax", Options(), quiet=True)
    return tmp / "orbax"


def test_two_processes_one_global_mesh(tmp_path, ckpt):
    from clitools import cli_env, free_port, workers  # here: this file also runs as the workers' script

    import gptoss_jax

    env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = free_port()
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    argvs = [[sys.executable, __file__, str(i), "2", str(port), str(ckpt), str(tmp_path)] for i in range(2)]
    with workers(argvs, logs, env=env, cwd=Path(__file__).parent.parent, timeout=300):
        # the single-device reference, computed here while the workers start
        ref = gptoss_jax.load(ckpt, dtype="float32", quiet=True)
        want = np.asarray(ref(PROMPTS))
        want_tokens = np.asarray(gptoss_jax.generate(ref, PROMPTS, max_new_tokens=NEW), np.int32)
    for i in range(2):
        got = np.load(tmp_path / f"logits{i}.npy")
        assert got.shape == want.shape
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 1e-5, (i, err)
        np.testing.assert_array_equal(np.load(tmp_path / f"tokens{i}.npy"), want_tokens)


def test_cli_on_two_processes_prints_once(tmp_path, ckpt):
    """The documented pod launch: the same `gptoss-jax generate ... --mesh` on every process, the cluster given
    by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID. Process 0 prints the single-device
    tokens; the others print nothing."""
    import gptoss_jax

    prompt = PROMPTS[0].tolist()
    from clitools import cli_env, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "gptoss_jax", "generate", str(ckpt), "--tokens", " ".join(map(str, prompt)),
           "--max-new-tokens", str(NEW), "--no-stream", "--dtype", "float32", "--mesh", "expert=4,model=2"]
    procs = []
    for i in range(2):
        env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=4",
                      JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).parent.parent))  # fmt: skip
    want = gptoss_jax.generate(gptoss_jax.load(ckpt, dtype="float32", quiet=True), prompt, max_new_tokens=NEW)[0]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{outs[i][1][-4000:]}"
    # gloo's own C++ logging ("[Gloo] Rank 0 is connected to ...") shares the processes' stdout and may
    # interleave with our line mid-line, so look for the tokens rather than for whole lines
    line = " ".join(str(t) for t in want)
    assert line in outs[0][0], outs[0][0][-2000:]
    assert line not in outs[1][0], outs[1][0][-2000:]
    assert not re.search(r"(^|\s)\d+( \d+){%d}\s*$" % (NEW - 1), outs[1][0], re.M), outs[1][0][-2000:]  # no tokens


if __name__ == "__main__":
    pid, nproc, port, ckpt_dir, out_dir = sys.argv[1:6]
    _worker(int(pid), int(nproc), int(port), ckpt_dir, out_dir)
