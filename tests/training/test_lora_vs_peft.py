"""LoRA and full fine-tuning against the oracle: transformers' GptOssForCausalLM + PEFT, torch autograd,
float32.

The tiny checkpoint of tests/conftest.py (4 layers, window 8, 5 experts top-3) in both released layouts,
read by our loader; transformers reads the Hugging Face layout itself (experts dequantized by its own code)
and PEFT loads the adapters we wrote (`save_adapters`), so the adapter file format is under test too. B is
drawn nonzero so that every A gets a gradient. 20 tokens per row span several windows and give 60 (token,
expert) pairs for 5 experts: the grouped expert path with its custom VJP.

Tolerance 1e-4 relative (Frobenius): float32 end to end, the only differences are summation orders (the
measured errors are ~1e-6); a wrong index, transpose, scale or rounding moves a gradient by O(1).
"""

from __future__ import annotations

import functools
import json
import warnings

import jax
import numpy as np
import pytest
from conftest import assert_one_line
from hf_reference import our_model, rel_err

import gptoss_jax
from gptoss_jax import weights
from gptoss_jax.adapters import (
    CONFIG_FILE,
    LoraError,
    _to_peft,
    apply_adapters,
    load_adapters,
    peft_names,
    save_adapters,
)
from gptoss_jax.checkpoint import keys
from gptoss_jax.lora import EXPERT_TARGETS, LoraConfig, init_adapters, target_of
from gptoss_jax.model import model_params
from gptoss_jax.training.loss import loss_sums

TOL = 1e-4
B, T = 2, 20
LCFG = LoraConfig(rank=4, alpha=8, targets="all")


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens with every position's next token in the loss except a random 30% (and the last)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1000, (B, T)).astype(np.int32)
    w = (rng.random((B, T)) < 0.7).astype(np.float32)
    w[:, -1] = 0
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    return {
        "tokens": tokens,
        "positions": pos,
        "loss_pos": pos,
        "targets": np.roll(tokens, -1, 1),
        "weights": w,
    }


@functools.partial(jax.jit, static_argnums=(3, 4))
def _ours(params, trainable, batch, cfg, lcfg):
    """(loss, gradient): of the adapters with lcfg, of the weights without. Module level, so both layouts'
    models (same shapes) share one compiled function."""

    def f(tr):
        s, n = (
            loss_sums(params, tr, batch, cfg, lcfg) if lcfg else loss_sums(params | tr, {}, batch, cfg, None)
        )
        return s / n

    return jax.value_and_grad(f)(trainable)


def torch_base(path):
    """A fresh transformers model (PEFT wraps modules in place: the cached one is shared by other tests)."""
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config
    from transformers.utils import logging

    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GptOssForCausalLM.from_pretrained(
            str(path),
            quantization_config=Mxfp4Config(dequantize=True),
            dtype=torch.float32,
            attn_implementation="eager",
        )


def torch_loss(model, batch):
    import torch

    logits = model(input_ids=torch.as_tensor(batch["tokens"], dtype=torch.long)).logits.float()
    logp = torch.log_softmax(logits, -1)
    nll = -torch.gather(logp, -1, torch.as_tensor(batch["targets"], dtype=torch.long)[..., None])[..., 0]
    w = torch.as_tensor(batch["weights"])
    return (nll * w).sum() / w.sum()


@pytest.fixture(scope="module")
def adapters(tiny_cfg):
    return init_adapters(tiny_cfg.replace(dtype="float32"), LCFG, seed=3, b_std=0.05)


