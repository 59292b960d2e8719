"""Measuring a model: perplexity over token shards and the unigram baseline beside it.

May import `foundry.data`, `foundry.model`, `foundry.tokenizer`, `foundry.config` and `foundry.core`.
"""
