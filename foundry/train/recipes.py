"""The three fine-tuning recipes: each builds its data, model, objective, validation and checkpoint writer.

Shared by all: the held-out split (--val or --val-fraction), the parameters that train (every weight, or a
LoRA adapter over a base that QLoRA holds quantised), and the checkpoint files (a model directory, or a PEFT
adapter beside the tokenizer)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from foundry import hub
from foundry.core.errors import UserError
from foundry.core.files import write_json
from foundry.train.config import TrainConfig
from foundry.train.finetune_config import FinetuneConfig
from foundry.train.loss import CausalLMLoss
from foundry.train.objectives import (ClassifyLoss, DPOLoss, Validation, parameter_counts, validate_classifier,
                                      validate_dpo, validate_lm)


@dataclass
class Recipe:
    """What a recipe hands the loop (through RunSetup) and its end-of-run report."""

    model: nn.Module
    loader: Any
    objective: nn.Module
    validate: Callable[[nn.Module], Validation] | None
    write_model: Callable[[Path, nn.Module, dict[str, Any]], None]
    train_count: int
    val_count: int
    skipped: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    answer_checks: list[tuple[list[dict[str, Any]], str]] = field(default_factory=list)  # sft: (prompt, answer)
    val_batches: Callable[[], list] | None = None  # classify: the held-out batches, for the report


def split_records(records: list[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, val): a seeded shuffle, the last `val_fraction` held out (at least one record when asked)."""
    if val_fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(records) * val_fraction))
    if held >= len(records):
        raise UserError(f"--val-fraction {val_fraction} leaves no training records of {len(records)}; "
                        f"give more data or a --val file")
    return [records[i] for i in sorted(order[held:])], [records[i] for i in sorted(order[:held])]


def _split(items: list[Any], held_out: list[Any] | None, ft: FinetuneConfig, seed: int) -> tuple[list, list]:
    if held_out is not None:
        return items, held_out
    return split_records(items, ft.val_fraction, seed)


def _skipped_note(skipped: list[str], notes: list[str]) -> None:
    if skipped:
        notes.append(f"skipped {len(skipped)} bad line(s) (--skip-bad-lines); the first: {skipped[0]}")


# ---- the trained parameters ------------------------------------------------------------------------------

def _lora_settings(ft: FinetuneConfig):
    from foundry.model.lora import LoRASettings

    return LoRASettings(rank=ft.lora_rank, alpha=ft.lora_alpha, dropout=ft.lora_dropout, rslora=ft.rslora,
                        targets=ft.targets)


def _trainable(model: nn.Module, ft: FinetuneConfig, loaded: Any, resume_from: Path | None,
               notes: list[str]) -> nn.Module:
    """The model with its trainable parameters chosen: all (full fine-tuning) or a LoRA adapter's."""
    if not ft.lora:
        return model
    from foundry.hub.adapter import base_fingerprint, load_adapter
    from foundry.model.lora import apply_lora

    if ft.qlora:
        from foundry.model.quantized import memory_bytes, quantize_frozen

        before = memory_bytes(model)
        quantize_frozen(model, ft.qlora_dtype)
        after = memory_bytes(model)
        notes.append(f"QLoRA: the frozen base takes {after / 2**20:.2f} MiB in {ft.qlora_dtype}, "
                     f"{after / before:.0%} of its {before / 2**20:.2f} MiB in fp32")
    if resume_from is not None:  # the adapter as the checkpoint left it
        load_adapter(model, resume_from, base_fingerprint(loaded.path))
    else:
        wrapped = apply_lora(model, _lora_settings(ft))
        notes.append(f"LoRA rank {ft.lora_rank} on {len(wrapped)} linear layers")
    return model


def _writer(ft: FinetuneConfig, loaded: Any) -> Callable[[Path, nn.Module, dict[str, Any]], None]:
    """How a checkpoint stores the model: a whole model directory, or a PEFT adapter and the tokenizer."""
    tokenizer = loaded.tokenizer
    fingerprint = None
    if ft.lora:
        from foundry.hub.adapter import base_fingerprint

        fingerprint = base_fingerprint(loaded.path)  # of the base as it is on disk (QLoRA quantises it in memory)

    def full(tmp: Path, model: nn.Module, meta: dict[str, Any]) -> None:
        hub.write_model_files(tmp, model, tokenizer, generation_config=loaded.generation_config, meta=meta)

    def adapter(tmp: Path, model: nn.Module, meta: dict[str, Any]) -> None:
        from foundry.hub.adapter import save_adapter

        save_adapter(tmp, model, _lora_settings(ft), str(loaded.path), fingerprint)
        tokenizer.save(tmp)
        write_json(tmp / "foundry.json", meta)

    return adapter if ft.lora else full


def _starting_weights(loaded: Any, resume_from: Path | None, ft: FinetuneConfig, device: torch.device) -> nn.Module:
    """Full fine-tuning resumes from the checkpoint's weights; LoRA from the base (its adapter comes after)."""
    if resume_from is not None and not ft.lora:
        return hub.load(resume_from, device=device, dtype=torch.float32, with_tokenizer=False).model
    return loaded.model


