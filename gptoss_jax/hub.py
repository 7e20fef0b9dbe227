"""What a user types for a model -> a local folder: a path (relative, `~`, trailing slash) or a model id.

`resolve_checkpoint("openai/gpt-oss-20b")` goes through `huggingface_hub`'s own cache (`HF_HOME`,
`HF_HUB_CACHE`, `HF_HUB_OFFLINE=1` are honoured as everywhere else) and fetches only the files we read:
the Hugging Face top level (config, generation config, index, `model-*.safetensors`), or `original/` when a
repo has only that, never both and never `metal/`. A snapshot already in the cache is used without asking
the Hub. A string names a model only when no such path exists and it has the `org/name` form;
`os.PathLike` arguments are always paths.

Paths come back absolute: Orbax refuses relative ones, and the user's working directory is the natural
anchor for every other reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .checkpoint import orbax as ckpt_orbax
from .checkpoint.source import open_source
from .config import Config

# Hugging Face's repo id rule (huggingface_hub.utils.validate_repo_id), restricted to "org/name".
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
HF_LAYOUT = ["config.json", "generation_config.json", "model.safetensors.index.json", "model*.safetensors"]
ORIGINAL_LAYOUT = ["original/*"]


class HubError(CheckpointError):
    """A Hugging Face model id that cannot be resolved to a local snapshot (one line, says what to do)."""


def is_model_id(text: str) -> bool:
    """True for "org/name" spellings that are not an existing path (a local folder always wins)."""
    text = text.rstrip("/")
    ok = _MODEL_ID.fullmatch(text) and ".." not in text and "--" not in text and not text.startswith(".")
    return bool(ok) and not Path(text).expanduser().exists()


def resolve_checkpoint(path: str | os.PathLike, *, quiet: bool = False) -> Path:
    """The absolute local folder for `path`: a path as typed (relative, `~`, trailing slash) or a Hugging
    Face model id, downloaded into the hub cache when it is not there yet. A path that does not exist comes
    back absolute too; the caller says it is missing."""
    if isinstance(path, str) and is_model_id(path):
        return _snapshot(path.rstrip("/"), config_only=False, quiet=quiet)
    return Path(path).expanduser().absolute()


def read_config(path: str | os.PathLike) -> Config:
    """The architecture of a checkpoint without reading weights: a released folder (either layout), a
    converted Orbax checkpoint, or a Hugging Face model id (only its config.json is fetched)."""
    if isinstance(path, str) and is_model_id(path):
        folder = _snapshot(path.rstrip("/"), config_only=True, quiet=True)
        for f, parse in (
            (folder / "config.json", Config.from_hf_config),
            (folder / "original" / "config.json", Config.from_original_config),
        ):
            if f.is_file():
                try:
                    return parse(_json(f))
                except (ValueError, TypeError) as e:
                    raise CheckpointError(f"{f}: {e}") from None
        raise HubError(f"{path}: the model has no config.json (is it a gpt-oss checkpoint?)")
    folder = resolve_checkpoint(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or folder")
    if ckpt_orbax.is_orbax_checkpoint(folder):
        return ckpt_orbax.stored_config(ckpt_orbax.read_metadata(folder))
    return open_source(folder).config


def _json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f}: cannot read JSON ({e})") from None


def _usable(folder: Path, config_only: bool) -> bool:
    """Whether a cached snapshot already holds a complete layout (files appear in `snapshots/` only once
    fully downloaded, so a listed file is a whole file)."""
    if config_only:
        return (folder / "config.json").is_file() or (folder / "original" / "config.json").is_file()
    try:
        open_source(folder)
    except CheckpointError:
        return False
    return True


def _snapshot(model_id: str, *, config_only: bool, quiet: bool) -> Path:
    import huggingface_hub as hf
    from huggingface_hub import constants, errors

    top = ["config.json"] if config_only else HF_LAYOUT
    original = ["original/config.json"] if config_only else ORIGINAL_LAYOUT
    try:
        try:  # the cache first: no Hub round trip when the files are already here
            cached = Path(
                hf.snapshot_download(model_id, allow_patterns=top + original, local_files_only=True)
            )
            if _usable(cached, config_only):
                return cached
        except errors.LocalEntryNotFoundError:
            pass
        if not quiet and not constants.HF_HUB_OFFLINE:
            what = (
                "its config.json" if config_only else "the Hugging Face layout (config, index, safetensors)"
            )
            print(f"fetching {what} of {model_id} into {constants.HF_HUB_CACHE}", file=sys.stderr, flush=True)
        with _progress_bars(quiet):
            folder = Path(hf.snapshot_download(model_id, allow_patterns=top))
            if not (folder / "config.json").is_file():  # a repo with only OpenAI's original/ files
                folder = Path(hf.snapshot_download(model_id, allow_patterns=original))
        if constants.HF_HUB_OFFLINE and not _usable(
            folder, config_only
        ):  # offline, a partial snapshot comes back
            raise errors.LocalEntryNotFoundError(str(folder))
        return folder
    except errors.LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise HubError(
            f"{model_id}: no such folder, and not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"while the Hub cannot be reached{offline}; on a machine with internet run: "
            f"huggingface-cli download {model_id} --exclude 'original/*' 'metal/*'"
        ) from None
    except errors.GatedRepoError:
        raise HubError(
            f"{model_id}: a gated model: accept its terms on huggingface.co, then log in with "
            f"`huggingface-cli login`"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"{model_id}: no such folder, and no such model on the Hugging Face Hub (a private one "
            f"needs `huggingface-cli login`)"
        ) from None
    except (errors.HfHubHTTPError, OSError) as e:
        msg = " ".join(str(e).split())
        raise HubError(f"{model_id}: download from the Hugging Face Hub failed: {msg}") from None


@contextlib.contextmanager
def _progress_bars(quiet: bool):
    """huggingface_hub's own download bars on a terminal only: in a log their `\\r` redraws are clutter."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    switch = (quiet or not sys.stderr.isatty()) and not are_progress_bars_disabled()
    if switch:
        disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            enable_progress_bars()


def config_for(model: str) -> Config:
    """A preset name (gpt-oss-20b, gpt-oss-120b, tiny), a checkpoint folder (either released layout or Orbax)
    or a Hugging Face model id (its config.json alone) -> its Config; ValueError naming `model` otherwise."""
    if not Path(model).expanduser().exists() and not is_model_id(model):
        if model in ("gpt-oss-20b", "gpt-oss-120b", "tiny"):
            return Config.preset(model)
        raise ValueError(f"{model}: not a preset (gpt-oss-20b, gpt-oss-120b, tiny), an existing checkpoint "
                         f"folder nor a Hugging Face model id")  # fmt: skip
    return read_config(model)
