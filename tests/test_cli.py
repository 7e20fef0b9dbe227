"""The `gptoss-jax` command, run in-process through `cli.main(argv)` (and once as a real subprocess).

Every command is exercised on tiny checkpoints written in the released layout: `generate`/`bench` on the
vocab-1000 test checkpoint with token-id prompts, `demo` writes its own real-vocabulary checkpoint, which
`generate --prompt` and `chat` then read. Outputs are compared with the library API called directly, chat
prompts with openai-harmony's rendering, and each kind of bad input must give exit code 2 and exactly one
line on stderr (never a traceback).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
from clitools import cli_env, run_main
from hf_reference import our_model

import gptoss_jax
from gptoss_jax import cli
from gptoss_jax import harmony as hm
from gptoss_jax import tokenizer as tk
from gptoss_jax.kernels import resolve_impl

PROMPT_IDS = [5, 17, 230, 999, 0, 42, 7]




def assert_usage_error(rc: int, err: str, *needles: str, prefix: str = "gptoss-jax: error: ") -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`gptoss-jax demo --out DIR`: the real-vocabulary checkpoint, kept for the text and chat tests."""
    out = tmp_path_factory.mktemp("demo") / "tiny"
    buf_out, buf_err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = buf_out, buf_err
    try:
        rc = cli.main(["demo", "--out", str(out), "--max-new-tokens", "6"])
    finally:
        sys.stdout, sys.stderr = old
    return rc, buf_out.getvalue(), out


# --------------------------------------------------------------------------------------------- demo
def test_demo_writes_real_layout_loads_and_generates(demo_run):
    rc, out, path = demo_run
    assert rc == 0, out
    names = sorted(p.name for p in path.iterdir())
    assert "model.safetensors.index.json" in names and "config.json" in names
    assert sum(n.endswith(".safetensors") for n in names) >= 2  # sharded, as released
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in index["weight_map"]  # MXFP4 packed experts
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab_size"] == tk.N_VOCAB and cfg["quantization_config"]["quant_method"] == "mxfp4"
    # what it prints: the steps, the size, the tokens and their text, and the speed
    for needle in ("Writing a random gpt-oss checkpoint", "MiB", "Loading it with gptoss_jax.load",
                   "o200k_harmony tokens", "Generated 6 tokens", "gibberish", "prefill", "decode", "tok/s"):  # fmt: skip
        assert needle in out, (needle, out)
    # the tokens printed are what the library generates from the same files and prompt
    model = gptoss_jax.load(path, dtype="float32", quiet=True)
    ids = tk.encode("The capital of France is")
    assert f"{ids}" in out
    new = gptoss_jax.generate(model, ids, max_new_tokens=6, callback=lambda t: None)[0]
    assert f"Generated {len(new)} tokens {new}" in out
    assert repr(tk.decode(new)) in out


def test_demo_refuses_existing_folder(capsys, tmp_path):
    rc, _, err = run_main(capsys, "demo", "--out", tmp_path)
    assert_usage_error(rc, err, str(tmp_path), "already exists")


# ----------------------------------------------------------------------------------------- generate
def test_generate_token_ids_streamed_and_not(capsys, hf_ckpt):
    ref = gptoss_jax.generate(our_model(hf_ckpt), PROMPT_IDS, max_new_tokens=6)[0]
    toks = ",".join(map(str, PROMPT_IDS))
    rc, out, err = run_main(capsys, "generate", hf_ckpt, "--tokens", toks, "--max-new-tokens", 6, "--dtype",
                           "float32", "--no-stream")  # fmt: skip
    assert rc == 0, err
    assert [int(t) for t in out.split()] == ref
    assert "loaded" in err and "5 experts" in err
    rc, out, err = run_main(capsys, "generate", hf_ckpt, "--tokens", toks, "--max-new-tokens", 6, "--dtype",
                           "float32", "--quiet")  # fmt: skip
    assert rc == 0 and err == ""
    assert [int(t) for t in out.split()] == ref


def test_generate_text_prompt(capsys, demo_run):
    path = demo_run[2]
    model = gptoss_jax.load(path, dtype="float32", quiet=True)
    # same shapes as the demo's run (prompt bucket 16, 6 new tokens): the compiled steps are reused
    new = gptoss_jax.generate(model, tk.encode("Hello there"), max_new_tokens=6, callback=lambda t: None)[0]
    rc, out, err = run_main(capsys, "generate", path, "--prompt", "Hello there", "--max-new-tokens", 6, "--quiet")
    assert rc == 0, err
    assert out == tk.decode(new) + "\n"


