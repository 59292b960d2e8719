"""What `foundry pretrain` / `foundry finetune` show after a vision run.

A ViT: accuracy, macro-F1, per-class precision / recall and the confusion matrix (table and PNG) on the
held-out images, beside two baselines on the same pixels and split (nearest centroid, logistic regression).
A DiT: a grid of samples, one row per class (samples.png in the run directory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from foundry.train.loop import TrainResult
from foundry.train.setup import RunSetup

SAMPLE_STEPS = 50
SAMPLE_GUIDANCE = 2.0
SAMPLES_PER_CLASS = 8


def print_vision_report(setup: RunSetup, result: TrainResult) -> dict[str, Any]:
    """Print the run's held-out figures; returns them (tests and the demo read them)."""
    run = setup.recipe
    if run.kind == "classify":
        return _classify_report(setup, result)
    return _samples_report(setup, result)


def _classify_report(setup: RunSetup, result: TrainResult) -> dict[str, Any]:
    from foundry.data.images import eval_image_batches
    from foundry.eval.classification import classification_report, evaluate_classifier, plot_confusion
    from foundry.eval.images import logistic_regression, nearest_centroid

    data = setup.recipe.data
    if not data.val_ids:
        print("  no held-out images (--val-fraction 0): no accuracy to report", flush=True)
        return {}
    report = evaluate_classifier(setup.model, eval_image_batches(data.val_pixels, data.val_ids, 256),
                                 data.labels, setup.device)
    print("\n".join(report.table_lines()), flush=True)
    png = Path(result.run_dir) / "confusion.png"
    plot_confusion(report, png)
    print(f"  confusion matrix plot: {png}", flush=True)
    train_y, k = torch.tensor(data.train_ids), len(data.labels)
    baselines = {"nearest_centroid": nearest_centroid(data.train_pixels, train_y, data.val_pixels, k),
                 "logistic_regression": logistic_regression(data.train_pixels, train_y, data.val_pixels, k)}
    figures: dict[str, Any] = report.to_dict()
    for name, predicted in baselines.items():
        base = classification_report(data.val_ids, predicted.tolist(), data.labels)
        figures[f"{name}_accuracy"] = base.accuracy
        print(f"  baseline      {name.replace('_', ' ')} on the pixels: accuracy {base.accuracy:.4f}, macro F1 "
              f"{base.macro_f1:.4f} (the same {len(data.val_ids)} held-out images)", flush=True)
    return figures


def _samples_report(setup: RunSetup, result: TrainResult) -> dict[str, Any]:
    from foundry.data.images import write_image_grid
    from foundry.infer.diffusion import sample

    model, schedule = setup.model, setup.objective.schedule
    labels = setup.recipe.data.labels
    classes = torch.arange(len(labels)).repeat_interleave(SAMPLES_PER_CLASS).to(setup.device)
    guidance = SAMPLE_GUIDANCE if model.config.has_null_class else 1.0
    generator = torch.Generator().manual_seed(0)
    model.eval()
    with torch.no_grad():
        images = sample(model, schedule, classes, steps=SAMPLE_STEPS, guidance=guidance, generator=generator)
    png = write_image_grid(images.cpu(), Path(result.run_dir) / "samples.png", columns=SAMPLES_PER_CLASS)
    print(f"  samples       {png}: one row per class ({', '.join(labels)}), {SAMPLE_STEPS} DDIM steps, "
          f"guidance {guidance:g}, seed 0", flush=True)
    return {"samples": str(png)}