# ---- sft ---------------------------------------------------------------------------------------------------

def build_sft(ft: FinetuneConfig, cfg: TrainConfig, loaded: Any, device: torch.device, resume_from: Path | None,
              notes: list[str], shard: tuple[int, int] = (0, 1)) -> Recipe:
    from foundry.data.instructions import load_examples, show_example
    from foundry.data.packing import InstructionLoader, held_out_batches

    tokenizer = loaded.tokenizer
    data = load_examples(cfg.data, tokenizer, ft.skip_bad_lines, ft.train_on_prompt)
    _skipped_note(data.skipped, notes)
    items = list(zip(data.examples, data.conversations))
    held = None
    if ft.val:
        val_data = load_examples(ft.val, tokenizer, ft.skip_bad_lines, ft.train_on_prompt)
        _skipped_note(val_data.skipped, notes)
        held = list(zip(val_data.examples, val_data.conversations))
    train_items, val_items = _split(items, held, ft, cfg.seed)
    if ft.show_example:
        notes.append(show_example(tokenizer, train_items[0][1], ft.train_on_prompt))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    loader = InstructionLoader([e for e, _ in train_items], cfg.batch_size // shard[1], cfg.seq_len, cfg.seed,
                               ft.packing, rank=shard[0], world_size=shard[1], pad_id=pad)
    packed = loader.packed
    notes.append(f"sft: {len(train_items)} training examples in {len(packed.rows)} rows of {cfg.seq_len} tokens"
                 f"{' (packed)' if ft.packing else ''}, {len(val_items)} held out"
                 + (f"; {packed.truncated} truncated to {cfg.seq_len} tokens" if packed.truncated else "")
                 + (f", {packed.dropped} left with no trained token and dropped" if packed.dropped else ""))
    model = _trainable(_starting_weights(loaded, resume_from, ft, device), ft, loaded, resume_from, notes)
    validate = None
    if val_items:
        batches = held_out_batches([e for e, _ in val_items], cfg.batch_size, cfg.seq_len, ft.packing, pad)
        validate = lambda m: validate_lm(m, batches, device)  # noqa: E731
    checks = [(messages[:-1], messages[-1]["content"]) for _, messages in val_items
              if messages[-1].get("role") == "assistant" and isinstance(messages[-1].get("content"), str)]
    return Recipe(model, loader, CausalLMLoss(model), validate, _writer(ft, loaded), len(train_items),
                  len(val_items), data.skipped, answer_checks=checks)


# ---- dpo ---------------------------------------------------------------------------------------------------

def build_dpo(ft: FinetuneConfig, cfg: TrainConfig, loaded: Any, device: torch.device, resume_from: Path | None,
              notes: list[str], shard: tuple[int, int] = (0, 1)) -> Recipe:
    from foundry.data.preferences import PairLoader, load_pairs

    tokenizer = loaded.tokenizer
    data = load_pairs(cfg.data, tokenizer, ft.skip_bad_lines)
    _skipped_note(data.skipped, notes)
    held = None
    if ft.val:
        val_data = load_pairs(ft.val, tokenizer, ft.skip_bad_lines)
        _skipped_note(val_data.skipped, notes)
        held = val_data.pairs
    train_pairs, val_pairs = _split(data.pairs, held, ft, cfg.seed)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    loader = PairLoader(train_pairs, cfg.batch_size // shard[1], cfg.seq_len, cfg.seed, rank=shard[0],
                        world_size=shard[1], pad_id=pad)
    notes.append(f"dpo: {len(loader.pairs)} training pairs, {len(val_pairs)} held out, beta {ft.beta}"
                 + (f"; {loader.truncated} truncated to {cfg.seq_len} tokens" if loader.truncated else ""))
    model = _trainable(_starting_weights(loaded, resume_from, ft, device), ft, loaded, resume_from, notes)
    if ft.lora and ft.ref is None:
        from foundry.model.lora import adapters_disabled

        objective = DPOLoss(model, ft.beta, reference_mode=lambda: adapters_disabled(model))
        notes.append("dpo reference: the base itself, adapters disabled (no second copy of the weights)")
    else:
        # The reference is the starting weights (or --ref), never the checkpoint a resumed run continues from.
        reference = hub.load(ft.ref or loaded.path, device=device, dtype=torch.float32,
                             with_tokenizer=False).model
        for p in reference.parameters():
            p.requires_grad_(False)
        objective = DPOLoss(model, ft.beta, reference=reference.eval())
    validate = None
    if val_pairs:
        batches = PairLoader(val_pairs, cfg.batch_size, cfg.seq_len, cfg.seed, pad_id=pad).held_out_batches()
        validate = lambda m: validate_dpo(objective, batches, device)  # noqa: E731
    return Recipe(model, loader, objective, validate, _writer(ft, loaded), len(loader.pairs), len(val_pairs),
                  data.skipped)


# ---- classify ----------------------------------------------------------------------------------------------

