"""Bounded memory: converting a 0.57 GB multi-shard checkpoint in a subprocess must not raise the peak
resident memory above that of the imported packages by half the checkpoint's size, and the packed
output must be at most 1.25x the input."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import make_tiny_cfg
from convtools import REPO, cli_env

from conversion.convert import folder_bytes
from gptoss_jax.checkpoint.orbax import stored_arrays
from gptoss_jax.checkpoint.synthetic import checkpoint_bytes, write_checkpoint

# Peak RSS: the kernel's high-water mark of this process image (VmHWM; ru_maxrss would include the parent's
# resident size inherited through fork), and a sampling thread where /proc is missing. Mapped file pages
# count as resident, so the memory maps are measured too.
DRIVER = """
import json, sys, threading, time
import psutil
import jax, numpy, orbax.checkpoint, tensorstore, gptoss_jax, conversion.cli, conversion.convert
jax.devices()  # the XLA client is part of the libraries' own memory
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
def poll():
    while True:
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()
rc = conversion.cli.main(sys.argv[1:])
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    peak[0] = max(peak[0], int(hwm.split()[1]) * 1024)
except OSError:
    pass
print(json.dumps({"rc": rc, "base": base, "peak": peak[0]}))
"""


def test_peak_memory_and_output_size(tmp_path):
    cfg = make_tiny_cfg(hidden_size=1024, intermediate_size=1024, num_experts=32, experts_per_token=4,
                        num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=2, head_dim=64)  # fmt: skip
    size = checkpoint_bytes(cfg)
    assert size >= 0.5e9
    src = write_checkpoint(tmp_path / "src", cfg, layout="hf", shards=4)
    files = sorted(src.glob("model-*.safetensors"))
    assert len(files) >= 4
    in_bytes = sum(f.stat().st_size for f in files)
    largest = max(32 * 2048 * 1024 // 2, 1000 * 1024 * 2)  # mlp1 blocks, the largest single tensor
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", DRIVER, str(src), str(dst), "--quiet"], capture_output=True,
        check=False,
                       text=True, cwd=REPO, env=cli_env(XLA_FLAGS=""), timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0
    grew = res["peak"] - res["base"]
    print(
        f"checkpoint {size / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB, peak above imports {grew / 1e6:.0f} MB"
    )
    assert grew < size / 2
    assert folder_bytes(dst) <= 1.25 * in_bytes
    assert len(stored_arrays(dst)) == 3 + 10 * 19
