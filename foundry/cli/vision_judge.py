"""`foundry generate-image --judge VIT_DIR`: how good a class-conditional generator's samples are, measured
offline with a classifier trained on real images of the same classes.

- agreement: the share of samples the classifier labels as the class they were drawn for, beside the
  classifier's own accuracy on real held-out images (it cannot be trusted further than that);
- digits-FD: the Frechet distance between the classifier's features of the samples and of real images,
  beside the same distance between two disjoint sets of real images of the same size (the floor that
  sampling noise alone gives). It is named for what it is: not FID, which uses Inception-v3 features;
- nearest-neighbour distance: each sample's pixel distance to the nearest training image, beside that of
  real held-out images; samples much nearer than real images are copies."""

from __future__ import annotations


import torch

from foundry.core.errors import UserError


def _split_of(meta: dict, images) -> tuple[list[int], list[int]]:
    """The (train, held-out) split a foundry run made of these images (its foundry.json `meta`: seed, fraction)."""
    from foundry.data.images import stratified_split

    train_config = meta.get("train_config", {})
    return stratified_split(images.labels, train_config.get("val_fraction", 0.2), train_config.get("seed", 1337))


def judge_samples(judge_dir: str, samples: torch.Tensor, wanted: torch.Tensor, labels: list[str],
                  real_spec: str, generator_meta: dict | None = None) -> dict[str, float]:
    """Print and return agreement, digits-FD (and its real-vs-real floor) and nearest-neighbour distances."""
    from foundry.data.images import read_images
    from foundry.eval.images import frechet_distance, nearest_distances
    from foundry.hub.vision import load_vit
    from foundry.train.vision import processing_for

    judge = load_vit(judge_dir)
    model = judge.model.eval()
    if list(model.config.labels) != list(labels):
        raise UserError(f"--judge {judge_dir}: its classes ({', '.join(model.config.labels)}) are not the "
                        f"generator's ({', '.join(labels)}); judge with a classifier of the same classes")
    if samples.shape[1] != model.config.num_channels:
        raise UserError(f"--judge {judge_dir}: it reads {model.config.num_channels}-channel images, the samples "
                        f"have {samples.shape[1]}")
    real = read_images(real_spec)
    real_ids = torch.tensor(real.label_ids(labels))
    # The generator's samples are in [-1, 1]: mapped through the judge's own normalisation, as a PNG would be.
    scale = judge.processing
    mean = torch.tensor(scale.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(scale.image_std).view(1, -1, 1, 1)
    as_judge = ((samples.clamp(-1, 1) + 1) / 2 - mean) / std
    if as_judge.shape[-1] != scale.size:
        as_judge = torch.nn.functional.interpolate(as_judge, size=(scale.size, scale.size), mode="bilinear")
    real_pixels = real.pixels(scale)
    judge_train, judge_val = _split_of(judge.meta, real)
    with torch.no_grad():
        predicted = model(as_judge).argmax(-1)
        real_predicted = model(real_pixels[judge_val]).argmax(-1)
        sample_features = model.features(as_judge)
        real_features = model.features(real_pixels)
    agreement = float((predicted == wanted).float().mean())
    judge_accuracy = float((real_predicted == real_ids[judge_val]).float().mean())
    n = len(samples)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(real_pixels), generator=generator)
    if len(order) < 2 * n:
        raise UserError(f"digits-FD needs {2 * n} real images to set its floor; {real_spec} has {len(order)}: "
                        f"draw fewer samples (--num)")
    first, second = order[:n], order[n:2 * n]
    fd = frechet_distance(sample_features, real_features[second])
    floor = frechet_distance(real_features[first], real_features[second])
    figures = {"agreement": agreement, "judge_accuracy": judge_accuracy, "digits_fd": fd, "digits_fd_real": floor}
    # Pixel distances in the [-1, 1] range the generator works in.
    real_unit = real.pixels(processing_for(samples.shape[-1], samples.shape[1]))
    if generator_meta is not None:
        gen_train, gen_val = _split_of(generator_meta, real)
        sample_nn = nearest_distances(samples, real_unit[gen_train])
        real_nn = nearest_distances(real_unit[gen_val], real_unit[gen_train])
        figures.update({"nn_distance_samples": float(sample_nn.median()), "nn_distance_real": float(real_nn.median())})
    print(f"  agreement     {agreement:.1%} of {n} samples labelled as their requested class by {judge_dir} "
          f"(its accuracy on {len(judge_val)} real held-out images: {judge_accuracy:.1%})", flush=True)
    print(f"  digits-FD     {fd:.3f} (Frechet distance on the classifier's {sample_features.shape[1]} features; "
          f"two disjoint sets of {n} real images: {floor:.3f}); not FID", flush=True)
    if generator_meta is not None:
        print(f"  nearest       median pixel distance to the nearest training image: samples "
              f"{figures['nn_distance_samples']:.3f}, real held-out images {figures['nn_distance_real']:.3f} "
              f"(copies would be near 0)", flush=True)
    return figures
