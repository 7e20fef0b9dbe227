"""Every shell command in README.md and docs/*.md, run as written (issue 10: every documented command works).

The commands are read from the files at test time, so an edited README is tested as it stands:

- In ```bash / ```sh / ```shell / ```console blocks every line is a command; in other non-Python blocks, the
  lines that start with `$ ` or with one of `PROGRAMS`. A trailing `\\` or an open quote continues a command
  on the next line; `#` lines are comments. After a `$ ` command, the block's following lines are its
  documented output, compared with what it prints.
- Each command either runs, or is in `SKIP` with the reason it cannot run here;
  `test_every_command_is_run_or_skipped` fails on a command that is neither, and on a `SKIP` entry that no
  longer matches anything.

How the commands run (`bash -c`, stdin "Hello", in one shared workspace folder):

- The workspace holds what the docs' download commands would have left there, as tiny checkpoints with the
  real o200k_harmony vocabulary: `gpt-oss-20b/` (Hugging Face layout) and `gpt-oss-120b/original/` (OpenAI's
  layout). The same checkpoints sit in a Hugging Face hub cache as `openai/gpt-oss-20b` and
  `openai/gpt-oss-120b`, with `HF_HUB_OFFLINE=1`. One compilation cache is shared by all commands.
- `SUBSTITUTIONS` adapt the text: the conversion docs' `/data/` becomes the workspace, and generation and
  benchmark lengths shrink (4 new tokens, one timed repetition) so each command takes seconds.
- Commands that make files other commands read (`gptoss-convert`, `... > file`) run first, in document order,
  when the workspace is built; each is still a test of its own.
- `gptoss-jax info <preset>` runs in an empty folder: there the name means the preset, as on a machine without
  a download (in the workspace it would name the tiny checkpoint's folder).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clitools import REPO, cli_env
from test_cli_hub import add_to_cache

from gptoss_jax.checkpoint.synthetic import write_checkpoint
from gptoss_jax.config import Config

pytestmark = pytest.mark.slow

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
OTHER_BLOCKS = {"", "python", "text", "json", "toml", "yaml"}  # "" (unlabeled): output, with `$ ` commands
PROGRAMS = {
    "gptoss-jax",
    "gptoss-convert",
    "python",
    "python3",
    "pip",
    "huggingface-cli",
    "hf",
    "gcloud",
    "srun",
}

# why a command does not run here, by the start of its words (after substitution, quotes removed)
SKIP = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && gptoss-jax demo": (
        "a fresh install: tests/test_clean_install.py runs `pip install -e .` in a new venv, then the demo"
    ),
    "pip install -e . && gptoss-jax demo": "a fresh install: tests/test_clean_install.py",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e .[test] && python -m pytest -q": (
        "the test suite itself (.ci/run)"
    ),
    "pip install -e .[test]": "installs the test extra, which is what runs these tests",
    "pip install -U": "downloads packages from PyPI",
    "huggingface-cli download": "downloads gigabytes from the Hugging Face Hub (ids: tests/test_cli_hub.py)",
    "hf download": "downloads gigabytes from the Hugging Face Hub",
    "gcloud ": "needs a Cloud TPU pod slice",
    "srun ": "needs a Slurm cluster",
    "python -m pytest -q tests/kernels": "a part of the test suite itself",
    "python benchmarks/gpu_bench.py --models": "needs an H100",
    "python benchmarks/gpu_bench.py --smoke": "a benchmark: 1.5 min on CPU, too long for the suite",
    "python benchmarks/cpu_vs_transformers.py": "a benchmark: minutes on 2 cores, writes a 0.5 GB checkpoint",
    "python benchmarks/cpu_profile.py": "a benchmark: minutes on 2 cores",
    "python benchmarks/convert_bench.py": "a benchmark: writes and converts a 1.5 GB checkpoint",
    # training (docs/training.md): tests/training/test_finetune.py runs finetune and --adapters on a tiny model
    "gptoss-jax finetune": "a training run: minutes on CPU, and it needs a chat JSONL file",
    "gptoss-jax chat --max-new-tokens 4 openai/gpt-oss-20b --adapters": "needs the adapters a finetune run writes",
    "gptoss-jax merge": "needs the adapters a finetune run writes: tests/training/test_merge.py runs it",
    "python benchmarks/finetune_vs_peft.py": "a benchmark: minutes on 2 cores",
    "python benchmarks/": "a benchmark script: minutes on 2 cores, figures recorded in docs/benchmarks.md",
    "gptoss-jax serve": "a server runs until stopped: tests/server start it and drive it over HTTP",
    "curl ": "needs a running server: tests/server send the same requests with the openai client",
}

# (pattern, replacement) applied to each command before it runs
SUBSTITUTIONS = [
    (r"(?<![\w.-])/data/", ""),  # docs/conversion.md's example folder: the workspace
    (r"--max-new-tokens \d+", "--max-new-tokens 4"),
    (
        r"gptoss-jax (generate|chat) ",
        r"gptoss-jax \1 --max-new-tokens 4 ",
    ),  # also where the default (128) applies
    (r"gptoss-jax bench ", "gptoss-jax bench --reps 1 "),
    (r"--prompt-len \d+", "--prompt-len 8"),
    (r"--new \d+", "--new 4"),
]


@dataclass
class Command:
    text: str  # as written (continuation lines joined)
    where: str  # file:line
    output: list[str] = field(default_factory=list)  # documented output after a `$ ` command

    @property
    def run_text(self) -> str:
        text = self.text
        for pattern, repl in SUBSTITUTIONS:
            text = re.sub(pattern, repl, text)
        return text

    @property
    def key(self) -> tuple[str, ...]:  # same words (comments and spacing aside): the same command
        return tuple(shlex.split(self.run_text, comments=True))

    @property
    def skip(self) -> str | None:
        return next((why for prefix, why in SKIP.items() if " ".join(self.key).startswith(prefix)), None)

    @property
    def makes_files(self) -> bool:
        return self.key[0] == "gptoss-convert" or ">" in self.key


def _complete(text: str) -> bool:
    if text.endswith("\\"):
        return False
    try:
        shlex.split(text, comments=True)
    except ValueError:  # an open quote: the command goes on
        return False
    return True


def extract(path: Path) -> list[Command]:
    commands: list[Command] = []
    lang = None  # inside a code block: its info string ("" when unlabeled)
    pending, start, last = "", 0, None  # a command being continued; the `$ ` command whose output follows
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"\s*```(\S*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            last = None
            continue
        if lang is None or lang == "python":
            continue
        stripped = line.strip()
        if not pending:
            dollar = stripped.startswith("$ ")
            if lang in SHELL_BLOCKS:
                is_command = bool(stripped) and not stripped.startswith("#")
            else:
                is_command = dollar or stripped.split(" ", 1)[0] in PROGRAMS
            if not is_command:
                if last is not None and stripped:
                    last.output.append(line.rstrip())
                continue
            start, line = n, stripped.removeprefix("$ ")
        pending = f"{pending}\n{line}" if pending else line
        if _complete(pending):
            name = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
            commands.append(Command(pending, f"{name}:{start}"))
            last = commands[-1] if dollar and lang not in SHELL_BLOCKS else None
            pending = ""
    return commands


def all_commands() -> list[Command]:
    return [c for path in DOCS for c in extract(path)]


def runnable() -> list[Command]:
    seen, out = set(), []
    for c in all_commands():
        if c.skip is None and c.key not in seen:
            seen.add(c.key)
            out.append(c)
    return out


def test_every_command_is_run_or_skipped():
    commands = all_commands()
    run = {c.key for c in runnable()}
    assert any(
        c.key == ("gptoss-jax", "demo") for c in commands
    )  # the extraction finds the README's commands
    for c in commands:
        assert c.key in run or c.skip, c.where
    unused = [p for p in SKIP if not any(" ".join(c.key).startswith(p) for c in commands)]
    assert not unused, f"SKIP entries matching no documented command: {unused}"
    # a block of a new kind (```zsh) must be classified here rather than silently read as output
    for path in DOCS:
        fences = re.findall(r"^\s*```(\S*)", path.read_text(), flags=re.M)[::2]  # opening fences only
        unknown = set(map(str.lower, fences)) - SHELL_BLOCKS - OTHER_BLOCKS
        assert not unknown, f"{path.name}: code blocks of unknown kind {unknown}"


def test_extraction_rules(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "```bash\n# comment\ngptoss-jax a \\\n  --b 1\ngcloud x --command='one\n  two'\n```\n"
        "```python\nimport os\n```\n```\n$ gptoss-jax info x\nline 1\nline 2\nnot a command\n"
        "python tool.py   # note\n```\n"
    )
    got = [(c.text, c.output) for c in extract(md)]
    assert got == [
        ("gptoss-jax a \\\n  --b 1", []),
        ("gcloud x --command='one\n  two'", []),
        ("gptoss-jax info x", ["line 1", "line 2", "not a command"]),
        ("python tool.py   # note", []),
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    ws, empty, cache = root / "work", root / "empty", root / "hub"
    empty.mkdir()
    cfg = Config.tiny()
    write_checkpoint(ws / "gpt-oss-20b", cfg, layout="hf", shards=2)  # as `--exclude "original/*"` leaves it
    write_checkpoint(
        ws / "gpt-oss-120b" / "original", cfg, layout="original", shards=2
    )  # `--include "original/*"`
    for model_id in ("openai/gpt-oss-20b", "openai/gpt-oss-120b"):
        add_to_cache(cache, model_id, {p.name: p for p in (ws / "gpt-oss-20b").iterdir()}, "d" * 40)
    # one compilation cache for all commands, keeping even quick compiles: commands share many shapes
    env = cli_env(
        HF_HUB_CACHE=cache,
        HF_HOME=root / "hf",
        HF_HUB_OFFLINE=1,
        GPTOSS_JAX_COMPILE_CACHE=root / "xla",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0,
    )
    results = {c.key: _run(c, ws, empty, env) for c in runnable() if c.makes_files}
    return ws, empty, env, results


def _run(c: Command, ws: Path, empty: Path, env: dict) -> subprocess.CompletedProcess:
    cwd = empty if c.key[:2] == ("gptoss-jax", "info") else ws
    return subprocess.run(
        ["bash", "-c", f"set -eo pipefail\n{c.run_text}"],
        cwd=cwd,
        env=env,
        input="Hello\n",
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize("cmd", runnable(), ids=lambda c: f"{c.where} {c.key[0]} {' '.join(c.key[1:2])}")
def test_documented_command_runs(cmd, workspace):
    ws, empty, env, results = workspace
    res = results.get(cmd.key) or _run(cmd, ws, empty, env)
    assert res.returncode == 0, f"{cmd.where}: {cmd.run_text}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    if cmd.output:
        printed = [ln.rstrip() for ln in res.stdout.splitlines() if ln.strip()]
        assert printed == cmd.output, f"{cmd.where}: the documented output differs"