def build_classify(ft: FinetuneConfig, cfg: TrainConfig, loaded: Any, device: torch.device,
                   resume_from: Path | None, notes: list[str], shard: tuple[int, int] = (0, 1)) -> Recipe:
    from foundry.data.labels import batches, class_weights, eval_batches, read_labelled
    from foundry.hub.classifier import classifier_from_causal, is_classifier_dir, load_classifier

    if ft.lora and resume_from is not None:
        raise UserError("--resume of a classify run with --lora is not supported: its checkpoints hold the merged "
                        "classifier, not the adapter; start a new run from the checkpoint instead")
    tokenizer = loaded.tokenizer
    data = read_labelled(cfg.data, ft.skip_bad_lines)
    _skipped_note(data.skipped, notes)
    ids = data.encode(tokenizer, cfg.seq_len)
    items = list(zip(ids, data.labels))
    held = None
    if ft.val:
        val_data = read_labelled(ft.val, ft.skip_bad_lines)
        _skipped_note(val_data.skipped, notes)
        held = list(zip(val_data.encode(tokenizer, cfg.seq_len), val_data.labels))
    train_items, val_items = _split(items, held, ft, cfg.seed)
    labels = sorted({label for _, label in train_items})
    if len(labels) < 2:
        raise UserError(f"{cfg.data}: classify needs at least two labels in the training records, found "
                        f"{labels or 'none'}")
    index = {label: i for i, label in enumerate(labels)}
    unseen = sorted({label for _, label in val_items} - index.keys())
    if unseen:
        raise UserError(f"held-out label(s) {', '.join(map(repr, unseen))} never occur in the training records "
                        f"({', '.join(labels)}): the model could not learn them; fix the data or the split")
    train_labels = [index[label] for _, label in train_items]
    if resume_from is not None:
        classifier = load_classifier(resume_from, device=device, dtype=torch.float32, with_tokenizer=False)[0]
    elif is_classifier_dir(loaded.path):
        raise UserError(f"{loaded.path} is already a classifier; start from a causal language model directory")
    else:
        classifier = classifier_from_causal(loaded.model, len(labels), cfg.seed, tokenizer)
    classifier = classifier.to(device)
    if ft.lora:
        _trainable(classifier.transformer, ft, loaded, None, notes)
        classifier.score.weight.requires_grad_(True)  # the new head trains whole (PEFT's modules_to_save)
    pad = classifier.pad_token_id
    weights = class_weights(train_labels, len(labels)).to(device) if ft.class_weights == "balanced" else None
    loader = batches([i for i, _ in train_items], train_labels, cfg.batch_size // shard[1], pad, cfg.seed, *shard)
    counts = {label: train_labels.count(i) for i, label in enumerate(labels)}
    notes.append(f"classify: {len(train_items)} training texts ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
                 f"{len(val_items)} held out" + (", balanced class weights" if weights is not None else ""))
    objective = ClassifyLoss(classifier, weights)
    validate, held_out = None, None
    if val_items:
        val_ids, val_labels = [i for i, _ in val_items], [index[label] for _, label in val_items]
        held_out = lambda: eval_batches(val_ids, val_labels, cfg.batch_size, pad)  # noqa: E731
        validate = lambda m: validate_classifier(objective, held_out(), device, labels)  # noqa: E731

    def write(tmp: Path, model: nn.Module, meta: dict[str, Any]) -> None:
        from foundry.hub.classifier import write_classifier_files

        if ft.lora:  # the checkpoint is the classifier with its adapter folded in (a copy: training goes on)
            import copy

            from foundry.model.lora import merge_lora

            model = copy.deepcopy(model)
            merge_lora(model)
        write_classifier_files(tmp, model, tokenizer, labels, meta=meta)

    return Recipe(classifier, loader, objective, validate, write, len(train_items), len(val_items), data.skipped,
                  meta={"labels": labels}, val_batches=held_out)


BUILDERS = {"sft": build_sft, "dpo": build_dpo, "classify": build_classify}


def build(ft: FinetuneConfig, cfg: TrainConfig, loaded: Any, device: torch.device, resume_from: Path | None,
          notes: list[str], shard: tuple[int, int] = (0, 1)) -> Recipe:
    """The recipe `ft.recipe` over the starting model `loaded` (resumed from `resume_from` if given).

    shard: (data-parallel rank, data-parallel ranks): this rank's share of the training data, cfg.batch_size
    being the micro-batch over all of them."""
    recipe = BUILDERS[ft.recipe](ft, cfg, loaded, device, resume_from, notes, shard)
    counts = parameter_counts(recipe.model)
    recipe.meta.update(counts)  # into foundry.json; RunSetup's parameter count
    trainable, total = counts["trainable_parameters"], counts["total_parameters"]
    notes.append(f"training {trainable:,} of {total:,} parameters ({trainable / max(total, 1):.2%}); AdamW state "
                 f"{8 * trainable / 2**20:.2f} MiB" + (f", {trainable / max(total, 1):.2%} of full fine-tuning's"
                                                       if ft.lora else ""))
    return recipe
