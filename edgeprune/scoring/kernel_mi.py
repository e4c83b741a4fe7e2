"""Matrix-based Renyi entropy and mutual information (Giraldo, Rao & Principe 2015), batched.

For samples ``x`` (N, D) of one filter: ``K_ij = exp(-||x_i - x_j||^2 / sigma^2)``, ``A = K / tr K``,
``S_alpha(A) = 1/(1-alpha) log2 sum_i lambda_i^alpha`` (alpha -> 1: von Neumann entropy, one
eigendecomposition; alpha = 2: ``-log2 ||A||_F^2``, no eigendecomposition). Joint entropy
``S(A, B) = S(A o B / tr(A o B))`` and ``I = S(A) + S(B) - S(A, B)``. The label kernel is
``K^y_ij = 1[y_i = y_j]``. One sigma per layer, the one of a grid that maximizes the kernel
alignment with the label kernel, averaged over the layer's channels.

Everything is batched over channels, ``(C, N, N)``, in chunks that bound memory.
"""
from __future__ import annotations

from typing import Sequence

import torch

DEFAULT_SIGMA_FACTORS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
CHUNK_ELEMENTS = 1 << 25  # at most this many Gram entries (C_chunk * N * N) at once


# ----------------------------------------------------------------------------- kernels


def pairwise_sq_dists(x: torch.Tensor) -> torch.Tensor:
    """(C, N, D) -> (C, N, N) squared Euclidean distances."""
    sq = (x * x).sum(dim=2)  # (C, N)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * torch.bmm(x, x.transpose(1, 2))
    return d2.clamp_min_(0.0)


def gaussian_gram(d2: torch.Tensor, sigma: float) -> torch.Tensor:
    """(..., N, N) squared distances -> Gaussian kernel ``exp(-d2 / sigma^2)``."""
    return torch.exp(-d2 / (sigma * sigma))


def label_gram(labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N,) -> (N, N) with 1 where the labels agree."""
    return (labels[:, None] == labels[None, :]).to(dtype)


def kernel_alignment(k: torch.Tensor, ky: torch.Tensor) -> torch.Tensor:
    """(..., N, N), (N, N) -> (...) ``<K, Ky>_F / (||K||_F ||Ky||_F)``."""
    num = (k * ky).sum(dim=(-1, -2))
    return num / (k.flatten(-2).norm(dim=-1) * ky.norm()).clamp_min(1e-30)


# ----------------------------------------------------------------------------- entropies


def renyi_entropy_from_eigs(eigs: torch.Tensor, alpha: float) -> torch.Tensor:
    """(..., N) eigenvalues of a unit-trace PSD matrix -> (...) Renyi entropy in bits."""
    lam = eigs.clamp_min(0.0)
    lam = lam / lam.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    if alpha == 1.0:
        return -(lam * torch.log2(lam.clamp_min(1e-30))).sum(dim=-1)
    return torch.log2((lam ** alpha).sum(dim=-1).clamp_min(1e-30)) / (1.0 - alpha)


def matrix_entropy(a: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """(..., N, N) unit-trace PSD matrices -> (...) ``S_alpha`` in bits (alpha=2 without eigh)."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if alpha == 2.0:
        return -torch.log2((a * a).sum(dim=(-1, -2)).clamp_min(1e-30))
    return renyi_entropy_from_eigs(torch.linalg.eigvalsh(a), alpha)


def unit_trace(k: torch.Tensor) -> torch.Tensor:
    """(..., N, N) -> K / tr K."""
    tr = torch.diagonal(k, dim1=-2, dim2=-1).sum(dim=-1)
    return k / tr[..., None, None].clamp_min(1e-30)


def renyi_mi(ka: torch.Tensor, kb: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """(..., N, N) and (N, N) or (..., N, N) Gram matrices -> (...) I_alpha(A; B) in bits."""
    a, b = unit_trace(ka), unit_trace(kb)
    joint = unit_trace(a * b)
    return matrix_entropy(a, alpha) + matrix_entropy(b, alpha) - matrix_entropy(joint, alpha)


# ----------------------------------------------------------------------------- per-layer scores


def _chunks(c: int, n: int) -> list[slice]:
    size = max(1, CHUNK_ELEMENTS // max(1, n * n))
    return [slice(i, min(c, i + size)) for i in range(0, c, size)]


def layer_scale(x: torch.Tensor) -> float:
    """(C, N, D) -> sqrt of the mean squared pairwise distance over the layer, from moments."""
    msd = 2.0 * ((x * x).sum(dim=2).mean(dim=1) - (x.mean(dim=1) ** 2).sum(dim=1))  # (C,)
    return float(msd.mean().clamp_min(1e-12).sqrt())


def select_sigma(x: torch.Tensor, ky: torch.Tensor, factors: Sequence[float] = DEFAULT_SIGMA_FACTORS) -> float:
    """(C, N, D) samples -> the sigma of ``factors * layer_scale`` best aligned with ``ky``."""
    grid = [f * layer_scale(x) for f in factors]
    total = torch.zeros(len(grid), dtype=torch.float64)
    for sl in _chunks(x.shape[0], x.shape[1]):
        d2 = pairwise_sq_dists(x[sl])  # (c, N, N)
        for i, s in enumerate(grid):
            total[i] += kernel_alignment(gaussian_gram(d2, s), ky).double().sum()
    return grid[int(total.argmax())]


def kernel_mi_scores(x: torch.Tensor, labels: torch.Tensor, *, alpha: float = 1.0,
                     sigma: float | None = None,
                     sigma_factors: Sequence[float] = DEFAULT_SIGMA_FACTORS) -> tuple[torch.Tensor, float]:
    """(N, C, D) samples of C filters, (N,) labels -> ((C,) MI in bits, sigma used)."""
    xc = x.transpose(0, 1).float().contiguous()  # (C, N, D)
    ky = label_gram(labels.to(xc.device), xc.dtype)
    if sigma is None:
        sigma = select_sigma(xc, ky, sigma_factors)
    out = torch.empty(xc.shape[0], dtype=torch.float64)
    for sl in _chunks(xc.shape[0], xc.shape[1]):
        k = gaussian_gram(pairwise_sq_dists(xc[sl]), sigma)  # (c, N, N)
        out[sl] = renyi_mi(k, ky, alpha=alpha).double().cpu()
    return out.clamp_min(0.0), sigma
