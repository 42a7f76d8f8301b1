"""Model names as users type them: a local folder, or a Hugging Face hub id already in the
local cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``).

Nothing is downloaded at run time: a hub id that is not cached is a :class:`ConfigError` that
says how to fetch it. ``huggingface_hub`` is imported only for a name that is not a folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from inpo.errors import ConfigError, InpoError

__all__ = [
    "check_push_to_hub",
    "looks_like_hub_id",
    "push_model",
    "resolve_dataset",
    "resolve_model",
]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def resolve_model(name: str | Path, key: str) -> Path:
    """The local folder of model ``name`` (a folder, or a cached hub id); ``key`` names the
    setting in errors (``model.path``, ``policy``, ``--model`` …)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if _REPO_ID.fullmatch(text) and not path.exists():
        cached = _cached_snapshot(text, "model")
        if cached is not None:
            return cached
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ConfigError(
            f"{key} '{text}' is not a local folder, nor a hub id in the local Hugging Face cache "
            f"({HF_HUB_CACHE}); nothing is downloaded at run time: fetch it first "
            f"(`hf download {text}`) or give a folder"
        )
    raise ConfigError(f"{key} '{text}' does not exist (a model folder or a cached hub id)")


def _cached_snapshot(repo_id: str, repo_type: str) -> Path | None:
    """The local snapshot folder of a hub repository in the cache, or ``None`` (never a
    download: ``local_files_only``)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo_id, repo_type=repo_type, local_files_only=True))
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    except Exception:  # not cached (LocalEntryNotFoundError and kin)
        return None


def looks_like_hub_id(name: str | Path) -> bool:
    """``owner/name`` that is not an existing path."""
    return bool(_REPO_ID.fullmatch(str(name))) and not Path(name).expanduser().exists()


def resolve_dataset(name: str, key: str) -> Path:
    """The local snapshot folder of hub dataset ``name`` in the Hugging Face cache (nothing is
    downloaded); ``key`` names the setting in errors (``data.dataset_name``, ``prompts`` …)."""
    cached = _cached_snapshot(name, "dataset")
    if cached is not None:
        return cached
    from huggingface_hub.constants import HF_HUB_CACHE

    raise ConfigError(
        f"{key} '{name}' is not a local file or folder, nor a hub dataset in the local Hugging "
        f"Face cache ({HF_HUB_CACHE}); nothing is downloaded at run time: fetch it first "
        f"(`hf download --repo-type dataset {name}`) or give a file or folder"
    )


def check_push_to_hub(repo_id: str | None, key: str) -> None:
    """``push_to_hub=true`` can work: ``repo_id`` is ``owner/name`` and a token is available
    (``$HF_TOKEN`` or ``hf auth login``'s stored one; never from a config file). A
    :class:`ConfigError` naming ``key`` otherwise, before any model loads."""
    if not repo_id or not _REPO_ID.fullmatch(repo_id):
        raise ConfigError(
            f"{key} must be a hub repository id 'owner/name' when push_to_hub=true, got "
            f"'{repo_id or ''}'"
        )
    from huggingface_hub import get_token

    if not get_token():
        raise ConfigError(
            "push_to_hub=true needs a Hugging Face token: set $HF_TOKEN or run `hf auth login` "
            "(a token is never read from a config file)"
        )


def push_model(folder: Path, repo_id: str, *, private: bool, message: str) -> str:
    """Upload a saved model folder (weights, tokenizer, model card; no checkpoints) to the hub
    repository ``repo_id`` (created if missing); returns its URL. A failure is one
    :class:`InpoError` saying the model is kept and how to retry."""
    import logging

    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=message,
            ignore_patterns=["checkpoints/*", "*.partial/*", "trackers/*"],
        )
    except Exception as err:
        raise InpoError(
            f"push_to_hub to '{repo_id}' failed ({type(err).__name__}: {str(err)[:200]}); the "
            f"model is saved in {folder}: re-run the same command to retry the upload"
        ) from None
    url = f"https://huggingface.co/{repo_id}"
    logging.getLogger(__name__).warning("pushed %s to %s", folder, url)
    return url