def test_generate_on_a_mesh_matches_one_device(capsys, hf_ckpt):
    ref = gptoss_jax.generate(our_model(hf_ckpt), PROMPT_IDS, max_new_tokens=6)[0]
    rc, out, err = run_main(capsys, "generate", hf_ckpt, "--tokens", " ".join(map(str, PROMPT_IDS)),
                           "--max-new-tokens", 6, "--dtype", "float32", "--mesh", "data=2,expert=2,model=2",
                           "--no-stream", "--quiet")  # fmt: skip
    assert rc == 0, err
    assert [int(t) for t in out.split()] == ref


# -------------------------------------------------------------------------------------------- bench
def test_bench_reports_speed_and_memory(capsys, hf_ckpt):
    rc, out, err = run_main(capsys, "bench", hf_ckpt, "--prompt-len", 8, "--new", 5, "--reps", 1, "--dtype",
                           "float32", "--quiet")  # fmt: skip
    assert rc == 0, err
    auto = resolve_impl("auto")  # the header says what "auto" resolved to on this platform
    assert out.splitlines()[0].endswith(f"attention {auto} (auto), moe {auto} (auto))"), out
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    for name in ("prefill", "decode", "compile", "weights", "kv", "host"):
        assert name in rows, out
    assert "tok/s" in rows["prefill"] and "tok/s" in rows["decode"]
    from gptoss_jax.cache import cache_bytes

    cfg = our_model(hf_ckpt).cfg
    assert f"{cache_bytes(cfg, 1, 14) / 2**20:.1f} MiB" in rows["kv"]


# --------------------------------------------------------------------------------------------- chat
def _prompts(out: str) -> list[list[int]]:
    return [[int(t) for t in line.split("] ", 1)[1].split()] for line in out.splitlines()
            if line.startswith("[prompt ")]  # fmt: skip


def test_chat_real_model_prompt_is_harmony_rendering(capsys, demo_run):
    path = demo_run[2]
    rc, out, err = run_main(capsys, "chat", path, "-m", "What is 2+2?", "--reasoning-effort", "low",
                           "--max-new-tokens", 4, "--show-prompt", "--date", "2025-08-05")  # fmt: skip
    assert rc == 0, err
    (prompt,) = _prompts(out)
    assert prompt == hm.render_chat_prompt([("user", "What is 2+2?")], reasoning_effort="low",
                                           conversation_start_date="2025-08-05")  # fmt: skip
    assert "Reasoning: low" in tk.decode(prompt)
    # random weights do not speak harmony: what does not parse is shown as final text, never a harmony marker
    assert "<|" not in out


GREETING = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>Hello! How can I help?<|return|>")  # fmt: skip


@pytest.fixture
def scripted_model(monkeypatch, request):
    """Replaces generation with a fixed harmony reply (analysis, then final; or the test's parameter), fed
    token by token, and loading with nothing (the checkpoint's config is still read, to check the arguments)."""
    reply = getattr(request, "param", GREETING)
    tokens = tk.encode(reply, allowed_special="all")
    seen = []

    def fake_generate(model, prompt, *, callback, stop_tokens, max_new_tokens, **kw):
        seen.append((list(prompt), list(stop_tokens)))
        out = tokens[:max_new_tokens]
        for t in out:
            callback([t])
        return [out]

    monkeypatch.setattr(sys.modules["gptoss_jax.generate"], "generate", fake_generate)
    monkeypatch.setattr(cli, "_load", lambda args: None)
    return seen


def test_chat_channels_and_multi_turn_history(capsys, scripted_model, demo_run):
    rc, out, err = run_main(capsys, "chat", demo_run[2], "-m", "Hi", "-m", "Bye", "--show-prompt",
                           "--developer", "Be terse.")  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert lines.count("[analysis] The user greets; answer briefly.") == 2
    assert lines.count("[final] Hello! How can I help?") == 2
    p1, p2 = _prompts(out)
    assert p1 == hm.render_chat_prompt([("user", "Hi")], developer_instructions="Be terse.")
    # turn 2 carries turn 1's final answer; harmony drops its analysis
    assert p2 == hm.render_chat_prompt([("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Bye")],
                                       developer_instructions="Be terse.")  # fmt: skip
    assert "The user greets" not in tk.decode(p2)
    assert [p for p, _ in scripted_model] == [p1, p2]
    assert sorted(scripted_model[0][1]) == sorted([tk.RETURN, tk.CALL])


TOOL_CALL = ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant to=functions.get_weather"
             '<|channel|>commentary <|constrain|>json<|message|>{"city": "Paris"}<|call|>')  # fmt: skip


