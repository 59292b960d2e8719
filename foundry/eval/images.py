"""Figures for the vision models: simple pixel baselines a classifier must beat (nearest centroid, logistic
regression), the Frechet distance between two sets of features, and each image's distance to its nearest
training image (a generator that copies its training set scores near zero there)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_centroid(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                     num_classes: int) -> torch.Tensor:
    """The class whose mean training image is nearest (Euclidean, on the pixels) to each test image."""
    train_x, test_x = train_x.flatten(1).double(), test_x.flatten(1).double()
    centroids = torch.stack([train_x[train_y == k].mean(0) if (train_y == k).any()
                             else torch.full_like(train_x[0], float("inf")) for k in range(num_classes)])
    return torch.cdist(test_x, centroids).argmin(dim=1)


def logistic_regression(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int,
                        l2: float = 1e-3, iterations: int = 200) -> torch.Tensor:
    """Multinomial logistic regression on the standardised pixels (L-BFGS, full batch, an L2 penalty on the
    weights): the predicted class of each test image. Deterministic: no sampling anywhere."""
    x, test = train_x.flatten(1).double(), test_x.flatten(1).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, test = (x - mean) / std, (test - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (test @ weight + bias).argmax(dim=1)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between the Gaussians fitted to two feature sets
    [N, D] (Heusel et al. 2017's formula). Tr((S_a S_b)^(1/2)) is the sum of the square roots of the
    eigenvalues of S_a^(1/2) S_b S_a^(1/2), which is symmetric: computed in float64 by eigendecomposition."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * middle)


def nearest_distances(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each image's Euclidean distance (on the pixels) to the nearest image of `reference`: [N]."""
    return torch.cdist(images.flatten(1).double(), reference.flatten(1).double()).min(dim=1).values
