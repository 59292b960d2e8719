"""Corpora -> token shards -> batches.

Holds `corpus` (documents from the stdlib, files, directories, JSONL; the train/val split by name
hash), `shards` (`prepare` and `TokenShards`, with checksums in meta.json) and `loader` (seeded,
rank-aware, resumable batches). May import `foundry.tokenizer`, `foundry.config` and `foundry.core`.
"""
