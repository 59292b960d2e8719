"""Labelled images for the vision models: an image folder (root/LABEL/*.png), a JSONL of {"image", "label"}
records, or the 8x8 handwritten digits that ship inside scikit-learn ("digits"); decoded and normalised as
transformers' ViTImageProcessor does; a deterministic stratified split; seeded, resumable batches with an
optional random shift."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from foundry.config.vision_config import ImageProcessing
from foundry.core.errors import UserError
from foundry.data.order import EpochOrder, epoch_seed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS = "digits"


@dataclass
class ImageSet:
    """Decoded images (PIL, as read), each with its label and where it came from."""

    images: list[Any]
    labels: list[str]
    sources: list[str]
    label_set: list[str] = field(default_factory=list)  # every label in order (the folder's, or the records')

    def __post_init__(self) -> None:
        if not self.label_set:
            self.label_set = sorted(set(self.labels), key=_label_key)

    def __len__(self) -> int:
        return len(self.images)

    def label_ids(self, label_set: list[str] | None = None) -> list[int]:
        """Each image's class index in `label_set` (default: its own); a label outside it is refused."""
        label_set = label_set or self.label_set
        index = {label: i for i, label in enumerate(label_set)}
        unknown = sorted(set(self.labels) - index.keys(), key=_label_key)
        if unknown:
            raise UserError(f"label(s) {', '.join(map(repr, unknown))} are not among the model's classes "
                            f"({', '.join(label_set)}); use images of those classes or retrain")
        return [index[label] for label in self.labels]

    def pixels(self, processing: ImageProcessing) -> torch.Tensor:
        """Every image preprocessed: [N, C, size, size] float32."""
        return torch.stack([preprocess(image, processing) for image in self.images])

    def subset(self, indices: list[int]) -> ImageSet:
        return ImageSet([self.images[i] for i in indices], [self.labels[i] for i in indices],
                        [self.sources[i] for i in indices], list(self.label_set))


def _label_key(label: str) -> tuple[int, Any]:
    """Labels sort as numbers when they are numbers ("2" before "10"), else as text."""
    return (0, int(label)) if label.isdigit() else (1, label)


def open_image(path: str | Path) -> Any:
    """The image at `path`, decoded (PIL); a file that is not an image is refused with its name."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be decoded as an image ({exc}); remove or replace the file") from None


def preprocess(image: Any, processing: ImageProcessing) -> torch.Tensor:
    """[C, size, size]: converted to the model's channels (RGB or grayscale), resized (PIL, `resample`) when its
    size differs, rescaled and normalised per channel: ViTImageProcessor's steps, in its order."""
    mode = {1: "L", 3: "RGB"}.get(processing.num_channels)
    if mode is None:
        raise UserError(f"images with {processing.num_channels} channels are not supported (1: grayscale, 3: RGB)")
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (processing.size, processing.size):
        image = image.resize((processing.size, processing.size), resample=processing.resample)
    array = np.asarray(image, dtype=np.float32) * processing.rescale_factor
    if array.ndim == 2:
        array = array[:, :, None]
    mean = np.asarray(processing.image_mean, dtype=np.float32)
    std = np.asarray(processing.image_std, dtype=np.float32)
    return torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())


def read_image_folder(root: str | Path) -> ImageSet:
    """root/LABEL/IMAGE for every image file; the folder names are the labels."""
    root = Path(root)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: _label_key(p.name))
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if loose:
        raise UserError(f"{root}: image(s) {', '.join(loose[:3])}{' ...' if len(loose) > 3 else ''} lie outside a "
                        f"label folder; an image folder holds one folder per label (root/LABEL/image.png)")
    images, labels, sources = [], [], []
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            images.append(open_image(path))
            labels.append(folder.name)
            sources.append(str(path))
    if not images:
        raise UserError(f"{root}: no images found; an image folder holds root/LABEL/*.png (or .jpg, ...)")
    empty = [f.name for f in folders if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in f.iterdir())]
    if empty:
        raise UserError(f"{root}: label folder(s) {', '.join(empty)} hold no images; add images or remove them")
    return ImageSet(images, labels, sources, [f.name for f in folders])


def read_image_jsonl(path: str | Path) -> ImageSet:
    """Records {"image": PATH, "label": NAME}, one per line; a relative PATH is relative to the file's folder."""
    path = Path(path)
    images, labels, sources = [], [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
                    or not isinstance(record.get("label"), (str, int)) or isinstance(record.get("label"), bool):
                raise UserError(f'{where}: each line must be {{"image": "path", "label": "name"}}')
            image_path = Path(record["image"])
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            images.append(open_image(image_path))
            labels.append(str(record["label"]))
            sources.append(str(image_path))
    if not images:
        raise UserError(f"{path}: no records")
    return ImageSet(images, labels, sources)


def digits() -> ImageSet:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16) as 8-bit grayscale images, labels "0".."9"."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits dataset ships inside scikit-learn, which is not installed: "
                        "pip install 'foundry[vision]' (or scikit-learn)") from None
    from PIL import Image

    data = load_digits()
    pixels = np.rint(data.images * (255 / 16)).astype(np.uint8)
    images = [Image.fromarray(p, mode="L") for p in pixels]
    return ImageSet(images, [str(t) for t in data.target], [f"digits[{i}]" for i in range(len(images))],
                    [str(i) for i in range(10)])


