"""Numerical kernels for low-rank compression: truncated SVD, Tucker-2, CP-ALS and EVBMF rank selection.

All functions are plain functions on torch tensors. They detach their inputs, run without autograd and
compute in float32 (float64 when the input is float64) on the input's device; the caller casts back.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["compute_dtype", "truncated_svd", "svd_of_product", "singular_values", "unfold", "tucker2",
           "cp_als", "cp_to_tensor", "evbmf_rank"]


def compute_dtype(t: Tensor) -> torch.dtype:
    """Working precision for `t`: float64 stays float64, everything else (half, bfloat16, ints) is float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _prep(t: Tensor) -> Tensor:
    """`t` detached and cast to its compute dtype (no copy when already there), on its own device."""
    return t.detach().to(dtype=compute_dtype(t))


def _check_rank(rank: int, name: str = "rank") -> int:
    if int(rank) != rank or rank < 1:
        raise ValueError(f"{name} must be a positive integer, got {rank!r}")
    return int(rank)


def _check_matrix(m: Tensor, name: str) -> None:
    if m.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(m.shape)}")


def _split(u: Tensor, s: Tensor, vh: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Balanced factors U sqrt(S), sqrt(S) V^T of the leading `rank` triplets."""
    r = min(rank, s.shape[0])
    sq = s[:r].sqrt()
    return u[:, :r] * sq, sq[:, None] * vh[:r]


def _gram_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors of ``matrix @ matrix.T`` computed in float64.

    For the wide matrices of layer weights this is 5-15x faster than an SVD, and float64 keeps the leading
    singular subspace and the spectrum accurate far below float32 round-off.
    """
    m = matrix.detach().to(torch.float64)
    values, vectors = torch.linalg.eigh(m @ m.T)
    return values.flip(0).clamp_min(0), vectors.flip(1)


@torch.no_grad()
def singular_values(matrix: Tensor) -> Tensor:
    """All min(m, n) singular values, descending, from the smaller Gram matrix (see ``_gram_eigh``)."""
    _check_matrix(matrix, "matrix")
    smaller = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    m = smaller.detach().to(torch.float64)
    return torch.linalg.eigvalsh(m @ m.T).flip(0).clamp_min(0).sqrt().to(compute_dtype(matrix))


@torch.no_grad()
def truncated_svd(matrix: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` approximation matrix ~= left @ right (Eckart-Young), split as U sqrt(S) and sqrt(S) V^T.

    rank is clamped to min(m, n); left is (m x r), right is (r x n). The leading singular subspace comes from
    the Gram matrix of the smaller side, and the other factor is the projection of the matrix onto it, so the
    product is the optimal truncation even where trailing singular values are tiny.
    """
    rank = _check_rank(rank)
    _check_matrix(matrix, "matrix")
    m = _prep(matrix)
    if m.shape[0] > m.shape[1]:
        right, left = truncated_svd(m.T, rank)
        return left.T, right.T
    values, vectors = _gram_eigh(m)
    r = min(rank, m.shape[0])
    basis = vectors[:, :r]
    projection = basis.T @ m.to(torch.float64)  # r x n, row i has norm s_i
    scale = values[:r].sqrt().sqrt()  # sqrt(s_i)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (basis * safe).to(m.dtype), (projection / safe[:, None]).to(m.dtype)


def _product_core(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """left @ right == q_l @ core @ q_r^T with orthonormal q_l, q_r and a small core (QR of both sides)."""
    _check_matrix(left, "left")
    _check_matrix(right, "right")
    if left.shape[1] != right.shape[0]:
        raise ValueError(f"inner dimensions differ: {tuple(left.shape)} @ {tuple(right.shape)}")
    dtype = torch.promote_types(compute_dtype(left), compute_dtype(right))
    q_l, r_l = torch.linalg.qr(left.detach().to(dtype))
    q_r, r_r = torch.linalg.qr(right.detach().to(dtype).T)
    return q_l, r_l @ r_r.T, q_r


@torch.no_grad()
def svd_of_product(left: Tensor, right: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Optimal rank-`rank` truncation of left @ right (m x k @ k x n) without forming the m x n product.

    Uses QR of left and right^T and an SVD of the small core; returns (m x r, r x n) split as sqrt(S) on both sides.
    """
    rank = _check_rank(rank)
    q_l, core, q_r = _product_core(left, right)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    new_left, new_right = _split(u, s, vh, rank)
    return q_l @ new_left, new_right @ q_r.T


def unfold(tensor: Tensor, mode: int) -> Tensor:
    """Mode-`mode` unfolding: `mode` moved to the front, the rest flattened in C order (tensorly's convention)."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def _leading_left(matrix: Tensor, rank: int) -> Tensor:
    """`rank` leading left singular vectors (an orthonormal basis of R^rows when rank equals the row count).

    They are the leading eigenvectors of the rows x rows Gram matrix, which is never larger than the SVD's
    work and much faster for the wide unfoldings of conv weights.
    """
    return _gram_eigh(matrix)[1][:, :rank].to(matrix.dtype)


@torch.no_grad()
def tucker2(weight: Tensor, ranks: tuple[int, int], n_iter: int = 10,
            tol: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker decomposition of a conv weight (cout, cin, *kernel) on its two channel modes only.

    Returns (core (r_out, r_in, *kernel), u_out (cout x r_out), u_in (cin x r_in)) with orthonormal factors, so that
    weight ~= einsum('oc...,Oo,Cc->OC...', core, u_out, u_in). HOSVD initialisation, then up to `n_iter` HOOI
    sweeps (n_iter=0 is plain HOSVD), stopping once the fit changes by less than `tol` (relative).
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (cout, cin, *kernel), got {tuple(weight.shape)}")
    if len(ranks) != 2:
        raise ValueError(f"ranks must be a pair (r_out, r_in), got {ranks!r}")
    if n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    w = _prep(weight)
    r_out = min(_check_rank(ranks[0], "r_out"), w.shape[0])
    r_in = min(_check_rank(ranks[1], "r_in"), w.shape[1])

    u_out = _leading_left(unfold(w, 0), r_out)
    u_in = _leading_left(unfold(w, 1), r_in)
    core = torch.einsum("OC...,Oo,Cc->oc...", w, u_out, u_in)
    norm2 = w.square().sum()
    tiny = torch.finfo(w.dtype).tiny

    def fit_of(c: Tensor) -> float:
        # ||W - recon||^2 = ||W||^2 - ||core||^2 for orthonormal factors.
        resid = (norm2 - c.square().sum()).clamp_min(0).sqrt() / norm2.sqrt().clamp_min(tiny)
        return 1.0 - float(resid)

    fit = fit_of(core)
    for _ in range(n_iter):
        u_out = _leading_left(unfold(torch.einsum("OC...,Cc->Oc...", w, u_in), 0), r_out)
        u_in = _leading_left(unfold(torch.einsum("OC...,Oo->oC...", w, u_out), 1), r_in)
        core = torch.einsum("OC...,Oo,Cc->oc...", w, u_out, u_in)
        new_fit = fit_of(core)
        converged = abs(new_fit - fit) <= tol * max(abs(fit), tiny)
        fit = new_fit
        if converged:
            break
    return core, u_out, u_in


def _mttkrp(tensor_perm: Tensor, order: list[int], factors: list[Tensor]) -> Tensor:
    """Matricised tensor times Khatri-Rao product for mode order[0] without building the Khatri-Rao product.

    `tensor_perm` is the tensor permuted to `order` (mode first, the other modes by ascending size), so the first
    contraction removes the largest mode and the intermediates stay at most prod(shape) / max_dim x rank.
    """
    rank = factors[0].shape[1]
    others = [factors[i] for i in order[1:]]
    out = tensor_perm.reshape(-1, others[-1].shape[0]) @ others[-1]
    for f in reversed(others[:-1]):
        out = torch.einsum("xir,ir->xr", out.reshape(-1, f.shape[0], rank), f)
    return out.reshape(tensor_perm.shape[0], rank)


def _gram_product(factors: list[Tensor], skip: int | None = None) -> Tensor:
    """Hadamard product of the factors' Gram matrices F^T F, leaving out factor `skip`."""
    rank = factors[0].shape[1]
    g = torch.ones(rank, rank, dtype=factors[0].dtype, device=factors[0].device)
    for i, f in enumerate(factors):
        if i != skip:
            g = g * (f.T @ f)
    return g


def _solve_normal(gram: Tensor, rhs: Tensor, eye: Tensor) -> Tensor:
    """Solves gram @ x = rhs for a symmetric PSD rank x rank gram: Cholesky with a tiny ridge, pseudo-inverse if
    that still fails (rank-deficient systems, e.g. rank larger than the other modes can support)."""
    finfo = torch.finfo(gram.dtype)
    ridge = 10 * finfo.eps * gram.diagonal().mean().clamp_min(finfo.tiny)
    chol, info = torch.linalg.cholesky_ex(gram + ridge * eye)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.pinv(gram, hermitian=True) @ rhs


@torch.no_grad()
def cp_als(tensor: Tensor, rank: int, n_iter_max: int = 100, tol: float = 1e-5,
           seed: int = 0) -> tuple[list[Tensor], float]:
    """CP (PARAFAC) decomposition by alternating least squares; returns (factors, relative_error).

    factors[i] is (tensor.shape[i], rank) with the CP weights folded into factors[0], so
    tensor ~= sum_r outer(factors[0][:, r], factors[1][:, r], ...). SVD initialisation (seeded random columns where
    rank exceeds a mode's dimension), normal equations on the rank x rank Hadamard-of-Grams system, stop when the
    relative change of the error is below `tol` or after `n_iter_max` sweeps. The returned error is exact.
    """
    rank = _check_rank(rank)
    if tensor.dim() < 2:
        raise ValueError(f"tensor must have at least 2 dims, got {tuple(tensor.shape)}")
    if n_iter_max < 0:
        raise ValueError(f"n_iter_max must be >= 0, got {n_iter_max}")
    t = _prep(tensor)
    dtype, device, ndim = t.dtype, t.device, t.dim()
    norm_t2 = t.square().sum()
    if float(norm_t2) == 0.0:
        return [t.new_zeros(n, rank) for n in t.shape], 0.0
    tiny = torch.finfo(dtype).tiny

    gen = torch.Generator(device=device).manual_seed(seed)
    factors = []
    for mode in range(ndim):
        u = _leading_left(unfold(t, mode), min(rank, t.shape[mode]))
        if u.shape[1] < rank:
            extra = torch.randn(t.shape[mode], rank - u.shape[1], generator=gen, dtype=dtype, device=device)
            u = torch.cat([u, extra / extra.norm(dim=0).clamp_min(tiny)], dim=1)
        factors.append(u)
    weights = torch.ones(rank, dtype=dtype, device=device)

    orders = [[m] + sorted((i for i in range(ndim) if i != m), key=lambda i: t.shape[i]) for m in range(ndim)]
    permuted = [t.permute(o).contiguous() for o in orders]
    eye = torch.eye(rank, dtype=dtype, device=device)

    err_prev = None
    for it in range(n_iter_max):
        for mode in range(ndim):
            gram = _gram_product(factors, skip=mode)
            mttkrp = _mttkrp(permuted[mode], orders[mode], factors)
            f = _solve_normal(gram, mttkrp.T, eye).T
            weights = f.norm(dim=0)
            factors[mode] = f / weights.clamp_min(tiny)
        # Error via the Gram trick: ||T||^2 - 2 <T, R> + ||R||^2, with f the last unnormalised factor.
        inner = (mttkrp * f).sum()
        rec2 = (gram * (f.T @ f)).sum()
        err = float((norm_t2 - 2 * inner + rec2).clamp_min(0).sqrt() / norm_t2.sqrt())
        if err_prev is not None and abs(err_prev - err) / max(err_prev, tiny) < tol:
            logger.debug("cp_als converged after %d iterations (error %.3g)", it + 1, err)
            break
        err_prev = err

    factors[0] = factors[0] * weights
    rel_error = float((t - cp_to_tensor(factors)).norm() / norm_t2.sqrt())
    return factors, rel_error


@torch.no_grad()
def cp_to_tensor(factors: list[Tensor]) -> Tensor:
    """Full tensor from CP factors (weights folded into factors[0]): factors[0] @ khatri_rao(factors[1:])^T."""
    fs = [_prep(f) for f in factors]
    rank = fs[0].shape[1]
    if len(fs) == 1:
        return fs[0].sum(dim=1)
    kr = fs[1]
    for f in fs[2:]:
        kr = (kr[:, None, :] * f[None, :, :]).reshape(-1, rank)
    return (fs[0] @ kr.T).reshape([f.shape[0] for f in fs])


def _evb_objective(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """EVBMF free energy as a function of the noise variance (objEVB / EVBsigma2 of the reference code)."""
    H = len(s)
    alpha = L / M
    x = s**2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = 0.5 * (z1 - (1 + alpha) + np.sqrt((z1 - (1 + alpha)) ** 2 - 4 * alpha))
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (M * sigma2) + (L - H) * np.log(sigma2))


def evbmf_rank(singular_values: Tensor, shape: tuple[int, int]) -> int:
    """Rank chosen by the global analytic EVBMF solution with unknown noise variance (Nakajima et al., JMLR 2013).

    `singular_values` are those of an L x M matrix of shape `shape` (either orientation). Follows the reference
    EVBMF code: sigma2 minimises the EVB objective on [lower, upper] (bounded Brent, rescaled by 1/lower as in
    Nakajima's MATLAB code), and the rank is the count of singular values above
    sqrt(M sigma2 (1 + tauubar)(1 + alpha / tauubar)). Residual energy is taken as zero (full spectrum given);
    values below s_max * M * eps(dtype) are treated as round-off and lifted to that floor.
    """
    L, M = sorted(int(d) for d in shape)
    if L < 1:
        raise ValueError(f"shape must have positive dimensions, got {shape!r}")
    s = np.sort(np.abs(singular_values.detach().to("cpu", torch.float64).reshape(-1).numpy()))[::-1]
    if s.size > L:
        raise ValueError(f"got {s.size} singular values for a matrix of shape {tuple(shape)} (at most {L})")
    if s.size == 0 or not np.isfinite(s).all() or s[0] == 0.0:
        return 0
    # Values under the round-off floor of an SVD (matrix_rank's tolerance) carry no information: lift them to that
    # floor, which keeps log() finite and makes an exactly low-rank matrix come out at its exact rank.
    eps = torch.finfo(singular_values.dtype).eps if singular_values.is_floating_point() else np.finfo(float).eps
    s = np.maximum(s, s[0] * M * eps)
    H = s.size
    residual = 0.0
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eH_ub = min(math.ceil(L / (1 + alpha)) - 1, H) - 1
    k = min(eH_ub + 1, H - 1)
    upper = (np.sum(s**2) + residual) / (L * M)
    lower = max(s[k] ** 2 / (M * xubar), np.mean(s[k:] ** 2) / M)
    if lower >= upper:
        sigma2 = upper
    else:
        scale = 1.0 / lower
        res = minimize_scalar(_evb_objective, args=(L, M, s * math.sqrt(scale), residual * scale, xubar),
                              bounds=(lower * scale, upper * scale), method="bounded")
        sigma2 = float(res.x) / scale
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return int(np.sum(s > threshold))
