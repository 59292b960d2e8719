"""Model specs -> model directories: resolving a spec, Hub downloads, weight layouts, load/save/export.

`resolve`, `run_dir` and `download` are torch-free (the planner resolves models through them);
`directory` and `weights` read and write tensors. `load`, `save`, `export` and `write_model_files`
are looked up lazily so that `import foundry.hub.resolve` does not import torch. May import
`foundry.model`, `foundry.tokenizer`, `foundry.config` and `foundry.core`.
"""

from typing import Any

from foundry.hub.resolve import resolve_model_source
from foundry.hub.run_dir import LATEST, latest_checkpoint

_DIRECTORY = ("LoadedModel", "load", "save", "export", "write_model_files", "load_weights", "read_config",
              "resolve_model_dir", "TOKENIZER_FILES",
              "save_loaded", "check_new_dir")


def __getattr__(name: str) -> Any:
    if name in _DIRECTORY:
        from foundry.hub import directory

        return getattr(directory, name)
    raise AttributeError(f"module 'foundry.hub' has no attribute {name!r}")


__all__ = ["resolve_model_source", "latest_checkpoint", "LATEST", *_DIRECTORY]
