"""Vision training throughput: foundry's ViT and DiT vs transformers' ViTForImageClassification and diffusers'
DiTTransformer2DModel, same weights, same batches, one process.

    python benchmarks/vision.py [--steps 2] [--rounds 8] [--batch 128] [--threads 1] [--quick]

Three groups, each trained with AdamW in fp32 (forward + backward + step) on the same batches, contenders alternating
round by round (train_throughput.py's Runner: its step(x, y) fits, a DiT batch's x being (x0, t, noise, drop)):
- ViT vit-tiny as the preset stands (8x8 grayscale, hidden 96, 4 layers; patch 4 = 5 tokens when written, patch 2 =
  17 tokens before) on sklearn's digits, labels "0".."9";
- ViT small (16x16 RGB, patch 2, hidden 192, 6 layers, 3 heads, MLP 768, 65 tokens: DeiT-Ti's width) on random
  pixels in [-1, 1] with random labels;
  both against transformers' ViTForImageClassification loaded from foundry's saved directory (weights perturbed
  off their init so the loss check sees attention), with attn_implementation "sdpa" (its default) and "eager";
- DiT dit-tiny (8x8 grayscale, patch 2, 4 layers, 4 x 16 heads) on the digits, against diffusers'
  DiTTransformer2DModel loaded from foundry's saved transformer/ folder. Every tensor init_weights leaves zero
  (the adaLN-Zero modulations and the output layer, which make every block the identity, and the biases) is
  perturbed first, and the label tables widened, so a contender computing other labels fails the loss check.
  Both run foundry's DenoisingLoss on the same (x0, t, noise, labels, label-drop) draws; diffusers' own in-forward
  label dropout (each block drops labels independently at 0.1 in train mode) is switched off so both compute one
  function.
Each group also times foundry at the other fp32 matmul precision ("highest" when --fp32-matmul resolves to
oneDNN's "medium", as `foundry pretrain` picks on CPUs without AMX): torch's CPU flash attention is many times slower
under "medium" for some sequence lengths, which the row makes visible; and foundry with SDPA held to its math
backend (matmul, softmax, matmul, as transformers' eager attention), a candidate change for CPU training.
Every contender is run exactly as the objective `foundry pretrain` builds (ImageClassifyLoss, DenoisingLoss); the
reference models are wrapped only to return .logits / .sample. Before timing, each reference's first-batch loss must
equal foundry's within 1e-4. Prints the CPU capability, images/s (median and best round) and the ratio
foundry / reference as the median of per-round ratios. The host may be shared: with other processes on the cores,
the default --threads 1 gives steadier ratios than two threads' OpenMP barriers; trust ratios over images/s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from foundry.config.vision_config import ViTConfig, vision_preset
from foundry.data.images import digits
from foundry.hub.diffusion import save_dit
from foundry.hub.vision import save_vit
from foundry.infer.device import cpu_capability
from foundry.model.dit import DiT
from foundry.model.noise_schedule import NoiseSchedule
from foundry.model.vit import ViT
from foundry.train.speed import configure_fp32_matmul, matmul_peak
from foundry.train.vision import DenoisingLoss, ImageClassifyLoss, processing_for

LABELS = [str(d) for d in range(10)]
LOSS_TOLERANCE = 1e-4
# The larger ViT: DeiT-Ti's width and heads, half its depth, on 16x16 RGB cut into 64 patches of 2x2.
VIT_SMALL = ViTConfig(image_size=16, patch_size=2, num_channels=3, hidden_size=192, num_hidden_layers=6,
                      num_attention_heads=3, intermediate_size=768, labels=LABELS)
# --quick's stand-in for it: the same code path, a fraction of the work.
VIT_SMALL_QUICK = dataclasses.replace(VIT_SMALL, hidden_size=48, num_hidden_layers=2, intermediate_size=96)


def load_runner_class() -> type:
    """train_throughput.py's Runner (one engine's model, AdamW, step and timings), so the benchmarks time alike."""
    spec = importlib.util.spec_from_file_location("_train_throughput", Path(__file__).with_name("train_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Runner


class Logits(nn.Module):
    """transformers' classifier as a function of pixels to logits, so ImageClassifyLoss runs on it unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


