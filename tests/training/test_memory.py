"""`gptoss-jax info MODEL --train`: the training memory plan, checked against real adapter arrays placed on 8
fake devices, and the 20b / 120b figures the docs quote."""

from __future__ import annotations

import json

import jax
import numpy as np
from conftest import make_tiny_cfg

from gptoss_jax import cli
from gptoss_jax.config import Config
from gptoss_jax.lora import LoraConfig, adapter_layout, adapter_shardings, init_adapters
from gptoss_jax.memory import GiB
from gptoss_jax.sharding import make_mesh
from gptoss_jax.training.memory import plan_training

CFG8 = make_tiny_cfg(num_hidden_layers=2, num_experts=8, experts_per_token=3, intermediate_size=128)


def test_adapter_bytes_per_device_are_what_the_arrays_hold():
    lora = LoraConfig(rank=4, targets="all")
    for spec in ("data=2,expert=2,model=2", "expert=8", "model=8"):
        mesh = make_mesh(spec)
        ad = init_adapters(CFG8, lora)
        sh = adapter_shardings(CFG8, {n: a.shape for n, a in ad.items()}, mesh)
        placed = [jax.device_put(a, sh[n]) for n, a in ad.items()]
        dev0 = sum(
            s.data.nbytes for a in placed for s in a.addressable_shards if s.device == mesh.devices.flat[0]
        )
        p = plan_training(CFG8, spec, 64, 2, lora)
        assert p["trainable"] == dev0, spec
        assert p["optimizer"] == 2 * dev0 and p["gradients"] == 2 * dev0


def test_the_plan_grows_where_it_should():
    cfg, lora = Config.gpt_oss_20b(), LoraConfig()
    p = plan_training(cfg, "data=1", 2048, 1, lora)
    assert p["trainable_params"] == sum(int(np.prod(s)) for s in adapter_layout(cfg, lora).values())
    assert plan_training(cfg, "data=1", 4096, 1, lora)["activations"] > p["activations"]
    assert plan_training(cfg, "data=1", 2048, 1, lora, remat=False)["activations"] > 4 * p["activations"]
    assert (
        plan_training(cfg, "data=2", 2048, 2, lora)["activations"] == p["activations"]
    )  # rows split over data
    full = plan_training(cfg, "expert=8", 2048, 1, None)
    assert (
        full["trainable"] == 0
        and full["optimizer"] > 10 * plan_training(cfg, "expert=8", 2048, 1, lora)["optimizer"]
    )


def test_20b_lora_at_2k_fits_a_24_gb_gpu_and_a_v5e_8():
    cfg = Config.gpt_oss_20b()
    assert plan_training(cfg, "data=1", 2048, 1, LoraConfig())["total"] < 24 * GiB * 0.8  # headroom for XLA
    assert (
        plan_training(cfg, "expert=8", 2048, 1, LoraConfig())["total"] < 16 * GiB * 0.6
    )  # v5e: 16 GiB per chip
    assert plan_training(Config.gpt_oss_120b(), "data=1", 2048, 1, LoraConfig())["total"] > 24 * GiB


def test_info_train_cli(capsys):
    rc = cli.main(["info", "gpt-oss-20b", "--train", "--seq-len", "2048", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert (
        rc == 0
        and p["total"] == plan_training(Config.gpt_oss_20b(), "data=1", 2048, 1, LoraConfig())["total"]
    )
    rc = cli.main(["info", "gpt-oss-20b", "--train", "--device-memory", "24"])
    out = capsys.readouterr().out
    assert rc == 0 and "LoRA r=16" in out and "device memory 24 GiB: fits" in out
    rc = cli.main(["info", "gpt-oss-20b", "--train", "--targets", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown LoRA target 'nope'" in err[0]