@pytest.fixture(scope="module")
def peft_reference(hf_ckpt, adapters, tiny_cfg, tmp_path_factory):
    """PEFT's loss and the gradient of every adapter tensor, by PEFT name."""
    from peft import PeftModel

    folder = save_adapters(tmp_path_factory.mktemp("peft") / "ad", adapters, tiny_cfg, LCFG)
    model = PeftModel.from_pretrained(torch_base(hf_ckpt), str(folder), is_trainable=True)
    loss = torch_loss(model, make_batch())
    loss.backward()
    grads = {
        n.replace(".default.weight", ".weight"): p.grad.numpy()
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    return float(loss.detach()), grads, folder


def test_adapter_folder_is_what_peft_expects(peft_reference, tiny_cfg):
    _, grads, folder = peft_reference
    assert set(grads) == set(peft_names(tiny_cfg, LCFG))  # PEFT created exactly the tensors we wrote
    conf = json.loads((folder / CONFIG_FILE).read_text())
    assert conf["target_parameters"] == [
        "mlp.router.weight",
        "mlp.experts.gate_up_proj",
        "mlp.experts.down_proj",
    ]
    assert sorted(conf["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_lora_loss_and_every_gradient_match_peft(layout, hf_ckpt, original_ckpt, adapters, peft_reference):
    ref_loss, ref_grads, _ = peft_reference
    model = our_model(hf_ckpt if layout == "hf" else original_ckpt, "float32")
    cfg = our_model(hf_ckpt, "float32").cfg
    # The original layout's config leaves layer_types and the context length implicit (same values): one
    # static config for both layouts, so they share one compiled function.
    assert (model.cfg.sliding_layers, model.cfg.context_length) == (cfg.sliding_layers, cfg.context_length)
    loss, g = _ours(model_params(model), adapters, make_batch(), cfg, LCFG)
    assert abs(float(loss) - ref_loss) <= TOL * abs(ref_loss)
    names = peft_names(cfg, LCFG)
    errs = {}
    for name, (ours, r, which) in names.items():
        got = _to_peft(np.asarray(g[ours][r]), target_of(ours) in EXPERT_TARGETS, which)
        assert np.abs(ref_grads[name]).max() > 0, name
        errs[name] = rel_err(got, ref_grads[name])
    worst = max(errs, key=errs.get)
    assert errs[worst] < TOL, (worst, errs[worst])


def _torch_grad_in_our_layout(cfg, torch_grads: dict) -> dict[str, np.ndarray]:
    """Gradients of the HF model's parameters -> our stacked parameter names, through the loader's key
    table (the same reshapes/transposes as the weights; experts: (E, in, out) -> (E, out, in))."""
    out = {n: np.zeros(s.shape, np.float32) for n, s in weights.param_specs(cfg).items()}
    for rule in keys.rules(cfg, "hf", "dequantized"):
        name, r = weights.storage_slot(rule.target, cfg)
        src = rule.sources[0]
        if rule.target.endswith(("mlp1_weight", "mlp2_weight")):
            src = src.rsplit("_", 1)[0]  # ..._blocks -> the dense gate_up_proj / down_proj
            arr = torch_grads[src].transpose(0, 2, 1)
        else:
            arr = rule.transform(torch_grads[src])
        if r is None:
            out[name] = arr
        else:
            out[name][r] = arr
    return out


def test_full_fine_tuning_gradient_of_every_weight_matches_torch(hf_ckpt):
    model = our_model(hf_ckpt, "float32", expert_format="dequantized")
    cfg = model.cfg
    batch = make_batch(1)
    params = model_params(model)
    loss, g = _ours({}, params, batch, cfg, None)

    base = torch_base(hf_ckpt)
    ref = torch_loss(base, batch)
    ref.backward()
    assert abs(float(loss) - float(ref.detach())) <= TOL * abs(float(ref.detach()))
    want = _torch_grad_in_our_layout(cfg, {n: p.grad.numpy() for n, p in base.named_parameters()})
    assert set(want) == set(g)
    errs = {n: rel_err(np.asarray(g[n]), want[n]) for n in want}
    worst = max(errs, key=errs.get)
    assert errs[worst] < TOL, (worst, errs[worst])


def test_trained_adapters_round_trip_through_peft(hf_ckpt, tmp_path):
    """A few gradient steps, the adapters written, PEFT's logits = ours with the adapters applied; our
    reader gives back the same arrays. (`make_step`, the optimizer around these gradients, is exercised by
    test_finetune and test_sharded.)"""
    import torch
    from peft import PeftModel

    model = gptoss_jax.load(hf_ckpt, dtype="float32", quiet=True)  # a model of its own: apply mutates it
    cfg = our_model(hf_ckpt, "float32").cfg
    ad = init_adapters(cfg, LCFG, seed=5)
    for s in range(3):
        _, g = _ours(model_params(model), ad, make_batch(10 + s), cfg, LCFG)
        ad = jax.tree.map(lambda a, d: a - 0.5 * d, ad, g)
    folder = save_adapters(tmp_path / "ad", ad, cfg, LCFG)
    back, lcfg = load_adapters(folder, cfg)
    assert lcfg == LCFG and all(np.array_equal(back[n], np.asarray(ad[n])) for n in ad)

    tokens = make_batch(20)["tokens"]
    ours = np.asarray(apply_adapters(model, folder)(tokens))
    peft = PeftModel.from_pretrained(torch_base(hf_ckpt), str(folder))
    with torch.no_grad():
        ref = peft(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    base = np.asarray(our_model(hf_ckpt, "float32")(tokens))
    assert rel_err(base, ref) > 100 * TOL  # the adapters changed the logits
    assert rel_err(ours, ref) < TOL


def test_bad_adapter_folders_are_one_line_errors(tmp_path, tiny_cfg, adapters):
    folder = save_adapters(tmp_path / "ad", adapters, tiny_cfg, LCFG)
    conf = json.loads((folder / CONFIG_FILE).read_text())
    with pytest.raises(LoraError) as e:
        load_adapters(tmp_path / "nothing", tiny_cfg)
    assert_one_line(e, "adapter_config.json")
    (folder / CONFIG_FILE).write_text(json.dumps(conf | {"use_dora": True}))
    with pytest.raises(LoraError) as e:
        load_adapters(folder, tiny_cfg)
    assert_one_line(e, "use_dora")
    (folder / CONFIG_FILE).write_text(json.dumps(conf | {"r": 8}))  # the tensors have rank 4
    with pytest.raises(LoraError) as e:
        load_adapters(folder, tiny_cfg)
    assert_one_line(e, "adapter_model.safetensors", "lora_A.weight", "r=8")
    (folder / CONFIG_FILE).write_text(json.dumps(conf | {"target_modules": ["q_proj", "gate_proj"]}))
    with pytest.raises(LoraError) as e:
        load_adapters(folder, tiny_cfg)
    assert_one_line(e, "gate_proj")
    (folder / CONFIG_FILE).write_text(json.dumps(conf))
    with pytest.raises(LoraError) as e:  # a model with another number of experts
        load_adapters(folder, tiny_cfg.replace(num_experts=4, experts_per_token=2))
    assert_one_line(e, "mlp.router.lora_B.weight", "expected")


def test_adapters_of_some_layers_load_with_zeros_elsewhere(tmp_path, tiny_cfg, adapters):
    """As the cookbook's "7.mlp.experts.gate_up_proj" targets: tensors for some layers only."""
    from gptoss_jax.checkpoint.safetensors import SafetensorsFile, save_file

    folder = save_adapters(tmp_path / "ad", adapters, tiny_cfg, LCFG)
    f = SafetensorsFile(folder / "adapter_model.safetensors")
    kept = {k: np.array(f.get(k)) for k in f.keys() if ".layers.1." in k}
    f.close()
    save_file(kept, folder / "adapter_model.safetensors")
    back, _ = load_adapters(folder, tiny_cfg)
    for name, a in back.items():  # layer 1 = unit position 1, repeat 0; the other layers are zero
        want = np.zeros_like(a)
        if name.startswith("blocks.1."):
            want[0] = np.asarray(adapters[name])[0]
        assert np.array_equal(a, want), name
    save_file({k: v for k, v in kept.items() if ".router." not in k}, folder / "adapter_model.safetensors")
    with pytest.raises(LoraError) as e:
        load_adapters(folder, tiny_cfg)
    assert_one_line(e, "no tensors for target 'router'")
