"""The vision verbs: `foundry predict` (a ViT's top-k labels for image files) and `foundry generate-image` (a
class-conditional DiT's samples as a PNG grid, optionally judged by a ViT); and the vision branch of
`foundry pretrain` / `foundry finetune` (a ViT or DiT preset or directory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from foundry.cli.parsing import add_verb
from foundry.core.errors import UserError


def train_vision(cfg, val_fraction: float, stage: str) -> int:
    """Prepare, train and report a vision run (pretrain's or finetune's), one process or DDP replicas."""
    from foundry.cli.pretrain import summary_lines
    from foundry.cli.progress import ConsoleTrainReporter
    from foundry.cli.vision_report import print_vision_report
    from foundry.train.loop import train
    from foundry.train.parallel.world import is_main_process
    from foundry.train.progress import TrainReporter
    from foundry.train.vision import prepare_vision

    main_rank = is_main_process()
    reporter = ConsoleTrainReporter() if main_rank else TrainReporter()
    notes: list[str] = []
    setup = prepare_vision(cfg, val_fraction, notes=notes, stage=stage)
    for line in notes:
        reporter.note(line)
    result = train(cfg, reporter, setup)
    if main_rank:
        print("\n".join(summary_lines(result)), flush=True)
        if result.tokens_per_second:
            print(f"  images/s      {result.tokens_per_second / cfg.seq_len:,.0f} in the training steps", flush=True)
        if not result.interrupted:
            print_vision_report(setup, result)
    return 130 if result.interrupted else 0


# ---- predict -------------------------------------------------------------------------------------------

def _image_paths(inputs: list[str]) -> list[Path]:
    from foundry.data.images import IMAGE_SUFFIXES

    paths: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: no image files in this folder")
            paths += found
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return paths


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from foundry.data.images import open_image, preprocess
    from foundry.hub.vision import load_vit

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    loaded = load_vit(args.model)
    model, labels = loaded.model.eval(), loaded.model.config.labels
    paths = _image_paths(args.images)
    images = [open_image(p) for p in paths]  # every file decodes before any prediction is printed
    k = min(args.top_k, len(labels))
    with torch.no_grad():
        for first in range(0, len(paths), args.batch_size):
            batch = torch.stack([preprocess(image, loaded.processing) for image in images[first:first + args.batch_size]])
            probabilities = model(batch).float().softmax(dim=-1)
            top = probabilities.topk(k, dim=-1)
            for path, values, indices in zip(paths[first:], top.values.tolist(), top.indices.tolist()):
                ranked = ", ".join(f"{labels[i]} {p:.3f}" for i, p in zip(indices, values))
                print(f"{path}: {ranked}", flush=True)
    return 0


# ---- generate-image ---------------------------------------------------------------------------------------

def _classes(args: argparse.Namespace, labels: list[str]) -> list[int]:
    if args.class_ is None:
        return list(range(len(labels)))
    chosen = []
    for name in args.class_:
        if name in labels:
            chosen.append(labels.index(name))
        elif name.isdigit() and int(name) < len(labels):
            chosen.append(int(name))
        else:
            raise UserError(f"--class {name}: the model's classes are {', '.join(labels)} (or their ids 0.."
                            f"{len(labels) - 1})")
    return chosen


def _cmd_generate_image(args: argparse.Namespace) -> int:
    import torch

    from foundry.data.images import write_image_grid
    from foundry.hub.diffusion import load_dit
    from foundry.infer.diffusion import sample

    for name in ("num", "steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    loaded = load_dit(args.model)
    model = loaded.model.eval()
    if args.guidance != 1 and not model.config.has_null_class:
        raise UserError(f"--guidance {args.guidance:g}: {loaded.path} was trained without a null class "
                        f"(class_dropout_prob 0), so it has no unconditional model to guide against; use "
                        f"--guidance 1")
    labels = loaded.labels
    classes = _classes(args, labels)
    wanted = torch.tensor(classes).repeat_interleave(args.num)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        images = sample(model, loaded.schedule, wanted, steps=args.steps, guidance=args.guidance,
                        generator=generator)
    out = write_image_grid(images, args.out, columns=args.num, scale=args.scale)
    print(f"{len(images)} images ({args.num} per class: {', '.join(labels[c] for c in classes)}; {args.steps} "
          f"DDIM steps, guidance {args.guidance:g}, seed {args.seed}) -> {out}", flush=True)
    if args.judge:
        from foundry.cli.vision_judge import judge_samples

        judge_samples(args.judge, images, wanted, labels, args.real, generator_meta=loaded.meta)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `predict` and `generate-image` verbs."""
    p = add_verb(sub, "predict", _cmd_predict, "Label image files with a ViT classifier: the top-k labels of "
                 "each, with probabilities.")
    p.add_argument("model", help="a ViT model directory (a run's checkpoint, or transformers' save_pretrained)")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=3, help="labels to show per image (default: 3)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")

    p = add_verb(sub, "generate-image", _cmd_generate_image, "Sample images from a class-conditional "
                 "diffusion transformer (DDIM, classifier-free guidance) into a PNG grid.")
    p.add_argument("model", help="a DiT model directory (diffusers layout, as foundry pretrain writes it)")
    p.add_argument("--class", dest="class_", action="append", default=None, metavar="LABEL",
                   help="a class to draw, by name or id (repeatable; default: every class, one row each)")
    p.add_argument("--num", type=int, default=8, help="images per class (default: 8)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    p.add_argument("--guidance", type=float, default=2.0,
                   help="classifier-free guidance scale; 1 turns it off (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--out", default="grid.png", help="the PNG to write (default: grid.png)")
    p.add_argument("--scale", type=int, default=4, help="enlarge each image this many times (default: 4)")
    p.add_argument("--judge", metavar="VIT_DIR", default=None,
                   help="a ViT trained on real images of the same classes: report its agreement with the "
                        "requested classes, a Frechet distance on its features and nearest-neighbour distances")
    p.add_argument("--real", default="digits", metavar="DATA",
                   help="with --judge: the real images to compare against (default: digits)")
