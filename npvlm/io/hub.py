"""Hugging Face Hub ids (`google/paligemma-3b-mix-224`) as model folders, through huggingface_hub's own cache.

    resolve_model("google/paligemma-3b-mix-224")               -> the cached snapshot folder, or a one-line ConfigError
    resolve_model("google/paligemma-3b-mix-224", download=True) -> downloads it first (the only path that uses the network)

A string is treated as a Hub id only when it is not an existing local path and looks like `ORG/NAME`
(two parts, Hub characters only). huggingface_hub is optional: it is imported here, lazily, and its
absence is an error that says how to install it. The lookup is `snapshot_download(repo_id,
local_files_only=True)`, which honours HF_HUB_CACHE / HF_HOME and HF_HUB_OFFLINE as the `hf` tool does.
PaliGemma weights sit behind Google's licence: accept it on the model's Hub page, then `hf auth login`.
"""

from __future__ import annotations

import os
import re

from ..errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def looks_like_hub_id(name) -> bool:
    """True for `ORG/NAME` strings that are not an existing file or folder."""
    if not isinstance(name, str) or os.path.exists(os.path.expanduser(name)):
        return False
    return bool(_HUB_ID.match(name)) and ".." not in name


def how_to_download(repo_id: str) -> str:
    return (f"accept the licence on https://huggingface.co/{repo_id}, then `hf download {repo_id} "
            f"--local-dir {repo_id.split('/')[1]}` and pass that folder, or add --download")


def resolve_model(repo_id: str, *, download: bool = False) -> str:
    """The local snapshot folder of `repo_id` in the Hugging Face cache (downloaded first only if `download`)."""
    try:
        import huggingface_hub
    except ImportError:
        raise ConfigError(f"{repo_id}: no such folder, and huggingface_hub is not installed to find it as a Hub id "
                          f"(`pip install huggingface_hub`, then {how_to_download(repo_id)})") from None
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(repo_id, local_files_only=not download)
    except LocalEntryNotFoundError:
        if download:
            raise ConfigError(f"{repo_id}: could not download it (offline? HF_HUB_OFFLINE is "
                              f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}); {how_to_download(repo_id)}") from None
        raise ConfigError(f"{repo_id}: no such folder, and not in the Hugging Face cache; "
                          f"{how_to_download(repo_id)}") from None
    except HfHubHTTPError as e:  # gated (licence not accepted / not logged in), not found, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{repo_id}: download refused ({first}); {how_to_download(repo_id)}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{repo_id}: cannot use the Hugging Face cache ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); {how_to_download(repo_id)}") from None
