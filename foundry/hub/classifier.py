"""Classifier directories: a SequenceClassifier saved and loaded in the layout of Hugging Face's
`<Family>ForSequenceClassification` (its config.json with id2label/label2id/pad_token_id, weights under the
family's base-model names plus `score.weight`, no output head), so transformers'
AutoModelForSequenceClassification loads it as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from foundry.config import ModelConfig
from foundry.config.families import SUPPORTED_ARCHITECTURES
from foundry.config.labels import id2label_names
from foundry.core.errors import UserError
from foundry.core.files import atomic_dir, write_json
from foundry.hub.directory import _checkpoint_dtype, _new_dir, read_state, resolve_model_dir
from foundry.hub.run_dir import latest_checkpoint
from foundry.hub.stored import read_json_object
from foundry.hub.weights import DEFAULT_SHARD_SIZE, layout_of, parse_size, write_tensors
from foundry.model import Transformer
from foundry.model.classifier import SequenceClassifier

CLASSIFIER_SUFFIX = "ForSequenceClassification"
# Where transformers' classifier class is not the causal LM's name with the suffix swapped.
_SPECIAL_NAMES = {"Gemma3ForCausalLM": "Gemma3TextForSequenceClassification"}
_LABEL_KEYS = ("id2label", "label2id", "num_labels", "problem_type")


def classifier_architecture(causal_architecture: str) -> str:
    """The Hugging Face classifier class of a causal LM architecture ("LlamaForCausalLM" ->
    "LlamaForSequenceClassification", "GPT2LMHeadModel" -> "GPT2ForSequenceClassification")."""
    if causal_architecture in _SPECIAL_NAMES:
        return _SPECIAL_NAMES[causal_architecture]
    for suffix in ("ForCausalLM", "LMHeadModel"):
        if causal_architecture.endswith(suffix):
            return causal_architecture.removesuffix(suffix) + CLASSIFIER_SUFFIX
    raise UserError(f"architecture {causal_architecture!r} has no sequence-classification counterpart")


def causal_architecture(classifier_arch: str) -> str:
    """The causal LM architecture whose classifier class is `classifier_arch`."""
    for causal in SUPPORTED_ARCHITECTURES:
        if classifier_architecture(causal) == classifier_arch:
            return causal
    supported = ", ".join(classifier_architecture(a) for a in SUPPORTED_ARCHITECTURES)
    raise UserError(f"unsupported classifier architecture {classifier_arch!r}; foundry runs {supported}")


def pick_pad_token_id(config: ModelConfig, tokenizer: Any = None) -> int | None:
    """The id that pads classifier batches: the config's pad id, else the tokenizer's pad, else eos."""
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    candidates = [config.pad_token_id]
    if tokenizer is not None:
        candidates += [tokenizer.pad_id, tokenizer.eos_id]
    candidates.append(eos)
    return next((c for c in candidates if c is not None), None)


def classifier_from_causal(model: Transformer, num_labels: int, seed: int | None = None,
                           tokenizer: Any = None, pad_token_id: int | None = None) -> SequenceClassifier:
    """A classifier on a (pretrained) causal LM's body, with a fresh N(0, 0.02) score head.

    The model becomes the classifier's `.transformer` (its output head is dropped). The pad id is
    pad_token_id, else chosen by pick_pad_token_id."""
    if pad_token_id is None:
        pad_token_id = pick_pad_token_id(model.config, tokenizer)
    if pad_token_id is None:
        raise UserError("the model has no pad or eos token id to pad classifier batches with; "
                        "set pad_token_id in its config.json")
    classifier = SequenceClassifier(model, num_labels, pad_token_id)
    classifier.init_score(seed)
    return classifier


def _checked_labels(labels: list[str], num_labels: int) -> list[str]:
    labels = [str(label) for label in labels]
    if len(labels) != num_labels:
        raise ValueError(f"{len(labels)} label names for a classifier with {num_labels} outputs")
    if len(set(labels)) != len(labels):
        raise UserError(f"label names must be distinct, got {labels}")
    return labels


def write_classifier_files(model_dir: Path, classifier: SequenceClassifier, tokenizer: Any, labels: list[str],
                           meta: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                           shard_size: str | int = DEFAULT_SHARD_SIZE) -> None:
    """Write a classifier's config, weights, tokenizer and metadata into an existing (temporary) directory."""
    labels = _checked_labels(labels, classifier.num_labels)
    if classifier.pad_token_id is None:
        raise UserError("a classifier needs a pad_token_id to be saved (transformers refuses batches without it)")
    config = classifier.config
    state = {name.removeprefix("transformer."): tensor for name, tensor in classifier.state_dict().items()
             if not name.startswith("transformer.lm_head.")}  # a later tie_weights() may have put it back
    written = write_tensors(model_dir, layout_of(config).to_hf(state), parse_size(shard_size), dtype)
    hf = config.to_hf_dict()
    hf["architectures"] = [classifier_architecture(config.architecture)]
    hf["pad_token_id"] = classifier.pad_token_id
    hf["id2label"] = {str(i): label for i, label in enumerate(labels)}
    hf["label2id"] = {label: i for i, label in enumerate(labels)}
    hf["problem_type"] = "single_label_classification"
    hf["torch_dtype"] = str(written).removeprefix("torch.")
    write_json(model_dir / "config.json", hf)
    if tokenizer is not None:
        tokenizer.save(model_dir)
    if meta is not None:
        write_json(model_dir / "foundry.json", meta)