class Sample(nn.Module):
    """diffusers' DiT as a function of (x_t, t, labels) to its prediction, so DenoisingLoss runs on it unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep=timestep, class_labels=class_labels).sample


@dataclasses.dataclass
class Group:
    """One comparison: its title, what it trains, its batches and its contenders (foundry's first)."""

    title: str
    shape: str
    batches: list
    runners: list = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def digit_batches(count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of the digits in [-1, 1] ([batch, 1, 8, 8], label ids), drawn by a seeded permutation."""
    images = digits()
    pixels = images.pixels(processing_for(8, 1))
    ids = torch.tensor(images.label_ids())
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(ids), generator=gen) for _ in range(count * batch // len(ids) + 1)])
    return [(pixels[order[i * batch:(i + 1) * batch]], ids[order[i * batch:(i + 1) * batch]]) for i in range(count)]


def random_batches(config: ViTConfig, count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` batches of uniform random pixels in [-1, 1] with random labels, for a shape no dataset here has."""
    gen = torch.Generator().manual_seed(seed)
    size = (batch, config.num_channels, config.image_size, config.image_size)
    return [(torch.rand(size, generator=gen) * 2 - 1, torch.randint(0, config.num_labels, (batch,), generator=gen))
            for _ in range(count)]


def denoising_batches(config, schedule: NoiseSchedule, count: int, batch: int, seed: int) -> list:
    """`count` DiT batches ((x0, t, noise, drop), labels): digits, uniform timesteps, Gaussian noise and the label
    drop mask at the config's class_dropout_prob, drawn once so every contender trains on the same ones."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for x0, labels in digit_batches(count, batch, seed):
        t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(len(x0), generator=gen) < config.class_dropout_prob
        out.append(((x0, t, noise, drop), labels))
    return out


def check_loss(runner, batch: tuple, reference: float, name: str) -> str:
    """Refuse to time a contender whose first-batch loss differs from foundry's: it would not be like for like.
    Returns a note of the two losses."""
    with torch.no_grad():
        loss = runner.loss_of(*batch).item()
    if abs(loss - reference) > LOSS_TOLERANCE:
        raise AssertionError(f"{runner.name}: first-batch loss {loss:.6f} differs from {name}'s "
                             f"{reference:.6f} by more than {LOSS_TOLERANCE}")
    return f"{runner.name}: first-batch loss {loss:.6f}, {name}'s {reference:.6f} (|diff| {abs(loss - reference):.1e})"


def other_precision(runner_class, name: str, model: nn.Module, make_loss, fast: bool):
    """foundry again on a copy of its model, the same batches, at the other fp32 matmul precision: torch's CPU flash
    attention (SDPA, which foundry and the references' defaults run) is many times slower under "medium" for some
    shapes (17 or 65 tokens measured; 5 or 16 not), so the row shows what the setting costs or gains as a whole."""
    twin = copy.deepcopy(model)
    return runner_class(f"{name} fp32 {'highest' if fast else 'medium'}", twin, make_loss(twin), not fast, False)


def math_attention(loss_of):
    """A loss function whose forward runs SDPA's math backend (matmul, softmax, matmul: what transformers' eager
    attention computes) instead of torch's CPU flash-attention kernel; the backward follows the ops it recorded.
    A candidate change to foundry's attention on CPU, timed beside the landed one."""
    def run(x, y):
        with sdpa_kernel(SDPBackend.MATH):
            return loss_of(x, y)

    return run


def foundry_rows(runner_class, name: str, model: nn.Module, make_loss, fast: bool) -> list:
    """foundry as landed, then at the other fp32 precision and with SDPA's math backend (each on its own copy)."""
    candidate = copy.deepcopy(model)
    return [runner_class(name, model, make_loss(model), fast, False),
            other_precision(runner_class, name, model, make_loss, fast),
            runner_class(f"{name} sdpa math", candidate, math_attention(make_loss(candidate)), fast, False)]


def perturb(model: nn.Module, seed: int, scale: float = 0.08) -> None:
    """Add N(0, scale) to every weight: at init (std 0.02) a ViT's logits are so small that a contender computing
    attention differently would move the loss by less than 1e-3; after this, by ~0.1, far past LOSS_TOLERANCE."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)


def vit_group(title: str, config: ViTConfig, batches: list, fast: bool) -> Group:
    """foundry's ViT and transformers' ViTForImageClassification (sdpa, eager) on its saved directory."""
    import transformers

    runner_class = load_runner_class()
    torch.set_float32_matmul_precision("medium" if fast else "highest")  # the losses checked as foundry's runs
    model = ViT(config)
    model.init_weights(0)
    perturb(model, 1)
    model.train()
    rows = foundry_rows(runner_class, "foundry ViT", model, ImageClassifyLoss, fast)
    ours = rows[0]
    params = sum(p.numel() for p in model.parameters())
    shape = (f"{config.image_size}x{config.image_size}x{config.num_channels}, patch {config.patch_size}, hidden "
             f"{config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, MLP "
             f"{config.intermediate_size}: {config.num_patches + 1} tokens, {params:,} parameters")
    group = Group(title, shape, batches, rows)
    with torch.no_grad():
        reference = ours.loss_of(*batches[0]).item()
    group.notes.append(check_loss(rows[2], batches[0], reference, ours.name))
    with tempfile.TemporaryDirectory() as tmp:
        save_vit(Path(tmp) / "vit", model, processing_for(config.image_size, config.num_channels))
        for implementation in ("sdpa", "eager"):
            hf = transformers.ViTForImageClassification.from_pretrained(
                Path(tmp) / "vit", dtype=torch.float32, attn_implementation=implementation).train()
            ran = hf.config._attn_implementation
            runner = runner_class(f"transformers {ran}", hf, ImageClassifyLoss(Logits(hf)), fast, False)
            group.notes.append(f"transformers asked for attn_implementation={implementation!r}, ran {ran!r}")
            group.notes.append(check_loss(runner, batches[0], reference, ours.name))
            group.runners.append(runner)
    return group


def perturb_zero_init(model: DiT, seed: int, scale: float = 0.1, label_scale: float = 0.5) -> int:
    """Give every all-zero tensor (the adaLN-Zero modulations, the output layer and the biases after init_weights)
    random values, so the blocks are not identities and the prediction is not zero, and widen the label tables
    (N(0, 0.02) at init) so the labels move the loss: a contender that dropped or changed labels differs by more
    than LOSS_TOLERANCE. Returns how many tensors were changed."""
    gen = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any() or name.endswith("embedding_table.weight"):
                std = label_scale if name.endswith("embedding_table.weight") else scale
                param.copy_(torch.randn(param.shape, generator=gen) * std)
                changed += 1
    return changed


def dit_group(title: str, batches: list, schedule: NoiseSchedule, fast: bool) -> Group:
    """foundry's DiT and diffusers' DiTTransformer2DModel on its saved transformer/ folder, one objective."""
    import diffusers

    config = vision_preset("dit-tiny")
    runner_class = load_runner_class()
    torch.set_float32_matmul_precision("medium" if fast else "highest")  # the losses checked as foundry's runs
    model = DiT(config)
    model.init_weights(0)
    perturbed = perturb_zero_init(model, 1)
    model.train()
    null = config.num_classes if config.has_null_class else None

    def loss_of(predictor: nn.Module):
        objective = DenoisingLoss(predictor, schedule, config.class_dropout_prob, null)
        return lambda x, labels: objective.loss(x[0], labels, x[1], x[2], x[3])

    rows = foundry_rows(runner_class, "foundry DiT", model, loss_of, fast)
    ours = rows[0]
    params = sum(p.numel() for p in model.parameters())
    shape = (f"{config.sample_size}x{config.sample_size}x{config.in_channels}, patch {config.patch_size}, "
             f"{config.num_layers} layers, {config.num_attention_heads} x {config.attention_head_dim} heads, "
             f"{config.num_classes} classes + null: {config.num_patches} tokens, {params:,} parameters "
             f"({perturbed} zero-initialised tensors and label tables perturbed)")
    group = Group(title, shape, batches, rows)
    with torch.no_grad():
        reference = ours.loss_of(*batches[0]).item()
    group.notes.append(check_loss(rows[2], batches[0], reference, ours.name))
    with tempfile.TemporaryDirectory() as tmp:
        save_dit(Path(tmp) / "dit", model, schedule)
        ref = diffusers.DiTTransformer2DModel.from_pretrained(Path(tmp) / "dit" / "transformer").train()
    for module in ref.modules():  # its train-mode label dropout, drawn per block: foundry drops once, outside
        if isinstance(module, diffusers.models.embeddings.LabelEmbedding):
            module.dropout_prob = 0.0
    runner = runner_class("diffusers", ref, loss_of(Sample(ref)), fast, False)
    group.notes.append(check_loss(runner, batches[0], reference, ours.name))
    group.runners.append(runner)
    return group


def time_group(group: Group, rounds: int) -> None:
    """Warm up, then time every contender once per round, every other round in reverse order."""
    for runner in group.runners:  # allocator, oneDNN primitive caches, first touch of the optimizer state
        runner.run(group.batches[:2], record=False)
    for round_ in range(rounds):
        for runner in group.runners if round_ % 2 == 0 else group.runners[::-1]:
            runner.run(group.batches)


def print_group(group: Group, batch: int) -> None:
    """images/s (median and best round) and foundry / each reference as the median of per-round ratios."""
    print(f"\n{group.title}: {group.shape}")
    for note in group.notes:
        print(f"  {note}")
    ours = group.runners[0]
    print(f"  {'contender':<24}{'images/s':>10}{'best round':>12}{'foundry / this':>16}")
    for runner in group.runners:
        median, best = batch / statistics.median(runner.times), batch / min(runner.times)
        ratio = statistics.median(theirs / mine for mine, theirs in zip(ours.times, runner.times, strict=True))
        print(f"  {runner.name:<24}{median:>10,.0f}{best:>12,.0f}{ratio:>15.2f}x")


def print_setup(args: argparse.Namespace) -> None:
    """The machine and the run's size."""
    peak, how = matmul_peak(torch.device("cpu"), torch.float32)
    print(f"CPU: {cpu_capability()}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul "
          f"precision {torch.get_float32_matmul_precision()!r}; {peak / 1e9:.0f} GFLOP/s now ({how}); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"batch {args.batch}, {args.steps} steps x {args.rounds} rounds per contender, AdamW, fp32, "
          f"forward + backward + step; first-batch losses equal within {LOSS_TOLERANCE} before timing")
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
        print("note: other processes are using these CPUs: expect noisy figures; trust the per-round ratios "
              "more than images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fp32-matmul", choices=("auto", "on", "off"), default="auto",
                        help="oneDNN fp32 matmuls for every contender (auto: as foundry pretrain decides)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: batch 16, 2 steps x 2 rounds, a narrow 2-layer stand-in for the small ViT")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.batch = 2, 2, 16
    torch.set_num_threads(args.threads)
    fast = configure_fp32_matmul(args.fp32_matmul, torch.device("cpu"))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print_setup(args)
    schedule = NoiseSchedule()
    small = VIT_SMALL_QUICK if args.quick else VIT_SMALL
    groups = [
        lambda: vit_group("ViT vit-tiny on the digits", vision_preset("vit-tiny"),
                          digit_batches(args.steps, args.batch, 0), fast),
        lambda: vit_group("ViT small on random RGB" + (" (quick: narrowed)" if args.quick else ""), small,
                          random_batches(small, args.steps, args.batch, 0), fast),
        lambda: dit_group("DiT dit-tiny on the digits", denoising_batches(vision_preset("dit-tiny"), schedule,
                                                                          args.steps, args.batch, 0), schedule, fast),
    ]
    for build in groups:  # one group at a time: its models are freed before the next is built
        group = build()
        time_group(group, args.rounds)
        print_group(group, args.batch)


if __name__ == "__main__":
    main()
