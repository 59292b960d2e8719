"""The fine-tuning recipes' objectives, as modules the one loop calls on a batch's tensors, and their validation.

sft reuses the pretraining loss (CausalLMLoss) on packed rows; classify is a cross-entropy over labels; dpo
is Rafailov et al. (2023), eq. 7: -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log
ref(y_l)))), each log-probability the sum over the response tokens."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from foundry.eval.perplexity import Perplexity
from foundry.train.loss import CausalLMLoss


@dataclass
class Validation(Perplexity):
    """A recipe's held-out evaluation: the mean loss and the recipe's own figures (accuracy, margins)."""

    metrics: dict[str, float] = field(default_factory=dict)


def sequence_logprobs(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(target) where targets are not -100: [B]."""
    logprobs = model(ids).float().log_softmax(dim=-1)
    kept = targets != -100
    picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * kept).sum(dim=-1)


class DPOLoss(nn.Module):
    """Direct preference optimisation of `model` against a frozen reference.

    reference: a frozen model, or None with `reference_mode` set: a context in which `model` itself is the
    reference (LoRA: the adapters disabled, so no second copy of the weights is held)."""

    def __init__(self, model: nn.Module, beta: float, reference: nn.Module | None = None,
                 reference_mode: Callable[[], AbstractContextManager] | None = None):
        super().__init__()
        self.model, self.beta = model, beta
        self._reference = [reference]  # a list: not a submodule (its weights are not the policy's)
        self.reference_mode = reference_mode
        self.last: dict[str, float] = {}

    def reference_logprobs(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The reference's sequence log-probabilities (no gradient)."""
        with torch.no_grad():
            reference = self._reference[0]
            if reference is not None:
                return sequence_logprobs(reference, ids, targets)
            with self.reference_mode():
                return sequence_logprobs(self.model, ids, targets)

    def pair_terms(self, chosen: torch.Tensor, chosen_targets: torch.Tensor, rejected: torch.Tensor,
                   rejected_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair loss, chosen reward, rejected reward) [B] each; rewards are beta * log(pi / ref)."""
        chosen_reward = self.beta * (sequence_logprobs(self.model, chosen, chosen_targets)
                                     - self.reference_logprobs(chosen, chosen_targets))
        rejected_reward = self.beta * (sequence_logprobs(self.model, rejected, rejected_targets)
                                       - self.reference_logprobs(rejected, rejected_targets))
        return -F.logsigmoid(chosen_reward - rejected_reward), chosen_reward, rejected_reward

    def forward(self, chosen: torch.Tensor, chosen_targets: torch.Tensor, rejected: torch.Tensor,
                rejected_targets: torch.Tensor) -> torch.Tensor:
        loss, chosen_reward, rejected_reward = self.pair_terms(chosen, chosen_targets, rejected, rejected_targets)
        return loss.mean()

    def loss_weight(self, chosen: torch.Tensor, *rest: torch.Tensor) -> float:
        """What forward's mean divides by: the batch's pairs."""
        return float(chosen.shape[0])


class ClassifyLoss(nn.Module):
    """Cross-entropy of a SequenceClassifier's logits against the labels (optionally class-weighted)."""

    def __init__(self, classifier: nn.Module, class_weights: torch.Tensor | None = None):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, ids: torch.Tensor, pad_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(ids, pad_mask).float(), labels, weight=self.class_weights)

    def loss_weight(self, ids: torch.Tensor, pad_mask: torch.Tensor, labels: torch.Tensor) -> float:
        """What forward's mean divides by: the examples, or the sum of their class weights."""
        if self.class_weights is None:
            return float(labels.shape[0])
        return float(self.class_weights[labels].sum())


# ---- validation over a whole held-out set --------------------------------------------------------------

def _batches_on(batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device):
    for batch in batches:
        yield [t.to(device) for t in batch]


@torch.no_grad()
def validate_lm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device) -> Validation:
    """Mean loss per trained token of packed sft rows (input_ids, targets, positions, segments)."""
    model.eval()
    loss_of = CausalLMLoss(model)
    total, tokens = 0.0, 0
    for batch in _batches_on(batches, device):
        n = int((batch[1] != -100).sum())
        total += float(loss_of(*batch)) * n
        tokens += n
    return Validation(total / max(tokens, 1), tokens)


@torch.no_grad()
def validate_dpo(objective: DPOLoss, batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device) -> Validation:
    """Mean DPO loss, reward accuracy (chosen reward above rejected) and mean reward margin over held-out pairs."""
    objective.model.eval()
    losses, margins = [], []
    for batch in _batches_on(batches, device):
        loss, chosen, rejected = objective.pair_terms(*batch)
        losses.append(loss)
        margins.append(chosen - rejected)
    loss, margin = torch.cat(losses), torch.cat(margins)
    return Validation(float(loss.mean()), len(loss), {"reward_accuracy": float((margin > 0).float().mean()),
                                                      "reward_margin": float(margin.mean())})


def validate_classifier(objective: ClassifyLoss, batches: Iterable[tuple[torch.Tensor, ...]],
                        device: torch.device, labels: list[str]) -> Validation:
    """Mean loss, accuracy and macro-F1 of a classifier over held-out (ids, pad_mask, labels) batches."""
    from foundry.eval.classification import classification_report

    classifier = objective.classifier
    classifier.eval()
    total, true, predicted = 0.0, [], []
    with torch.no_grad():
        for ids, pad_mask, target in _batches_on(batches, device):
            logits = classifier(ids, pad_mask).float()
            total += float(F.cross_entropy(logits, target, reduction="sum"))
            true += target.tolist()
            predicted += logits.argmax(dim=-1).tolist()
    report = classification_report(true, predicted, labels)
    return Validation(total / max(len(true), 1), len(true), {"accuracy": report.accuracy, "macro_f1": report.macro_f1})


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameters, and AdamW's state for each (two fp32 moments per trained value)."""
    from foundry.model.lora import trainable_parameters

    trainable, total = trainable_parameters(model)  # a quantised base's frozen weights count in the total
    return {"trainable_parameters": trainable, "total_parameters": total,
            "optimizer_state_bytes": 8 * trainable}
