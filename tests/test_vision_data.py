"""Image data for the vision models: folders, JSONL records and the digits, decoded as transformers'
ViTImageProcessor decodes them; the stratified split; resumable, shifted batches; the pixel baselines and the
Frechet distance against scikit-learn's and scipy's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from foundry.config.vision_config import ImageProcessing
from foundry.core.errors import UserError
from foundry.data.images import (ImageBatches, digits, preprocess, read_image_folder, read_image_jsonl, read_images,
                                 shifted, stratified_split, write_image_grid)
from foundry.eval.images import frechet_distance, logistic_regression, nearest_centroid, nearest_distances


def _write(path, size=(10, 7), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    for label, count in (("cat", 3), ("dog", 2), ("10", 1), ("2", 1)):
        (tmp_path / label).mkdir()
        for i in range(count):
            _write(tmp_path / label / f"{i}.png", seed=hash((label, i)) % 1000)
    return tmp_path


def test_an_image_folder_has_one_label_per_folder(folder):
    images = read_image_folder(folder)
    assert images.label_set == ["2", "10", "cat", "dog"]  # numbers as numbers, then names
    assert sorted(images.labels) == sorted(["cat"] * 3 + ["dog"] * 2 + ["10", "2"])
    assert images.label_ids() == [images.label_set.index(label) for label in images.labels]


def test_preprocessing_equals_vit_image_processor(folder):
    from transformers import ViTImageProcessor

    for channels, size in ((3, 8), (3, 7), (1, 8)):
        processing = ImageProcessing(size=size, num_channels=channels, image_mean=[0.2, 0.5, 0.7][:channels],
                                     image_std=[0.3, 0.25, 0.5][:channels])
        reference = ViTImageProcessor(**processing.to_hf_dict())
        for path in sorted(folder.rglob("*.png"))[:3]:
            image = Image.open(path).convert("RGB" if channels == 3 else "L")
            want = reference(images=image, return_tensors="pt")
            got = preprocess(image, processing)
            assert got.shape == want["pixel_values"][0].shape
            assert torch.allclose(got, want["pixel_values"][0], atol=1e-5), (channels, size)


def test_jsonl_records_and_their_errors(tmp_path):
    _write(tmp_path / "a.png")
    _write(tmp_path / "b.png", mode="L")
    (tmp_path / "data.jsonl").write_text('{"image": "a.png", "label": "x"}\n\n{"image": "b.png", "label": 3}\n')
    images = read_image_jsonl(tmp_path / "data.jsonl")
    assert images.labels == ["x", "3"] and images.label_set == ["3", "x"]
    bad = {'{"image": "a.png"}': "each line must be", '{"image": "nope.png", "label": "x"}': "no such image file",
           "{oops": "not valid JSON"}
    for line, message in bad.items():
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(UserError, match=message):
            read_image_jsonl(tmp_path / "bad.jsonl")


def test_bad_image_data_is_one_clear_error(folder, tmp_path):
    (folder / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken.png: cannot be decoded as an image"):
        read_image_folder(folder)
    loose = tmp_path / "loose"
    loose.mkdir()
    _write(loose / "x.png")
    with pytest.raises(UserError, match="outside a label folder"):
        read_image_folder(loose)
    (folder / "cat" / "broken.png").unlink()
    with pytest.raises(UserError, match="not among the model's classes"):
        read_images(folder).label_ids(["cat", "dog"])
    with pytest.raises(UserError, match="not 'digits', an image folder"):
        read_images(tmp_path / "missing")


def test_digits_are_scikit_learns():
    from sklearn.datasets import load_digits

    images = digits()
    reference = load_digits()
    assert len(images) == 1797 and images.label_set == [str(i) for i in range(10)]
    assert images.labels == [str(t) for t in reference.target]
    pixels = images.pixels(ImageProcessing(size=8, num_channels=1, image_mean=[0.0], image_std=[1.0]))
    # 0..16 stored as 8-bit grey (x 255/16, rounded): back to 0..16 within the rounding.
    assert np.abs(pixels[:, 0].numpy() * 16 - reference.images).max() <= 16 / 255 / 2 + 1e-6


def test_the_split_is_stratified_and_fixed_by_the_seed():
    labels = [str(i % 3) for i in range(30)] + ["3"] * 5
    train, val = stratified_split(labels, 0.2, seed=7)
    assert sorted(train + val) == list(range(35)) and not set(train) & set(val)
    assert sorted(labels[i] for i in val) == ["0", "0", "1", "1", "2", "2", "3"]
    assert stratified_split(labels, 0.2, seed=7) == (train, val)
    assert stratified_split(labels, 0.2, seed=8) != (train, val)


def test_batches_resume_where_they_stopped_and_shift_as_drawn():
    pixels, ids = torch.randn(13, 1, 4, 4), list(range(13))
    fill = torch.tensor([-1.0])
    run = ImageBatches(pixels, ids, 5, seed=3, shift=1, fill=fill)
    first = [next(run) for _ in range(4)]
    again = ImageBatches(pixels, ids, 5, seed=3, shift=1, fill=fill)
    next(again)
    state = again.state_dict()
    resumed = ImageBatches(pixels, ids, 5, seed=3, shift=1, fill=fill)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(first[1:], [next(resumed) for _ in range(3)]):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    plain = ImageBatches(pixels, ids, 13, seed=3)
    x, y = next(plain)
    assert sorted(y.tolist()) == ids and torch.equal(x, pixels[y])  # one epoch: every image once


def test_a_shift_moves_the_image_and_fills_the_border():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    moved = shifted(x, torch.tensor([[1, -1]]), torch.tensor([-5.0]))
    assert moved[0, 0, 0].tolist() == [-5.0] * 4  # the top row came from outside
    assert moved[0, 0, 1, :3].tolist() == x[0, 0, 0, 1:].tolist() and moved[0, 0, 1, 3] == -5


def test_a_grid_png_holds_every_image(tmp_path):
    images = torch.linspace(-1, 1, 6 * 4).view(6, 1, 2, 2)
    path = write_image_grid(images, tmp_path / "grid.png", columns=3, scale=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    assert grid[1, 1] == 0 and grid[-2, -2] == 255  # the first image's dark corner, the last's bright one


@pytest.mark.filterwarnings("ignore:self.within_class_std_dev_:UserWarning")  # sklearn: a pixel always 0 in a class
def test_pixel_baselines_are_the_references():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import NearestCentroid

    images = digits()
    pixels = images.pixels(ImageProcessing(size=8, num_channels=1, image_mean=[0.5], image_std=[0.5]))
    y = torch.tensor(images.label_ids())
    train, val = stratified_split(images.labels, 0.2, seed=0)
    x_train, x_val = pixels[train].flatten(1).numpy(), pixels[val].flatten(1).numpy()
    ours = nearest_centroid(pixels[train], y[train], pixels[val], 10)
    theirs = NearestCentroid().fit(x_train, y[train].numpy()).predict(x_val)
    assert ours.tolist() == theirs.tolist()
    ours = (logistic_regression(pixels[train], y[train], pixels[val], 10) == y[val]).float().mean().item()
    mean, std = x_train.mean(0), x_train.std(0, ddof=1).clip(1e-6)
    reference = LogisticRegression(max_iter=2000).fit((x_train - mean) / std, y[train].numpy())
    theirs = (reference.predict((x_val - mean) / std) == y[val].numpy()).mean()
    assert abs(ours - theirs) < 0.02, (ours, theirs)  # other penalties and solvers: within 2 points


def test_frechet_distance_equals_the_scipy_formula():
    from scipy import linalg

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(150, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator, dtype=torch.float64) + 0.5
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    want = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_nearest_distances():
    reference = torch.tensor([[0.0, 0.0], [3.0, 4.0]]).view(2, 1, 1, 2)
    images = torch.tensor([[3.0, 4.0], [0.0, 1.0]]).view(2, 1, 1, 2)
    assert nearest_distances(images, reference).tolist() == [0.0, 1.0]


def test_jsonl_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "a.png")
    record = {"image": "sub/a.png", "label": "x"}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    assert read_images(tmp_path / "d.jsonl").sources == [str(tmp_path / "sub" / "a.png")]
