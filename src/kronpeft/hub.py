"""Adapters on the Hugging Face Hub, through `huggingface_hub` (upload a saved folder, download one)."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub
from huggingface_hub import errors as hub_errors

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "*/adapter_config.json",
                 "*/adapter_model.safetensors"]


def upload_folder(folder: str, repo_id: str, private: bool | None = None, token: str | None = None,
                  revision: str | None = None, commit_message: str = "Upload kronpeft adapter"):
    """Create `repo_id` if needed and upload `folder`'s files in one commit; returns the commit info."""
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message,
                             repo_type="model")


def download_adapter(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """The local snapshot of the adapter files of Hub repository `repo_id` (cached by huggingface_hub)."""
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, revision=revision, token=token,
                                                      allow_patterns=ADAPTER_FILES))
    except (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError, hub_errors.HFValidationError,
            OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"adapter {repo_id!r} is neither a local folder nor a Hub repository this machine "
                                f"can reach ({first}); pass an existing adapter folder or a Hub id with network "
                                f"access") from None
