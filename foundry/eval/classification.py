"""Classification metrics: accuracy, per-class precision/recall/F1, macro F1, the confusion matrix and the
majority-class baseline the model must beat; and a confusion-matrix picture."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from foundry.core.files import atomic_path


@dataclass
class ClassMetrics:
    """Precision, recall and F1 of one class, and its support (how many examples truly have it)."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationReport:
    """How well predictions match the truth over `count` examples.

    confusion[i][j] counts examples of true class i predicted as class j. A class never predicted has
    precision 0, one never present recall 0 (scikit-learn's zero_division=0). macro_f1 averages F1 over
    the classes present in the truth or the predictions."""

    labels: list[str]
    accuracy: float
    macro_f1: float
    per_class: list[ClassMetrics]
    confusion: list[list[int]]
    majority_label: str
    majority_baseline: float  # accuracy of always predicting the most frequent true class
    count: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for foundry.json and --json output)."""
        return asdict(self)

    def table_lines(self) -> list[str]:
        """The report as plain text lines: the summary, the per-class table, the confusion matrix."""
        width = max(8, *(len(label) for label in self.labels))
        summary = (f"accuracy {self.accuracy:.4f}   macro F1 {self.macro_f1:.4f}   "
                   f"majority baseline {self.majority_baseline:.4f} (always {self.majority_label!r})   "
                   f"{self.count} examples")
        lines = [summary, "",
                 f"{'label':<{width}}  precision  recall      f1  support"]
        for m in self.per_class:
            lines.append(f"{m.label:<{width}}  {m.precision:9.4f}  {m.recall:6.4f}  {m.f1:6.4f}  {m.support:7d}")
        cell = max(5, *(len(str(v)) for row in self.confusion for v in row), *(len(label) for label in self.labels))
        lines += ["", "confusion (rows: true, columns: predicted)",
                  " " * width + "  " + " ".join(f"{label:>{cell}}" for label in self.labels)]
        for label, row in zip(self.labels, self.confusion):
            lines.append(f"{label:<{width}}  " + " ".join(f"{v:>{cell}d}" for v in row))
        return lines


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def classification_report(true_ids: Sequence[int], pred_ids: Sequence[int],
                          labels: Sequence[str]) -> ClassificationReport:
    """The report of predicted class indices against true ones; labels[i] names class i."""
    labels = [str(label) for label in labels]
    if len(true_ids) != len(pred_ids):
        raise ValueError(f"{len(true_ids)} true labels but {len(pred_ids)} predictions")
    if not true_ids:
        raise ValueError("no examples to score")
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(true_ids, pred_ids):
        if not (0 <= t < n and 0 <= p < n):
            raise ValueError(f"class index out of range 0..{n - 1}: true {t}, predicted {p}")
        confusion[int(t)][int(p)] += 1
    per_class, f1_present = [], []
    for k, label in enumerate(labels):
        hits = confusion[k][k]
        predicted = sum(confusion[i][k] for i in range(n))
        support = sum(confusion[k])
        precision, recall = _ratio(hits, predicted), _ratio(hits, support)
        f1 = _ratio(2 * hits, predicted + support)  # = 2PR / (P + R)
        per_class.append(ClassMetrics(label, precision, recall, f1, support))
        if predicted or support:
            f1_present.append(f1)
    count = len(true_ids)
    majority = max(range(n), key=lambda k: (per_class[k].support, -k))
    return ClassificationReport(
        labels=labels, accuracy=_ratio(sum(confusion[k][k] for k in range(n)), count),
        macro_f1=sum(f1_present) / len(f1_present), per_class=per_class, confusion=confusion,
        majority_label=labels[majority], majority_baseline=_ratio(per_class[majority].support, count), count=count)


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device | str = "cpu",
            autocast: ContextManager | None = None) -> tuple[list[int], list[int]]:
    """(true class ids, predicted class ids) over batches of (model inputs..., labels), in eval mode: (input_ids,
    pad_mask, labels) for a text classifier, (pixels, labels) for an image classifier."""
    was_training = model.training
    model.eval()
    true_ids: list[int] = []
    pred_ids: list[int] = []
    try:
        for *inputs, labels in batches:
            with autocast or nullcontext():
                logits = model(*(t.to(device) for t in inputs))
            pred_ids += logits.argmax(dim=-1).tolist()
            true_ids += labels.tolist()
    finally:
        model.train(was_training)
    return true_ids, pred_ids


def evaluate_classifier(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                        labels: Sequence[str] | None = None, device: torch.device | str = "cpu",
                        autocast: ContextManager | None = None) -> ClassificationReport:
    """The report of a classifier over batches of (model inputs..., labels) (see predict); labels name the classes
    (default: their indices)."""
    true_ids, pred_ids = predict(model, batches, device, autocast)
    if labels is None:
        labels = [str(k) for k in range(getattr(model, "num_labels", max(true_ids + pred_ids) + 1))]
    return classification_report(true_ids, pred_ids, labels)


def plot_confusion(report: ClassificationReport, path: str | Path) -> Path:
    """Write the confusion matrix as a PNG (counts in the cells, rows true), atomically."""
    # A bare Figure draws with Agg and never touches pyplot's global backend.
    from matplotlib.figure import Figure

    path = Path(path)
    n = len(report.labels)
    size = min(3 + 0.6 * n, 20)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(report.confusion, cmap="Blues")
    ax.set_xticks(range(n), report.labels, rotation=45, ha="right")
    ax.set_yticks(range(n), report.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {report.accuracy:.3f}, macro F1 {report.macro_f1:.3f}")
    peak = max((v for row in report.confusion for v in row), default=0)
    if n <= 30:
        for i, row in enumerate(report.confusion):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center",
                        color="white" if value > peak / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


__all__ = [
    "ClassMetrics",
    "ClassificationReport",
    "classification_report",
    "evaluate_classifier",
    "plot_confusion",
    "predict",
]
