"""Fine-tuning end to end: it learns tool calls, a SIGKILLed run resumes bit-identically, the CLI's errors.

The base is a tiny model with the real o200k_harmony vocabulary (2 layers, hidden 64, 5 experts top-3)
written in the released layout, with one change: its final norm scale is 5x the random draw. A random
model's final RMSNorm keeps |h| near sqrt(hidden) = 8, and against 201088 random unembedding rows no token
can then get more than ~1% probability (training plateaus at ~4.7 nats; a trained model's norm is larger).

The data: four weather conversations, each a tool call whose JSON argument copies the city from the user
message, the tool's answer, and a final reply. LoRA on every target (experts packed), 50 steps. Greedy
generation must then reproduce each call (recipient and exact arguments) and each final reply.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from apitools import KEY, MODEL, start_server, stop_server
from conftest import assert_one_line

import gptoss_jax
from gptoss_jax import cli
from gptoss_jax.adapters import apply_adapters
from gptoss_jax.checkpoint.safetensors import SafetensorsFile, save_file
from gptoss_jax.checkpoint.synthetic import write_checkpoint
from gptoss_jax.config import Config
from gptoss_jax.harmony import (
    PromptSettings,
    parse_completion_messages,
    read_prompt_settings,
    render_chat_prompt,
)
from gptoss_jax.lora import LoraConfig
from gptoss_jax.training.loop import TrainConfig, TrainError, finetune

CITIES = {"Paris": 18, "Tokyo": 24, "Lima": 15, "Oslo": 3}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
LORA = LoraConfig(rank=16, alpha=64, targets="all")
TRAIN = TrainConfig(
    learning_rate=5e-3, warmup_steps=5, steps=50, batch_size=4, seq_len=256, pack=False, save_every=10
)
CLI_ARGS = [
    "--rank",
    "16",
    "--alpha",
    "64",
    "--targets",
    "all",
    "--lr",
    "5e-3",
    "--warmup",
    "5",
    "--steps",
    "50",
    "--batch",
    "4",
    "--seq-len",
    "256",
    "--no-pack",
    "--save-every",
    "10",
    "--dtype",
    "float32",
]


def conversation(city: str, temp: int) -> dict:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }
    return {
        "messages": [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"temp_c": temp})},
            {"role": "assistant", "content": f"It is {temp} C in {city}."},
        ],
        "tools": TOOLS,
    }


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory) -> Path:
    path = write_checkpoint(
        tmp_path_factory.mktemp("base") / "tiny", Config.tiny(num_hidden_layers=2), seed=0
    )
    f = SafetensorsFile(path / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys()}
    f.close()
    norm = tensors["model.norm.weight"]
    tensors["model.norm.weight"] = (norm.astype(np.float32) * 5).astype(norm.dtype)
    save_file(tensors, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("data") / "weather.jsonl"
    f.write_text("".join(json.dumps(conversation(c, t)) + "\n" for c, t in CITIES.items()))
    return f


@pytest.fixture(scope="module")
def learned(chat_base, chat_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    return finetune(chat_base, chat_data, out, lora=LORA, train=TRAIN, dtype="float32", quiet=True)


def _greedy(model, prompts: list[list[int]]) -> list[list[int]]:
    return gptoss_jax.generate(model, prompts, max_new_tokens=40)


def test_it_learns_the_tool_calls_and_the_replies(learned, chat_base, chat_data):
    out = learned.out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 51))
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"]) / 100
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_prompt_settings(out) == PromptSettings()  # finetune's defaults: medium, no date

    model = apply_adapters(gptoss_jax.load(chat_base, dtype="float32", quiet=True), out)  # the inference path
    examples = [conversation(c, t) for c, t in CITIES.items()]
    prompts = [render_chat_prompt(ex["messages"][:2], tools=ex["tools"]) for ex in examples]
    for (city, _), got in zip(CITIES.items(), _greedy(model, prompts), strict=True):
        (msg,) = parse_completion_messages(got, strict=True)
        assert msg.recipient == "functions.get_weather" and msg.channel == "commentary", msg
        assert json.loads(msg.content[0].text) == {"city": city}
    prompts = [render_chat_prompt(ex["messages"][:4], tools=ex["tools"]) for ex in examples]
    for (city, temp), got in zip(CITIES.items(), _greedy(model, prompts), strict=True):
        (msg,) = parse_completion_messages(got, strict=True)
        assert (msg.channel, msg.content[0].text) == ("final", f"It is {temp} C in {city}.")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "gptoss_jax", *map(str, args)]


def test_a_killed_run_resumes_bit_identically(learned, chat_base, chat_data, tmp_path):
    """The CLI with the settings of `learned`, SIGKILLed once its step-10 checkpoint is complete, then run
    again: the adapters and every step's loss equal the uninterrupted in-process run's, bit for bit."""
    out = tmp_path / "out"
    cmd = _cli(
        "finetune",
        chat_base,
        chat_data,
        "--out",
        out,
        *CLI_ARGS,
        "--quiet",
        "--compile-cache",
        tmp_path / "xla",
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [str(Path(gptoss_jax.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoints" / "10" / "_CHECKPOINT_METADATA").exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        assert proc.poll() is None  # still training: killed mid-run
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "adapter_config.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "adapter_model.safetensors").read_bytes() == (
        learned.out / "adapter_model.safetensors"
    ).read_bytes()
    losses = [r["loss"] for r in csv.DictReader(open(out / "loss.csv"))]
    assert losses == [r["loss"] for r in csv.DictReader(open(learned.out / "loss.csv"))]


def test_resuming_with_other_settings_is_refused(learned, chat_base, chat_data):
    with pytest.raises(TrainError) as e:
        finetune(
            chat_base,
            chat_data,
            learned.out,
            lora=LORA,
            train=TRAIN.__class__(**{**TRAIN.__dict__, "learning_rate": 1e-3}),
            dtype="float32",
            quiet=True,
        )
    assert_one_line(e, "checkpoints", "learning_rate was 0.005, now 0.001")
    with pytest.raises(TrainError) as e:  # the prompts' settings are the run's too
        finetune(chat_base, chat_data, learned.out, lora=LORA, train=TRAIN, dtype="float32", quiet=True,
                 date="2025-08-05")  # fmt: skip
    assert_one_line(e, "checkpoints", 'prompt was ["medium", null], now ["medium", "2025-08-05"]')


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--rank", "0"], "LoRA rank"),
        (["--targets", "q,gate"], "unknown LoRA target 'gate'"),
        (["--batch", "3", "--mesh", "data=2,expert=4"], "batch_size 3"),
        (["--lr", "-1"], "learning_rate"),
    ],
)
def test_cli_errors_are_one_line_exit_2(chat_base, chat_data, tmp_path, capsys, args, needle):
    rc = cli.main([str(a) for a in ("finetune", chat_base, chat_data, "--out", tmp_path / "o", *args)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], lines


def test_cli_bad_data_line(chat_base, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(conversation("Paris", 18)) + "\n" + '{"messages": [{"role": "user"}]}\n')
    rc = cli.main(["finetune", str(chat_base), str(data), "--out", str(tmp_path / "o")])
    why = "messages[0].content must be a string or a list of text parts, got NoneType"
    assert rc == 2 and capsys.readouterr().err.strip().splitlines() == [
        f"gptoss-jax: error: {data} line 2: {why}"
    ]


def test_full_fine_tuning_runs_and_updates_the_model(chat_base, chat_data, tmp_path):
    """`full=True`: every weight trained (experts dequantized on load), the model gets the new weights."""
    train = TrainConfig(learning_rate=1e-3, steps=2, batch_size=2, seq_len=256, pack=False, full=True)
    res = finetune(chat_base, chat_data, tmp_path / "full", train=train, dtype="float32", quiet=True)
    assert res.model.cfg.expert_format == "dequantized" and "blocks.0.mlp.mlp1_weight" in res.trainable
    assert res.losses[1] < res.losses[0]
    assert (tmp_path / "full" / "checkpoints" / "2").is_dir() and not (
        tmp_path / "full" / "adapter_config.json"
    ).exists()
    w = res.model.blocks[0].attn.q_weight[...]
    assert np.array_equal(np.asarray(w), np.asarray(res.trainable["blocks.0.attn.q_weight"]))


def test_generate_with_adapters_on_the_command_line(learned, chat_base, capsys):
    prompt = render_chat_prompt(conversation("Lima", 15)["messages"][:2], tools=TOOLS)
    ids = " ".join(map(str, prompt))
    argv = ["generate", str(chat_base), "--adapters", str(learned.out), "--tokens", ids,
            "--max-new-tokens", "40", "--no-stream", "--dtype", "float32", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    (msg,) = parse_completion_messages([int(t) for t in capsys.readouterr().out.split()], strict=True)
    assert msg.recipient == "functions.get_weather" and json.loads(msg.content[0].text) == {"city": "Lima"}


def test_serve_with_adapters_returns_the_learned_tool_calls(learned, chat_base, tmp_path):
    """`gptoss-jax serve --adapters`: the openai client gets the learned calls as `tool_calls`. The prompts
    as trained: serve reads the adapters' prompt settings (no conversation date) and says so."""
    from openai import OpenAI

    proc, url = start_server(chat_base, tmp_path / "serve.log", "--adapters", str(learned.out))
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        for city in ("Paris", "Oslo"):
            messages = conversation(city, CITIES[city])["messages"][:2]
            r = client.chat.completions.create(
                model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=40
            )
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", (choice, (tmp_path / "serve.log").read_text()[-2000:])
            (call,) = choice.message.tool_calls
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": city}
    finally:
        assert stop_server(proc) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "prompt settings of the adapters (" in log and "no conversation date" in log and "overrides" not in log


def test_rows_of_1024_tokens_and_more_have_a_gradient(chat_base, chat_data, tmp_path):
    """From 1024 keys the attention takes its blocked path (`_kv_blocked`); fine-tuning there once failed
    (a loop with data bounds has no reverse-mode derivative). Rows of 1056 tokens: the loss goes down."""
    train = TrainConfig(learning_rate=5e-3, steps=2, batch_size=1, seq_len=1056, pack=True)
    res = finetune(chat_base, chat_data, tmp_path / "long", train=train, dtype="float32", quiet=True)
    assert np.all(np.isfinite(res.losses)) and res.losses[1] < res.losses[0]
