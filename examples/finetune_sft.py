"""sft: teach a small model to upper-case three letters, scored on 100 triples it never saw.

    python examples/finetune_sft.py [--out DIR] [--steps 300]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import arguments, base_model, write_jsonl  # noqa: E402

from foundry.cli.demo_finetune import upper_task  # noqa: E402
from foundry.cli.main import main  # noqa: E402

args = arguments(__doc__.splitlines()[0], 300)
out = Path(args.out)
train, held_out = upper_task()
sys.exit(main(["finetune", str(base_model(out)), "--recipe", "sft",
               "--data", str(write_jsonl(out / "train.jsonl", train)),
               "--val", str(write_jsonl(out / "val.jsonl", held_out)), "--out", str(out / "run"), "--overwrite",
               "--steps", str(args.steps), "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3"]))
