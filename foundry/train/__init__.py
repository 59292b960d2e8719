"""The one training loop, its settings (`TrainConfig`), schedule, time budget, loss, checkpoints and metrics.

Pretraining and every fine-tuning recipe run through `loop.train`; what the loop tells a person goes
through a `TrainReporter` (the CLI draws it). May import `foundry.eval`, `foundry.data`, `foundry.hub`,
`foundry.model`, `foundry.tokenizer`, `foundry.config` and `foundry.core`; never `infer`, `serve` or `cli`.
"""
