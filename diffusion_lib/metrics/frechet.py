"""The Fréchet distance of generated features to a fixed reference (FID, Heusel et al. 2017),
exact and fast, with a jackknife standard error over the generated samples.

    FID = ‖μ_r − μ_g‖² + tr Σ_r + tr Σ_g − 2 tr (Σ_r^½ Σ_g Σ_r^½)^½

is pytorch-fid's formula with tr (Σ_r Σ_g)^½ rewritten as the trace of the square root of a
symmetric PSD matrix (Σ_r Σ_g = Σ_r^½ (Σ_r^½ Σ_g) has the eigenvalues of (Σ_r^½ Σ_g) Σ_r^½), i.e.
the sum of the square roots of its eigenvalues: no general matrix square root, no complex
round-off. Σ_r^½ is computed once per reference; each FID is then one symmetric eigenvalue
problem, of size min(N, D) for N generated samples. Everything runs in float64, whatever the
features arrive as. The jackknife's G eigenvalue problems, a milestone's largest cost, run with
torch.linalg on a torch device (the GPU that sampled the images, where there is one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..jackknife import replicate_stderr


def _sqrt_of_eigenvalues(eigenvalues: np.ndarray) -> np.ndarray:
    """√λ of a PSD matrix's computed eigenvalues, those within round-off of 0 taken as exactly 0.

    A covariance of N < D samples has D − N + 1 zero eigenvalues, computed as ±ε‖Σ‖; their
    square roots, ~√(ε‖Σ‖) each, would add up to a spurious ≈ 1e-6 of the FID (pytorch-fid's
    sqrtm carries it). The threshold is numpy.linalg.matrix_rank's: λ_max · size · ε.
    """
    threshold = eigenvalues.max(initial=0.0) * eigenvalues.size * np.finfo(np.float64).eps
    return np.sqrt(np.where(eigenvalues > threshold, eigenvalues, 0.0))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a PSD matrix, by its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * _sqrt_of_eigenvalues(eigenvalues)) @ eigenvectors.T


def _check_features_shape(shape: tuple[int, ...], dims: int | None) -> None:
    if len(shape) != 2 or shape[0] < 2 or shape[1] != (dims or shape[1]):
        raise ValueError(f"expected features of shape (N ≥ 2, {dims or 'D'}), got {tuple(shape)}")


def _as_features(features: np.ndarray, dims: int | None = None) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    _check_features_shape(features.shape, dims)
    return features


@dataclass(frozen=True)
class FrechetReference:
    """A reference Gaussian (the real images' feature statistics) with Σ_r^½ precomputed."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    sqrt_sigma: np.ndarray  # Σ_r^½, symmetric
    num_images: int  # how many images the statistics came from; -1 when unknown

    @classmethod
    def from_stats(cls, mu: np.ndarray, sigma: np.ndarray, num_images: int = -1) -> FrechetReference:
        """From a mean and covariance (e.g. a pytorch-fid .npz); costs one D×D eigendecomposition."""
        mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        if sigma.shape != (mu.size, mu.size):
            raise ValueError(f"mu has {mu.size} entries but sigma has shape {sigma.shape}")
        return cls(mu, sigma, _sqrt_psd(sigma), num_images)

    @classmethod
    def from_features(cls, features: np.ndarray) -> FrechetReference:
        """From reference features (N, D): their mean and unbiased covariance, like pytorch-fid."""
        features = _as_features(features)
        return cls.from_stats(features.mean(axis=0), np.cov(features, rowvar=False), features.shape[0])

    def fid_from_stats(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """FID of a Gaussian N(mu, sigma) to the reference (Heusel et al. 2017)."""
        mu = np.asarray(mu, dtype=np.float64)
        sigma = np.asarray(sigma, dtype=np.float64)
        eigenvalues = np.linalg.eigvalsh(self.sqrt_sigma @ sigma @ self.sqrt_sigma)
        return self._fid(mu, np.trace(sigma), eigenvalues)

    def fid(self, features: np.ndarray) -> float:
        """FID of generated features (N, D) to the reference: equals `fid_from_stats` of their
        mean and unbiased covariance, without forming the covariance.

        With Y the centered rows x_iᵀ Σ_r^½, Σ_r^½ Σ_g Σ_r^½ = YᵀY/(N−1), whose nonzero
        eigenvalues are those of the N×N Gram matrix YYᵀ/(N−1): take whichever side is smaller.
        """
        features = _as_features(features, self.mu.size)
        n = features.shape[0]
        mu = features.mean(axis=0)
        trace_sigma = np.sum((features - mu) ** 2) / (n - 1)
        transformed = features @ self.sqrt_sigma
        y = transformed - transformed.mean(axis=0)
        gram = y @ y.T if n < y.shape[1] else y.T @ y
        return self._fid(mu, trace_sigma, np.linalg.eigvalsh(gram / (n - 1)))

    def _fid(self, mu: np.ndarray, trace_sigma: float, eigenvalues: np.ndarray) -> float:
        """‖μ_r − μ‖² + tr Σ_r + tr Σ − 2 Σ √λ_i, λ the eigenvalues of Σ_r^½ Σ Σ_r^½."""
        trace_sqrt = np.sum(_sqrt_of_eigenvalues(eigenvalues))
        return float(np.sum((self.mu - mu) ** 2) + np.trace(self.sigma) + trace_sigma - 2 * trace_sqrt)


@dataclass(frozen=True)
class Jackknife:
    """The delete-d jackknife of an FID over its generated samples (Shao & Wu 1989, Ann. Statist.
    17:1176): `replicates[g]` is the FID of the N samples without the g-th of G disjoint groups of
    d = N // G samples. Which samples form each group depends only on (N, G, seed), so two runs
    that draw their samples from the same seeded noise delete the same samples in each group:
    their replicates are paired, and the jackknife of the difference of their FIDs is the
    difference of their replicates (`jackknife.paired_stderr`)."""

    replicates: np.ndarray  # (G,) float64
    num_samples: int  # N

    @property
    def group_size(self) -> int:
        return self.num_samples // len(self.replicates)

    @property
    def stderr(self) -> float:
        return replicate_stderr(self.replicates, self.num_samples)


def fid_jackknife(
    reference: FrechetReference,
    features: np.ndarray | torch.Tensor,
    num_groups: int = 25,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Jackknife:
    """The delete-d jackknife of `reference.fid(features)`, the reference held fixed: G =
    `num_groups` disjoint random groups of d = N // G samples (the N mod G samples outside every
    group stay in every replicate).

    All replicates have the same size N − d because the FID's bias (≈ c/N, large when N < D)
    would otherwise add spread of its own. Why a jackknife: resampling with replacement
    (bootstrap) duplicates samples, which shrinks the covariance's rank and shifts the FID
    itself; the delta method needs the derivative of tr (·)^½, which does not exist at the
    rank-deficient Σ_g of N < D samples. More groups make the standard error steadier from
    sample to sample at the cost of one FID of N − d samples per group (README: calibration).

    Computed in float64 with torch.linalg on `device` (default: the features' own when they are
    a tensor, else the CPU), the same code on a CPU and a GPU. The N×N Gram (or D×D scatter)
    matrix of all N samples is formed once and each replicate's derived from it, so a replicate
    costs one eigenvalue problem; its eigenvalues come back to the host, where
    `FrechetReference._fid` turns them into the FID with the same round-off rule as `fid`.
    """
    if device is None:
        device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
    x = torch.as_tensor(features).to(device=device, dtype=torch.float64)
    _check_features_shape(x.shape, reference.mu.size)
    n, dims = x.shape
    if not 2 <= num_groups <= n - 2:
        raise ValueError(f"num_groups must be in [2, N − 2] = [2, {n - 2}], got {num_groups}")
    d = n // num_groups
    m = n - d  # samples in each replicate
    order = np.random.default_rng(seed).permutation(n)
    deleted = order[: d * num_groups].reshape(num_groups, d)
    keep = np.ones((num_groups, n), dtype=bool)
    keep[np.arange(num_groups)[:, None], deleted] = False
    kept_rows = torch.from_numpy(np.nonzero(keep)[1].reshape(num_groups, m)).to(device)
    deleted_rows = torch.from_numpy(deleted).to(device)

    # Rows y_iᵀ = x_iᵀ Σ_r^½, centered on all N samples: a replicate's own mean is then a small
    # fraction of the spread, so re-centering below loses no precision to cancellation.
    y = x @ torch.as_tensor(reference.sqrt_sigma, dtype=torch.float64, device=device)
    y = y - y.mean(dim=0)
    rows_side = m < dims  # the smaller of the two eigenvalue problems, as `FrechetReference.fid` picks
    product = y @ y.T if rows_side else y.T @ y
    means, traces, eigenvalues = [], [], []
    for kept, group in zip(kept_rows, deleted_rows):
        x_kept = x.index_select(0, kept)
        mu = x_kept.mean(dim=0)
        means.append(mu)
        traces.append(torch.sum((x_kept - mu) ** 2) / (m - 1))
        if rows_side:  # C K C with C = I − 11ᵀ/m the centering matrix: the Gram of the re-centered rows
            gram = product.index_select(0, kept).index_select(1, kept)
            row_means = gram.mean(dim=1)
            gram = gram - row_means[:, None] - row_means[None, :] + row_means.mean()
        else:  # Σ_kept (y − ȳ)(y − ȳ)ᵀ = Σ_all yyᵀ − Σ_group yyᵀ − m ȳȳᵀ
            y_mean = y.index_select(0, kept).mean(dim=0)
            y_group = y.index_select(0, group)
            gram = product - y_group.T @ y_group - m * torch.outer(y_mean, y_mean)
        eigenvalues.append(torch.linalg.eigvalsh(gram / (m - 1)))
    host = [torch.stack(values).cpu().numpy() for values in (means, traces, eigenvalues)]
    replicates = [reference._fid(mu, trace, values) for mu, trace, values in zip(*host)]
    return Jackknife(np.asarray(replicates), n)
