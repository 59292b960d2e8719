"""Corpora -> token shards -> batches: corpus.py (documents), shards.py (prepare, TokenShards), loader.py."""
