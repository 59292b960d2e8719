"""Hugging Face Hub ids ("org/name", "org/name@revision"): fetch what a model needs into huggingface_hub's cache.

Torch-free, so `foundry info` and `foundry plan` can read a Hub model's config.json. The cache, HF_TOKEN and
HF_HUB_OFFLINE apply exactly as they do for transformers.
"""

from __future__ import annotations

import re
from pathlib import Path

from foundry.core.errors import UserError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")
# Files of a repository that running a model needs; pickled weights are added only when trusted.
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
_SNAPSHOT = re.compile(r"^models--(?P<repo>.+)$")


def is_hub_id(spec: object) -> bool:
    """Whether a model argument is spelled like a Hub id (checked only after no local path matched)."""
    return isinstance(spec, str) and bool(HUB_ID.match(spec)) and not spec.startswith(".")


def fetch(spec: str, patterns: list[str] | None = None, revision: str | None = None, token: str | bool | None = None,
          cache_dir: str | Path | None = None) -> Path:
    """The local snapshot folder of a Hub id, with the files matching `patterns` (default MODEL_FILES)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id, _, at = spec.partition("@")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or at or None, token=token, cache_dir=cache_dir,
                                      allow_patterns=patterns or MODEL_FILES))
    except LocalEntryNotFoundError:
        raise UserError(f"model {spec!r} is neither a local directory nor in the Hugging Face cache, and it cannot "
                        f"be downloaded (offline, or no network); download it once while online") from None
    except (HfHubHTTPError, HFValidationError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot fetch model {spec!r} from the Hugging Face Hub: {first}") from None
    if not (path / "config.json").is_file():
        raise UserError(f"Hub repository {repo_id!r} has no config.json: it is not a transformers model")
    return path


def complete_snapshot(path: Path, patterns: list[str]) -> Path | None:
    """Fetch the rest of a cache snapshot that holds only some files (say, the config.json `foundry info` read).

    None when `path` is not a snapshot folder of the Hugging Face cache."""
    path = path.resolve()
    if path.parent.name != "snapshots" or not (match := _SNAPSHOT.match(path.parent.parent.name)):
        return None
    repo_id = match.group("repo").replace("--", "/", 1)
    return fetch(repo_id, patterns, revision=path.name, cache_dir=path.parent.parent.parent)
