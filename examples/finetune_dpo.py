"""dpo: prefer upper-case replies to `say: a b c` over lower-case ones, with a LoRA adapter (reference: the
base with the adapter off); reports the held-out reward accuracy.

    python examples/finetune_dpo.py [--out DIR] [--steps 40]
"""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import arguments, base_model, write_jsonl  # noqa: E402

from foundry.cli.main import main  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
triples = [(a, b, c) for a in LETTERS for b in LETTERS for c in LETTERS]
random.Random(1).shuffle(triples)
pairs = [{"prompt": "say: " + " ".join(t), "chosen": " ".join(t).upper(), "rejected": " ".join(t)} for t in triples]

args = arguments(__doc__.splitlines()[0], 40)
out = Path(args.out)
sys.exit(main(["finetune", str(base_model(out)), "--recipe", "dpo", "--lora",
               "--data", str(write_jsonl(out / "train.jsonl", pairs[100:600])),
               "--val", str(write_jsonl(out / "val.jsonl", pairs[:100])), "--out", str(out / "run"), "--overwrite",
               "--steps", str(args.steps), "--batch-size", "8", "--seq-len", "64", "--lr", "5e-3"]))
