"""Reaching the Hugging Face hub quickly, or not at all.

huggingface_hub retries an unreachable hub for about 25 s (minutes if packets are dropped) and
reads ``HF_HUB_OFFLINE`` only when it is imported. These helpers let the model and detector
loaders decide up front: use the local cache when it has the file, fail at once when offline,
and otherwise ask the hub one question without retries before downloading.
"""

from __future__ import annotations

import os

_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Offline mode as the environment says now (huggingface_hub only looks at import time)."""
    if any(os.environ.get(var, "").strip().upper() in _TRUE for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def cached_file(repo_id: str, filename: str) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return found if isinstance(found, str) else None


def is_cached(repo_id: str, filename: str) -> bool:
    return cached_file(repo_id, filename) is not None


def probe_hub(repo_id: str, filename: str) -> None:
    """Ask the hub once, with no retries, about one file of a repository; raise if that fails."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT)


def summarise_error(err: BaseException, limit: int = 200) -> str:
    """The exception's type and first line, shortened, for a one-paragraph message."""
    text = str(err).strip()
    first = text.splitlines()[0].strip() if text else ""
    if len(first) > limit:
        first = first[: limit - 3].rstrip() + "..."
    first = first.rstrip(".")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