def read_images(spec: str | Path) -> ImageSet:
    """`digits`, an image folder, or a JSONL of image records."""
    if str(spec) == DIGITS:
        return digits()
    path = Path(spec)
    if path.is_dir():
        return read_image_folder(path)
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".json"):
            return read_image_jsonl(path)
        return ImageSet([open_image(path)], ["?"], [str(path)])
    raise UserError(f"--data {spec}: not 'digits', an image folder (root/LABEL/*.png) or a JSONL of "
                    f'{{"image", "label"}} records')


def stratified_split(labels: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) indices: val_fraction of each label's images, chosen by `seed`, the same every time."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for label in sorted(set(labels), key=_label_key):
        members = [i for i, name in enumerate(labels) if name == label]
        generator = torch.Generator().manual_seed(epoch_seed(seed, 0, f"split/{label}"))
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        held = round(len(members) * val_fraction)
        val += order[:held]
        train += order[held:]
    return sorted(train), sorted(val)


class ImageBatches:
    """Infinite (pixels [B, C, H, W], labels [B]) batches over preprocessed images.

    Each epoch visits the images in an order shuffled by (seed, epoch), shared out over data-parallel ranks.
    shift > 0 moves each image by up to `shift` pixels in each direction (the border filled with `fill`, the
    normalised value of a black pixel), drawn from (seed, batch number): a resumed run draws the same shifts.
    state_dict()/load_state_dict() resume exactly where a run stopped."""

    def __init__(self, pixels: torch.Tensor, label_ids: list[int], batch_size: int, seed: int, shift: int = 0,
                 fill: torch.Tensor | None = None, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        if len(pixels) == 0:
            raise UserError("no images to train on")
        self.pixels, self.labels = pixels, torch.tensor(label_ids, dtype=torch.long)
        self.batch_size, self.seed, self.shift = batch_size, seed, shift
        self.fill = fill if fill is not None else torch.zeros(pixels.shape[1])
        self.order = EpochOrder(len(pixels), seed, rank, world_size, "images", salt="images")
        self.drawn = 0

    def __iter__(self) -> ImageBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.tensor(self.order.take(self.batch_size))
        x = self.pixels[chosen]
        if self.shift:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.drawn, "shift"))
            x = shifted(x, torch.randint(-self.shift, self.shift + 1, (len(x), 2), generator=generator), self.fill)
        self.drawn += 1
        return x, self.labels[chosen]

    @property
    def batches_per_epoch(self) -> float:
        return self.order.per_rank / self.batch_size

    def state_dict(self) -> dict[str, Any]:
        return {**self.order.state_dict(), "seed": self.seed, "num_examples": len(self.pixels), "drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, now in (("seed", self.seed), ("num_examples", len(self.pixels))):
            if state.get(key) != now:
                raise UserError(f"cannot resume the image loader: it was saved with {key}={state.get(key)}, "
                                f"now {key}={now}; resume with the same data and settings")
        self.order.load_state_dict(state)
        self.drawn = state.get("drawn", 0)


def shifted(x: torch.Tensor, offsets: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Each image x[i] moved by offsets[i] = (down, right) pixels, uncovered pixels set to `fill` per channel."""
    b, c, h, w = x.shape
    p = int(offsets.abs().max()) if len(offsets) else 0
    if p == 0:
        return x.clone()
    padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
    padded[:, :, p:p + h, p:p + w] = x
    out = torch.empty_like(x)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, p - dy:p - dy + h, p - dx:p - dx + w]
    return out


def eval_image_batches(pixels: torch.Tensor, label_ids: list[int], batch_size: int):
    """Every image once, in order: (pixels, labels) batches (the last may be smaller)."""
    labels = torch.tensor(label_ids, dtype=torch.long)
    for first in range(0, len(pixels), batch_size):
        yield pixels[first:first + batch_size], labels[first:first + batch_size]


def write_image_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 4) -> Path:
    """Images [N, C, H, W] in [-1, 1] as one PNG: `columns` per row, each enlarged `scale` times (nearest), a
    one-pixel gap between them; written atomically."""
    from PIL import Image

    from foundry.core.files import atomic_path

    n, c, h, w = images.shape
    rows = -(-n // columns)
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    hs, ws = h * scale, w * scale
    canvas = torch.full((c, rows * (hs + 1) + 1, columns * (ws + 1) + 1), 128, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, columns)
        canvas[:, 1 + r * (hs + 1):1 + r * (hs + 1) + hs, 1 + k * (ws + 1):1 + k * (ws + 1) + ws] = pixels[i]
    array = canvas.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if c == 1 else array, mode="L" if c == 1 else "RGB")
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path