@pytest.mark.parametrize("scripted_model", [TOOL_CALL], indirect=True)
def test_chat_shows_a_tool_call_as_the_server_parses_it(capsys, scripted_model, demo_run):
    rc, out, err = run_main(capsys, "chat", demo_run[2], "-m", "Weather in Paris?")
    assert rc == 0, err
    assert out.splitlines() == ["[commentary] Checking.", '[call get_weather] {"city": "Paris"}']


def test_chat_reads_stdin_and_hides_analysis(capsys, monkeypatch, scripted_model, demo_run):
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n\nnot read\n"))
    rc, out, err = run_main(capsys, "chat", demo_run[2], "--hide-analysis", "--show-prompt")
    assert rc == 0, err
    assert "[analysis]" not in out
    assert out.count("[final] Hello! How can I help?") == 2
    assert len(_prompts(out)) == 2


def test_chat_truncated_reply(capsys, scripted_model, demo_run):
    rc, _, err = run_main(capsys, "chat", demo_run[2], "-m", "Hi", "--max-new-tokens", 3)
    assert rc == 0, err
    assert "max-new-tokens 3" in err


# --------------------------------------------------------------------------------------------- info
def test_info_is_wired_to_the_memory_plan(capsys):
    rc, out, err = run_main(capsys, "info", "gpt-oss-20b", "--mesh", "expert=8")
    assert rc == 0, err
    assert out.strip()
    rc, _, err = run_main(capsys, "info", "gpt-oss-20b", "--mesh", "expert=banana")
    assert_usage_error(rc, err, "expert", prefix="gptoss-jax info: error: ")


# ---------------------------------------------------------------------------------------- bad input
def test_bad_token_ids(capsys, hf_ckpt):
    # errors found after loading: --quiet leaves only the error on stderr (no "loaded ..." status line)
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "5 1000 3", "--dtype", "float32", "--quiet")
    assert_usage_error(rc, err, "1000", "vocabulary")
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "5 -1", "--dtype", "float32", "--quiet")
    assert_usage_error(rc, err, "-1", "vocabulary")
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "5 x7")
    assert_usage_error(rc, err, "x7")


def test_text_prompt_needs_the_real_vocabulary(capsys, hf_ckpt):
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--prompt", "Hello world, this is text", "--dtype", "float32",
                         "--quiet")  # fmt: skip
    assert_usage_error(rc, err, "outside the vocabulary [0, 1000)")


def test_context_longer_than_cache(capsys, hf_ckpt):
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "1 2 3 4", "--max-new-tokens", 10,
                         "--max-context", 8, "--dtype", "float32", "--quiet")  # fmt: skip
    assert_usage_error(rc, err, "14", "cache length 8")


def test_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    rc, _, err = run_main(capsys, "generate", tmp_path, "--tokens", "1 2")
    assert_usage_error(rc, err, str(tmp_path))
    rc, _, err = run_main(capsys, "bench", tmp_path / "missing")
    assert_usage_error(rc, err, "missing")


def test_bad_config(capsys, hf_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(hf_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # 6 query heads are not a multiple of 4
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_main(capsys, "chat", bad, "-m", "hi")
    assert_usage_error(rc, err, "num_key_value_heads")
    (bad / "config.json").write_text("{not json")
    rc, _, err = run_main(capsys, "generate", bad, "--tokens", "1")
    assert_usage_error(rc, err, "config.json")


def test_bad_mesh(capsys, hf_ckpt):
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "1", "--mesh", "expert=two")
    assert_usage_error(rc, err, "expert")
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "1", "--mesh", "gpu=8")
    assert_usage_error(rc, err, "gpu")
    rc, _, err = run_main(capsys, "bench", hf_ckpt, "--mesh", "expert=3")  # 8 devices in tests
    assert_usage_error(rc, err, "needs 3 devices")


def test_bad_arguments(capsys, hf_ckpt):
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "1", "--max-new-tokens", 0)
    assert_usage_error(rc, err, "--max-new-tokens")
    rc, _, err = run_main(capsys, "generate", hf_ckpt, "--tokens", "1", "--dtype", "float16")
    assert_usage_error(rc, err, "--dtype")
    rc, _, err = run_main(capsys, "generate", hf_ckpt)
    assert_usage_error(rc, err, "--prompt", "--tokens")
    rc, _, err = run_main(capsys, "chat", hf_ckpt, "--reasoning-effort", "extreme")
    assert_usage_error(rc, err, "extreme")
    rc, _, err = run_main(capsys, "bench", hf_ckpt, "--new", 0)
    assert_usage_error(rc, err, "--new")
    rc, _, err = run_main(capsys, "frobnicate")
    assert_usage_error(rc, err, "frobnicate")


