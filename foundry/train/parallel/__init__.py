"""Parallelism applied to an unchanged model from outside: data parallel (DDP, FSDP2), tensor parallel, and the order they compose in."""
