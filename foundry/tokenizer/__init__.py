"""Tokenizers in the Hugging Face layout: byte-level BPE training, loading, ids and chat templates.

Holds `tokenizer` (the Tokenizer class over HF `tokenizers`), `chat_template` (rendering templates the
way transformers does, in a sandbox, and finding message text in the result so that it never becomes
special tokens) and `files` (a tokenizer's files written as one set). May import only `foundry.core`.
"""

from foundry.tokenizer.tokenizer import (CHATML_TEMPLATE, ENDOFTEXT, IM_END, IM_START, PAD, SPECIAL_TOKENS,
                                         Tokenizer)

__all__ = ["Tokenizer", "SPECIAL_TOKENS", "CHATML_TEMPLATE", "ENDOFTEXT", "IM_START", "IM_END", "PAD"]