def test_console_script_and_module_entry_point(tmp_path):
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "gptoss-jax"]
    assert ep.value == "gptoss_jax.cli:main"
    res = subprocess.run([sys.executable, "-m", "gptoss_jax", "generate", str(tmp_path / "nope"), "--tokens", "1"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "nope" in res.stderr and "Traceback" not in res.stderr


def test_compile_cache_is_written_and_reused(tmp_path):
    """`--compile-cache DIR`: the first run writes compiled programs there, a second run reuses them and
    generates the same tokens (two real processes: JAX reads its cache setting once per process)."""
    cache = tmp_path / "xla"
    cmd = [sys.executable, "-m", "gptoss_jax", "demo", "--max-new-tokens", "4", "--compile-cache", str(cache)]
    env = cli_env(GPTOSS_JAX_COMPILE_CACHE="off", JAX_LOG_COMPILES=1)  # the flag must win; log hits
    runs, entries = [], []
    for _ in range(2):
        runs.append(subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env))  # noqa: PLW1510
        assert runs[-1].returncode == 0, runs[-1].stderr[-2000:]
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert entries[0] and entries[1] == entries[0]
    assert "cache hit" not in runs[0].stderr.lower() and "cache hit" in runs[1].stderr.lower()
    generated = [[ln for ln in r.stdout.splitlines() if "Generated 4 tokens" in ln] for r in runs]
    assert generated[0] and generated[0] == generated[1]


def test_compile_cache_off_and_unusable(capsys, tmp_path):
    assert cli.setup_compile_cache("off") is None
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.setup_compile_cache(str(blocker / "xla")) is None  # cannot be created: warn, run without
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "warning" in err and str(blocker) in err


# ------------------------------------------------------------------------------------ LoRA adapter pool
@pytest.fixture(scope="module")
def adapter_dirs(tiny_cfg, tmp_path_factory):
    from adaptertools import write_adapters

    return write_adapters(tmp_path_factory.mktemp("adapters"), tiny_cfg, names=("attn2", "experts3"))


def test_info_plans_the_adapter_pool(capsys, hf_ckpt, adapter_dirs):
    """The planned bytes per adapter are those an engine's pool allocates per slot."""
    from gptoss_jax.engine.adapters import AdapterPool

    a, e = adapter_dirs["attn2"], adapter_dirs["experts3"]
    rc, out, err = run_main(capsys, "info", hf_ckpt, "--serve", "--adapters", f"a={a}", "--adapters", f"e={e}",
                            "--max-adapters", 3, "--json")  # fmt: skip
    assert rc == 0, err
    plan = json.loads(out)["adapters"]
    assert (plan["max_adapters"], plan["rank"]) == (3, 3)
    assert plan["targets"] == ["q", "k", "v", "o", "mlp1", "mlp2"]
    assert plan["resident"]["e"]["rank"] == 3 and plan["resident"]["a"]["targets"] == ["q", "k", "v", "o"]
    pool = AdapterPool(our_model(hf_ckpt).cfg, max_adapters=3, rank=3, targets=plan["targets"])
    allocated = sum(x.nbytes for x in pool.arrays.values())
    assert plan["bytes_per_adapter"] * 4 == plan["bytes_total"] == allocated
    rc, out, err = run_main(capsys, "info", hf_ckpt, "--serve", "--adapters", f"a={a}")
    assert rc == 0 and "per resident adapter" in out and "a: rank 2, q,k,v,o" in out, err
    rc, _, err = run_main(capsys, "info", hf_ckpt, "--adapters", f"x={hf_ckpt}")
    assert rc == 2 and "--adapters x=" in err and "adapter_config.json" in err


def test_bench_times_a_mixed_batch(capsys, hf_ckpt, adapter_dirs):
    a, e = adapter_dirs["attn2"], adapter_dirs["experts3"]
    rc, out, err = run_main(capsys, "bench", hf_ckpt, "--adapters", f"a={a},e={e}", "--batch", 2, "--prompt-len",
                            8, "--new", 3, "--reps", 1, "--dtype", "float32", "--quiet")  # fmt: skip
    assert rc == 0, err
    rows = out.splitlines()
    assert "adapter pool 2 x rank 3" in rows[0]
    for label, row in zip(("base only", "one adapter (a)", "mixed (2 adapters)"), rows[1:4], strict=True):
        assert row.strip().startswith(label) and "tok/s" in row and "ms/step" in row, out
    rc, _, err = run_main(capsys, "bench", hf_ckpt, "--adapters", "a=")
    assert rc == 2 and "'a=' is not NAME=DIR" in err
