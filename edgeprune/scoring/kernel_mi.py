"""Matrix-based Renyi entropy and mutual information (Giraldo, Rao & Principe 2015), batched.

For samples ``x`` (N, D) of one filter: ``K_ij = exp(-||x_i - x_j||^2 / sigma^2)``, ``A = K / tr K``,
``S_alpha(A) = 1/(1-alpha) log2 sum_i lambda_i^alpha`` (alpha -> 1: von Neumann entropy, one
eigendecomposition; alpha = 2: ``-log2 ||A||_F^2``, no eigendecomposition). Joint entropy
``S(A, B) = S(A o B / tr(A o B))`` and ``I = S(A) + S(B) - S(A, B)``. The label kernel is
``K^y_ij = 1[y_i = y_j]``. One sigma per layer, the one of a grid that maximizes the kernel
alignment with the label kernel, averaged over the layer's channels.

Everything is batched over channels, ``(C, N, N)``, in chunks that bound memory.

:class:`BatchedKernelMI` is the HRel baseline: the MI per mini-batch of ``DEFAULT_MI_BATCH`` images,
averaged over mini-batches (linear in N), with exact shortcuts that change no value: one distance
matrix per mini-batch for both the sigma search and the Gram, S(labels) = the label entropy, and the
joint matrix's eigenvalues from its per-class diagonal blocks.
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


# ----------------------------------------------------------------------------- HRel: mini-batches, exact shortcuts

DEFAULT_MI_BATCH = 100


def label_entropy(labels: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """S_alpha of the unit-trace label kernel ``1[y_i = y_j] / N``: its nonzero eigenvalues are the class
    proportions, so it is the Renyi entropy of the label distribution (H(Y) for alpha = 1), exactly."""
    p = torch.bincount(labels.long()).double()
    p = p[p > 0] / p.sum()
    return renyi_entropy_from_eigs(p, alpha)


def joint_entropy_by_class(k: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """(C, N, N) Gram matrices with unit diagonal, (N,) labels -> (C,) S_alpha(A o B / tr(A o B)).

    With the label kernel ``1[y_i = y_j]``, ``A o B`` is block-diagonal by class (rows and columns
    grouped by label), so its eigenvalues are those of the K diagonal blocks ``K[y=k][:, y=k]``:
    K eigendecompositions of n_k x n_k instead of one of N x N. The normalization is by the trace of
    the whole joint matrix (``sum_k tr K_kk``).
    """
    eigs = []
    for cls in torch.unique(labels):
        idx = (labels == cls).nonzero().flatten().to(k.device)
        eigs.append(torch.linalg.eigvalsh(k[:, idx][:, :, idx]))  # (C, n_k)
    lam = torch.cat(eigs, dim=1)  # (C, N) all eigenvalues of the block-diagonal matrix
    return renyi_entropy_from_eigs(lam, alpha)  # normalizes by the sum = the trace


def _alignment_with_labels(d2: torch.Tensor, same: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """(C, n, n) distances, (n, n) label kernel -> (len(grid),) summed alignment over the channels."""
    ky_norm = same.norm()
    out = torch.empty(len(grid), dtype=torch.float64)
    for i, s in enumerate(grid):
        k = gaussian_gram(d2, s)
        num = (k * same).sum(dim=(-1, -2))
        out[i] = (num / (k.flatten(-2).norm(dim=-1) * ky_norm).clamp_min(1e-30)).double().sum()
    return out


def batch_kernel_mi(x: torch.Tensor, labels: torch.Tensor, *, alpha: float = 1.0,
                    sigma_factors: Sequence[float] = DEFAULT_SIGMA_FACTORS,
                    sigma: float | None = None) -> tuple[torch.Tensor, float]:
    """(C, n, D) samples of C filters, (n,) labels -> ((C,) I_alpha in bits, sigma) for one mini-batch.

    The same value as :func:`kernel_mi_scores` on these samples, computed with the exact shortcuts:
    one distance matrix per channel serves the sigma search (alignment over the grid) and the Gram;
    S(labels) is the label entropy; the joint entropy comes from the per-class blocks.
    """
    labels = labels.to(x.device)
    d2 = pairwise_sq_dists(x)  # (C, n, n), computed once
    same = label_gram(labels, x.dtype)
    if sigma is None:
        grid = [f * layer_scale(x) for f in sigma_factors]
        sigma = grid[int(_alignment_with_labels(d2, same, grid).argmax())]
    k = gaussian_gram(d2, sigma)  # (C, n, n), unit diagonal
    if alpha == 2.0:
        s_a = matrix_entropy(unit_trace(k), 2.0)
        s_joint = matrix_entropy(unit_trace(k * same), 2.0)
    else:
        s_a = renyi_entropy_from_eigs(torch.linalg.eigvalsh(k), alpha)
        s_joint = joint_entropy_by_class(k, labels, alpha)
    mi = s_a.double() + label_entropy(labels.cpu(), alpha).to(s_a.device) - s_joint.double()
    return mi.cpu().clamp_min(0.0), sigma


class BatchedKernelMI:
    """Streaming HRel estimator: per layer, samples are buffered into mini-batches of ``batch_size``
    images; each mini-batch gives (C,) MI values; ``finish`` scores the last, smaller mini-batch
    (dropped if it holds a single image: one sample carries no MI) and averages over the mini-batches,
    weighted by their size."""

    def __init__(self, *, batch_size: int = DEFAULT_MI_BATCH, alpha: float = 1.0,
                 sigma_factors: Sequence[float] = DEFAULT_SIGMA_FACTORS):
        self.batch_size, self.alpha, self.sigma_factors = batch_size, alpha, tuple(sigma_factors)
        self._buf: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._weight: dict[str, int] = {}
        self.sigmas: dict[str, list[float]] = {}
        self.batches = 0

    def add(self, name: str, x: torch.Tensor, labels: torch.Tensor) -> None:
        """(B, C, D) samples and (B,) labels of layer ``name``, in calibration order."""
        xs, ys = self._buf.setdefault(name, ([], []))
        xs.append(x)
        ys.append(labels)
        while sum(len(t) for t in ys) >= self.batch_size:
            bx, by = torch.cat(xs), torch.cat(ys)
            xs[:], ys[:] = [bx[self.batch_size:]], [by[self.batch_size:]]
            self._score(name, bx[: self.batch_size], by[: self.batch_size])

    def _score(self, name: str, x: torch.Tensor, y: torch.Tensor) -> None:
        xc = x.transpose(0, 1).float().contiguous()  # (C, n, D)
        mi, sigma = batch_kernel_mi(xc, y, alpha=self.alpha, sigma_factors=self.sigma_factors)
        n = len(y)
        self._sum[name] = mi * n if name not in self._sum else self._sum[name] + mi * n
        self._weight[name] = self._weight.get(name, 0) + n
        self.sigmas.setdefault(name, []).append(sigma)
        self.batches = max(self.batches, len(self.sigmas[name]))

    def finish(self) -> dict[str, torch.Tensor]:
        for name, (xs, ys) in self._buf.items():
            rest = sum(len(t) for t in ys)
            if rest >= 2 or (rest and name not in self._sum):
                self._score(name, torch.cat(xs), torch.cat(ys))
        self._buf.clear()
        return {name: (s / self._weight[name]).float() for name, s in self._sum.items()}