def save_classifier(out_dir: str | Path, classifier: SequenceClassifier, tokenizer: Any, labels: list[str],
                    meta: dict[str, Any] | None = None, dtype: torch.dtype | None = None,
                    shard_size: str | int = DEFAULT_SHARD_SIZE) -> Path:
    """Save a classifier directory atomically (it appears whole or not at all); labels[i] names output i."""
    out_dir = Path(out_dir)
    _checked_labels(labels, classifier.num_labels)  # refused before anything is written
    parse_size(shard_size)
    _new_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_classifier_files(tmp, classifier, tokenizer, labels, meta, dtype, shard_size)
    return out_dir


def _read_config_json(model_dir: Path) -> dict[str, Any]:
    return read_json_object(model_dir / "config.json")


def _architecture(raw: dict[str, Any]) -> str | None:
    archs = raw.get("architectures")
    return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None


def is_classifier_dir(path: str | Path) -> bool:
    """Whether a model directory (or a run directory's newest checkpoint) holds a sequence classifier."""
    path = Path(path)
    if not (path / "config.json").is_file() and path.is_dir():
        path = latest_checkpoint(path) or path
    if not (path / "config.json").is_file():
        return False
    try:
        arch = _architecture(_read_config_json(path))
    except UserError:
        return False
    return arch is not None and arch.endswith(CLASSIFIER_SUFFIX)


def _labels(raw: dict[str, Any], where: Path) -> list[str]:
    return id2label_names(raw.get("id2label"), where)


def _load_weights(classifier: SequenceClassifier, model_dir: Path, device: str | torch.device,
                  dtype: torch.dtype | None, trust_pickle: bool) -> None:
    # A state dict with a score head and without an output head (a classifier converted from a causal LM
    # may still carry one: it is skipped).
    expected = {name.removeprefix("transformer."): t.shape for name, t in classifier.state_dict().items()}
    state = read_state(model_dir, classifier.config, expected, device, dtype, trust_pickle, skip=("lm_head.weight",))
    state = {(name if name.startswith("score.") else "transformer." + name): t for name, t in state.items()}
    classifier.load_state_dict(state, strict=True, assign=True)
    classifier.transformer.init_rotary(device)  # buffers were built on the meta device


def load_classifier(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    with_tokenizer: bool = True, trust_pickle: bool = False
                    ) -> tuple[SequenceClassifier, Any, list[str]]:
    """(classifier in eval mode, tokenizer or None, label names by output index) from a classifier directory
    (or a run directory's newest checkpoint of one). dtype None keeps the checkpoint's."""
    model_dir = resolve_model_dir(spec, trust_pickle=trust_pickle)
    raw = _read_config_json(model_dir)
    arch = _architecture(raw)
    if arch is None or not arch.endswith(CLASSIFIER_SUFFIX):
        raise UserError(f"{model_dir} is not a classifier directory (config.json architectures is {arch!r}, "
                        f"not a ...{CLASSIFIER_SUFFIX}); train one with `foundry finetune --recipe classify`")
    labels = _labels(raw, model_dir / "config.json")
    body = {k: v for k, v in raw.items() if k not in _LABEL_KEYS}
    body["architectures"] = [causal_architecture(arch)]
    config = ModelConfig.from_hf_dict(body)
    with torch.device("meta"):
        classifier = SequenceClassifier(Transformer(config), len(labels), config.pad_token_id)
    _load_weights(classifier, model_dir, device, dtype or _checkpoint_dtype(model_dir), trust_pickle)
    classifier.eval()
    tokenizer = None
    if with_tokenizer and (model_dir / "tokenizer.json").is_file():
        from foundry.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(model_dir)
    return classifier, tokenizer, labels


__all__ = [
    "causal_architecture",
    "classifier_architecture",
    "classifier_from_causal",
    "is_classifier_dir",
    "load_classifier",
    "pick_pad_token_id",
    "save_classifier",
]
