"""Training metrics: a JSONL log, a loss-curve PNG and (mixture of experts) an expert-load PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from foundry.core.files import atomic_path
from foundry.core.units import human_count


class MetricsLog:
    """Append-only JSONL of metric records; a resumed run first drops records past its checkpoint.

    writer False: a distributed run's other ranks, which read the log but leave writing it to rank 0."""

    def __init__(self, path: Path, resume_step: int | None = None, writer: bool = True):
        self.path = path
        self.handle = None
        if not writer:
            return
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with atomic_path(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))
        self.handle = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self.handle is None:
            return
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _smoothed(values: list[float], weight: float = 0.8) -> list[float]:
    """Bias-corrected exponential moving average, as TensorBoard draws it."""
    out, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def plot_title(model: str, params: int, tokens: int) -> str:
    """The loss plot's title: which model (its spec: a preset or a directory's name), how big, how far trained."""
    return f"{Path(model).name or model} · {human_count(params)} parameters · {human_count(tokens)} tokens trained"


def plot_losses(metrics_path: Path, out_png: Path, baseline: float | None = None, title: str | None = None) -> None:
    """Training and validation loss against tokens seen, written atomically as a PNG.

    Validation is drawn as two named series so that neither jumps for a reason that is not the model:
    the evaluations on the run's fixed sample (`val_loss`), and the final ones on the full evaluation
    set (`val_full_loss`, by default the whole split, the set the unigram baseline is computed on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r]
    sample = [r for r in records if "val_loss" in r]
    full = [r for r in records if "val_full_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        tokens, losses = [r["tokens"] for r in train], [r["loss"] for r in train]
        ax.plot(tokens, losses, color="tab:blue", alpha=0.3, lw=1)
        ax.plot(tokens, _smoothed(losses), color="tab:blue", label="train loss (smoothed)", lw=1.6)
    if sample:
        ax.plot([r["tokens"] for r in sample], [r["val_loss"] for r in sample], "o-", color="tab:orange", lw=1.5,
                label=f"validation loss, fixed sample ({_count(sample[-1].get('val_tokens'))} tokens)")
    if full:
        what = "whole split" if full[-1].get("whole_split") else "final evaluation set"
        ax.plot([r["tokens"] for r in full], [r["val_full_loss"] for r in full], "s", color="tab:red", ms=7,
                label=f"validation loss, {what} ({_count(full[-1].get('val_full_tokens'))} tokens)")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="grey", lw=1, label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or metrics_path.parent.name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _count(tokens: int | None) -> str:
    return human_count(tokens) if tokens else "?"


def plot_expert_load(metrics_path: Path, out_png: Path, title: str | None = None) -> None:
    """A mixture of experts' routing, written atomically as a PNG: each MoE layer's imbalance (the busiest
    expert's assignments over the mean; 1 is perfect balance) against tokens seen, beside a heat map of each
    layer's share per expert at the last logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "expert_imbalance" in r]
    fig, (lines, heat) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    if records:
        tokens = [r["tokens"] for r in records]
        for layer in range(len(records[-1]["expert_imbalance"])):
            lines.plot(tokens, [r["expert_imbalance"][layer] for r in records], lw=1.3, label=f"MoE layer {layer}")
        share = records[-1]["expert_share"]
        image = heat.imshow(share, aspect="auto", cmap="viridis", vmin=0)
        heat.set_xlabel("expert")
        heat.set_ylabel("MoE layer")
        heat.set_xticks(range(len(share[0])))
        heat.set_yticks(range(len(share)))
        heat.set_title(f"share of assignments at step {records[-1]['step']:,}", fontsize=10)
        fig.colorbar(image, ax=heat)
        if len(share) <= 12:
            lines.legend(fontsize=8)
    lines.axhline(1.0, ls="--", color="grey", lw=1)
    lines.set_xlabel("tokens seen")
    lines.set_ylabel("imbalance (max / mean tokens per expert)")
    lines.set_title(title or metrics_path.parent.name, fontsize=10)
    lines.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
