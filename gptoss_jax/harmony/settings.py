"""Prompt settings: what besides the conversation decides a prompt's tokens (the reasoning effort, the
conversation start date or none, the version of the rendering rule), recorded beside fine-tuned adapters.

`gptoss-jax finetune` writes `prompt_settings.json` into the adapter folder; `serve`, `chat` and `generate`
with `--adapters` read it (`resolve_prompt_settings`), so that a fine-tuned model is served the prompts it was
trained on. A flag given on the command line still wins, with a warning; a folder without the file (adapters
from elsewhere) leaves each command's own defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .conversation import date_setting, reasoning_effort

SETTINGS_FILE = "prompt_settings.json"
# The rendering rule's version: a change to what a conversation renders to (the drop rule, the mapping of a
# message) gets a new number, so adapters trained under another rule are told apart.
RENDERING_VERSION = 1
RENDERING = "harmony; analysis before the last final answer dropped (the gpt-oss chat template's rule)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptSettings:
    """reasoning_effort: low | medium | high. date: the conversation start date setting, None (no date),
    "today" or YYYY-MM-DD. rendering_version: the rendering rule (`RENDERING_VERSION` for this code)."""

    reasoning_effort: str = "medium"
    date: str | None = None
    rendering_version: int = RENDERING_VERSION

    def __post_init__(self):
        object.__setattr__(self, "reasoning_effort", reasoning_effort(self.reasoning_effort))
        object.__setattr__(self, "date", date_setting(self.date))

    def describe(self) -> str:
        """e.g. "reasoning effort medium, no conversation date"."""
        return f"reasoning effort {self.reasoning_effort}, {describe_date(self.date)}"

    def to_json(self) -> dict:
        return {
            "format": "harmony",
            "reasoning_effort": self.reasoning_effort,
            "conversation_start_date": self.date,
            "rendering_version": self.rendering_version,
            "rendering": RENDERING if self.rendering_version == RENDERING_VERSION else None,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = SETTINGS_FILE) -> PromptSettings:
        if not isinstance(obj, dict) or obj.get("format") != "harmony":
            raise ValueError(f'{where}: not prompt settings (a JSON object with "format": "harmony")')
        version = obj.get("rendering_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"{where}: rendering_version must be an integer, got {version!r}")
        try:
            return cls(
                reasoning_effort=obj.get("reasoning_effort", "medium"),
                date=obj.get("conversation_start_date"),
                rendering_version=version,
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def describe_date(date: str | None) -> str:
    if date is None:
        return "no conversation date"
    return "today's date" if date == "today" else f"conversation date {date}"


def write_prompt_settings(folder: str | os.PathLike, settings: PromptSettings) -> Path:
    """FOLDER/prompt_settings.json, written under a temporary name and renamed (never seen half-written)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{SETTINGS_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(settings.to_json(), indent=2) + "\n")
        os.replace(tmp, folder / SETTINGS_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / SETTINGS_FILE


def read_prompt_settings(folder: str | os.PathLike) -> PromptSettings | None:
    """The settings recorded in FOLDER, or None when it has none; ValueError naming the file when unreadable."""
    path = Path(folder).expanduser() / SETTINGS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return PromptSettings.from_json(obj, str(path))


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The settings a command renders with, and what it tells the user: `notes` (where the settings came
    from) and `warnings` (flags that override the adapters' settings), one line each."""

    settings: PromptSettings
    notes: list[str]
    warnings: list[str]
    trained: PromptSettings | None  # the adapters' recorded settings, if any


def resolve_prompt_settings(
    adapters: str | os.PathLike | None,
    *,
    date: str | None = None,
    reasoning_effort: str | None = None,
    default_date: str | None = None,
    default_effort: str = "medium",
) -> Resolved:
    """The prompt settings of a command: each flag where given (`date`, `reasoning_effort`: the option's
    value, None when not given), else the adapters' recorded setting, else the command's default. ValueError
    for a bad flag (naming it) or a bad settings file (naming the file)."""
    try:
        flag_date = date_setting(date) if date is not None else None
    except ValueError as e:
        raise ValueError(f"--date {e}") from None
    trained = read_prompt_settings(adapters) if adapters is not None else None
    base = trained or PromptSettings(reasoning_effort=default_effort, date=default_date)
    settings = PromptSettings(
        reasoning_effort=reasoning_effort if reasoning_effort is not None else base.reasoning_effort,
        date=flag_date if date is not None else base.date,
    )
    notes, warnings = [], []
    if trained is not None:
        where = Path(adapters).expanduser() / SETTINGS_FILE
        notes.append(f"prompt settings of the adapters ({where}): {trained.describe()}")
        if date is not None and flag_date != trained.date:
            warnings.append(f"--date {date} overrides the adapters' setting ({describe_date(trained.date)}): "
                            "the model sees prompts unlike those it was trained on")  # fmt: skip
        if reasoning_effort is not None and settings.reasoning_effort != trained.reasoning_effort:
            warnings.append(f"--reasoning-effort {reasoning_effort} overrides the adapters' setting "
                            f"({trained.reasoning_effort}): the model sees prompts unlike those it was trained "
                            "on")  # fmt: skip
        if trained.rendering_version != RENDERING_VERSION:
            warnings.append(f"the adapters were trained on prompts of rendering version "
                            f"{trained.rendering_version}; this version of gptoss-jax renders version "
                            f"{RENDERING_VERSION}")  # fmt: skip
    return Resolved(settings, notes, warnings, trained)
