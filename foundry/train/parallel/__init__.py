"""Parallelism applied to an unchanged model from outside: data parallel (DDP, FSDP2), tensor parallel, expert
parallel (a mixture of experts' experts split over data-parallel ranks), and the order they compose in."""
