"""What `foundry finetune` shows after the loop: the gain on the held-out records, in the recipe's own terms.

sft: exact match of greedy answers on held-out conversations, the starting model beside the fine-tuned one
(through the one inference engine); classify: accuracy, macro-F1, per-class precision / recall and the
confusion matrix (table and PNG) against the majority-class baseline; dpo: held-out reward accuracy and margin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from foundry.eval.scoring import exact_match
from foundry.train.config import TrainConfig
from foundry.train.finetune_config import FinetuneConfig
from foundry.train.loop import TrainResult
from foundry.train.setup import RunSetup

MAX_CHECKS = 200  # held-out conversations generated for the exact-match figure


def greedy_answers(model: torch.nn.Module, tokenizer: Any, conversations: list[list[dict]],
                   max_new_tokens: int) -> list[str]:
    """The model's greedy reply to each conversation (through the engine, batched)."""
    from foundry.infer.engine import Engine
    from foundry.infer.sampling import SamplingParams

    engine = Engine(model, tokenizer)
    prompts = [tokenizer.encode_chat(messages, add_generation_prompt=True) for messages in conversations]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    return [completion.text for completion in engine.generate(prompts, params)]


def sft_scores(setup: RunSetup, before: torch.nn.Module, after: torch.nn.Module) -> tuple[float, float, int] | None:
    """(exact match before, after, checks) on the held-out conversations; None without held-out answers."""
    checks = setup.recipe.answer_checks[:MAX_CHECKS]
    if not checks:
        return None
    conversations, references = [c for c, _ in checks], [r for _, r in checks]
    longest = max(len(setup.tokenizer.encode(r)) for r in references) + 4
    scores = [exact_match(greedy_answers(m, setup.tokenizer, conversations, longest), references)
              for m in (before, after)]
    return scores[0], scores[1], len(checks)


def print_recipe_report(cfg: TrainConfig, ft: FinetuneConfig, setup: RunSetup, result: TrainResult) -> dict:
    """Print the recipe's held-out figures; returns them (the demo and tests read them)."""
    recipe = setup.recipe
    figures: dict[str, Any] = {}
    if result.val is not None:
        figures.update({"val_loss": result.val.loss, **getattr(result.val, "metrics", {})})
    if ft.recipe == "sft":
        from foundry import hub

        starting = hub.load(setup.meta["base_model"], device=setup.device, dtype=torch.float32).model
        scores = sft_scores(setup, starting, setup.model)
        if scores is not None:
            before, after, n = scores
            print(f"  exact match   {after:.1%} on {n} held-out prompts after fine-tuning, {before:.1%} before",
                  flush=True)
            figures.update({"exact_match_before": before, "exact_match_after": after, "checks": n})
    elif ft.recipe == "classify" and recipe.val_batches is not None:
        from foundry.eval.classification import evaluate_classifier, plot_confusion

        report = evaluate_classifier(setup.model, recipe.val_batches(), recipe.meta["labels"], setup.device)
        print("\n".join(report.table_lines()), flush=True)
        png = Path(result.run_dir) / "confusion.png"
        plot_confusion(report, png)
        print(f"  confusion matrix plot: {png}", flush=True)
        figures.update(report.to_dict())
    elif ft.recipe == "dpo" and result.val is not None:
        metrics = result.val.metrics
        print(f"  preferences   reward accuracy {metrics['reward_accuracy']:.1%}, mean reward margin "
              f"{metrics['reward_margin']:.3f} on {result.val.tokens} held-out pairs", flush=True)
    return figures
