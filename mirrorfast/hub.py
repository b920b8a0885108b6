"""Hugging Face hub ids: use the local cache when it has the model; fail fast when the hub is out of reach.

Without this, a hub id on a machine without network made huggingface_hub retry, printing a warning per
retry, before transformers gave up: 49.8 s on the 2-core dev machine (2026-11-26); now about 3 s.
"""

import os
import socket
from urllib.parse import urlparse

from mirrorfast.errors import MirrorfastError

_TRUE = {"1", "ON", "YES", "TRUE"}
DEFAULT_ENDPOINT = "https://huggingface.co"


def cache_dir() -> str | None:
    """HF_HUB_CACHE as it is now (huggingface_hub reads it once, at import); None: its default."""
    return os.environ.get("HF_HUB_CACHE") or None


def hub_offline() -> bool:
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _endpoint():
    return urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT)


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint (HF_ENDPOINT), at most `timeout` seconds."""
    url = _endpoint()
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def in_local_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir()), str)
    except HFValidationError:
        raise MirrorfastError(f"{repo_id} is neither a model directory nor a valid Hugging Face hub id") from None


def resolve_hub_id(repo_id: str) -> tuple[str, bool]:
    """-> (a one-line description of where the model comes from, whether to load from the cache only)."""
    if in_local_cache(repo_id):
        return f"{repo_id} (Hugging Face hub id, from the local cache)", True
    where = f"{repo_id} is not a local directory and not in the Hugging Face cache"
    if hub_offline():
        raise MirrorfastError(f"{where}, and the hub is switched off (HF_HUB_OFFLINE): pass a model directory")
    if not hub_reachable():
        raise MirrorfastError(f"{where}, and {_endpoint().hostname} cannot be reached: pass a model directory "
                              "(or download the model where there is network)")
    return f"{repo_id} (Hugging Face hub id, downloaded from the hub)", False
