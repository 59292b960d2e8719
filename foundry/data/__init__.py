"""Corpora -> token shards -> batches.

Holds `corpus` (documents from the stdlib, files, directories, JSONL; the train/val split by name
hash), `shards` (`prepare` and `TokenShards`, with checksums in meta.json; a prepare swaps its new
directory into place atomically), `cache` (digests and baselines computed once per data directory) and
`loader` (seeded, rank-aware, resumable batches; the fixed evaluation sample). May import
`foundry.tokenizer`, `foundry.config` and `foundry.core`.
"""
