"""classify: flag card transactions as fraud when they mention a refund (30% of them), on held-out texts.

    python examples/finetune_classify.py [--out DIR] [--steps 60]
"""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import arguments, base_model, write_jsonl  # noqa: E402

from foundry.cli.main import main  # noqa: E402

WORDS = "the card was used at a shop online for fuel food travel hotel cash store app payment".split()


def records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        fraud = rng.random() < 0.3
        if fraud:
            text.insert(rng.randrange(len(text) + 1), "refund")
        out.append({"text": " ".join(text), "label": "fraud" if fraud else "legitimate"})
    return out


args = arguments(__doc__.splitlines()[0], 60)
out = Path(args.out)
sys.exit(main(["finetune", str(base_model(out)), "--recipe", "classify",
               "--data", str(write_jsonl(out / "train.jsonl", records(800, 0))),
               "--val", str(write_jsonl(out / "val.jsonl", records(200, 1))), "--out", str(out / "run"), "--overwrite",
               "--steps", str(args.steps), "--batch-size", "16", "--seq-len", "64", "--lr", "1e-3",
               "--class-weights", "balanced"]))
