"""Tests for musco_plugins.factorize: SVD helpers, Tucker-2, CP-ALS and EVBMF rank selection."""

import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from musco_plugins import factorize


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tucker_recon(core, u_out, u_in):
    return torch.einsum("oc...,Oo,Cc->OC...", core, u_out, u_in)


# ---------------------------------------------------------------- dtype / validation


def test_compute_dtype():
    assert factorize.compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert factorize.compute_dtype(torch.zeros(1, dtype=dt)) == torch.float32


@pytest.mark.parametrize(
    "call",
    [
        lambda: factorize.truncated_svd(torch.ones(4, 3), 0),
        lambda: factorize.svd_of_product(torch.ones(4, 2), torch.ones(2, 3), 0),
        lambda: factorize.tucker2(torch.ones(4, 3, 3, 3), (0, 2)),
        lambda: factorize.tucker2(torch.ones(4, 3, 3, 3), (2, -1)),
        lambda: factorize.cp_als(torch.ones(4, 3, 2), 0),
    ],
)
def test_rank_below_one_raises(call):
    with pytest.raises(ValueError, match="positive integer"):
        call()


# ---------------------------------------------------------------- truncated SVD


def test_truncated_svd_full_rank_reproduces():
    a = torch.randn(30, 20, generator=_gen())
    left, right = factorize.truncated_svd(a, 20)
    assert left.shape == (30, 20) and right.shape == (20, 20)
    torch.testing.assert_close(left @ right, a, rtol=1e-5, atol=1e-5)


def test_truncated_svd_eckart_young_and_monotone():
    a = torch.randn(40, 25, generator=_gen(1), dtype=torch.float64)
    s = torch.linalg.svdvals(a)
    errors = []
    for r in range(1, 26):
        left, right = factorize.truncated_svd(a, r)
        err = float((a - left @ right).norm())
        assert err == pytest.approx(float(s[r:].square().sum().sqrt()), abs=1e-9)
        errors.append(err)
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("shape", [(40, 40), (30, 50), (50, 30)])
def test_truncated_svd_of_float64_is_optimal_down_to_float64_round_off(shape):
    # singular values from 1 to 1e-14: a Gram matrix would square them and lose everything below about 1e-8
    m, n = shape
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=_gen(1), dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=_gen(2), dtype=torch.float64))[0]
    s = torch.logspace(0, -14, k, dtype=torch.float64)
    matrix = u @ torch.diag(s) @ v.T
    for rank in (k // 2, k - 5, k - 1):
        left, right = factorize.truncated_svd(matrix, rank)
        optimum = float(s[rank:].norm())
        assert float((left @ right - matrix).norm()) <= 10 * optimum + 1e-15, rank
    assert torch.allclose(factorize.singular_values(matrix), s, rtol=1e-6, atol=1e-15)


def test_truncated_svd_balanced_split():
    a = torch.randn(12, 9, generator=_gen(2), dtype=torch.float64)
    left, right = factorize.truncated_svd(a, 4)
    # left = U sqrt(S), right = sqrt(S) V^T  =>  left^T left == right right^T == diag(S).
    s = torch.linalg.svdvals(a)[:4]
    torch.testing.assert_close(left.T @ left, torch.diag(s))
    torch.testing.assert_close(right @ right.T, torch.diag(s))


def test_truncated_svd_clamps_rank():
    left, right = factorize.truncated_svd(torch.randn(10, 7, generator=_gen()), 100)
    assert left.shape == (10, 7) and right.shape == (7, 7)


def test_truncated_svd_dtypes():
    a = torch.randn(8, 6, generator=_gen(3), dtype=torch.float64)
    left, right = factorize.truncated_svd(a, 3)
    assert left.dtype == right.dtype == torch.float64
    left, right = factorize.truncated_svd(a.half(), 3)
    assert left.dtype == right.dtype == torch.float32
    left, right = factorize.truncated_svd(a.bfloat16(), 3)
    assert left.dtype == torch.float32


def test_truncated_svd_detaches():
    a = torch.randn(6, 5, generator=_gen(), requires_grad=True)
    left, right = factorize.truncated_svd(a, 2)
    assert not left.requires_grad and not right.requires_grad


# ---------------------------------------------------------------- SVD of a product


@pytest.mark.parametrize("m,k,n,r", [(30, 8, 25, 5), (20, 40, 15, 10), (10, 6, 12, 6)])
def test_svd_of_product_matches_explicit(m, k, n, r):
    left = torch.randn(m, k, generator=_gen(4), dtype=torch.float64)
    right = torch.randn(k, n, generator=_gen(5), dtype=torch.float64)
    new_left, new_right = factorize.svd_of_product(left, right, r)
    ref_left, ref_right = factorize.truncated_svd(left @ right, r)
    assert new_left.shape == ref_left.shape and new_right.shape == ref_right.shape
    torch.testing.assert_close(new_left @ new_right, ref_left @ ref_right)
    torch.testing.assert_close(new_left.T @ new_left, ref_left.T @ ref_left)  # same balanced split


@pytest.mark.parametrize("m,n", [(30, 250), (250, 30), (9, 9)])
def test_singular_values_match_an_svd(m, n):
    matrix = torch.randn(m, n, generator=_gen(6))
    s = factorize.singular_values(matrix)
    ref = torch.linalg.svdvals(matrix.double()).float()
    assert s.shape == (min(m, n),) and s.dtype == torch.float32
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5)
    assert bool((s[:-1] >= s[1:]).all())


def test_svd_of_product_shape_mismatch():
    with pytest.raises(ValueError):
        factorize.svd_of_product(torch.ones(4, 3), torch.ones(2, 5), 2)


# ---------------------------------------------------------------- unfold


def test_unfold_matches_tensorly():
    import tensorly as tl
    t = torch.randn(3, 4, 5, 2, generator=_gen())
    for mode in range(4):
        expected = torch.as_tensor(tl.unfold(t.numpy(), mode))
        torch.testing.assert_close(factorize.unfold(t, mode), expected)


# ---------------------------------------------------------------- Tucker-2


@pytest.mark.parametrize("shape", [(16, 12, 3, 3), (16, 12), (16, 12, 5)])
def test_tucker2_full_rank_reproduces(shape):
    w = torch.randn(*shape, generator=_gen(8))
    core, u_out, u_in = factorize.tucker2(w, (16, 12))
    assert core.shape == shape and u_out.shape == (16, 16) and u_in.shape == (12, 12)
    assert _rel(_tucker_recon(core, u_out, u_in), w) < 1e-5


def test_tucker2_orthonormal_factors_and_clamping():
    w = torch.randn(16, 12, 3, 3, generator=_gen(9))
    core, u_out, u_in = factorize.tucker2(w, (6, 50))
    assert core.shape == (6, 12, 3, 3) and u_out.shape == (16, 6) and u_in.shape == (12, 12)
    torch.testing.assert_close(u_out.T @ u_out, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(u_in.T @ u_in, torch.eye(12), atol=1e-5, rtol=0)


def test_tucker2_error_falls_with_rank():
    w = torch.randn(16, 12, 3, 3, generator=_gen(10))
    errors = [_rel(_tucker_recon(*factorize.tucker2(w, (r, r))), w) for r in (1, 2, 4, 8, 12)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))


def test_tucker2_exact_low_rank():
    g = _gen(11)
    core = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(16, 4, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))[0]
    w = _tucker_recon(core, u_out, u_in).float()
    assert _rel(_tucker_recon(*factorize.tucker2(w, (4, 3))), w) < 1e-4


def test_tucker2_hooi_not_worse_than_hosvd():
    w = torch.randn(16, 12, 3, 3, generator=_gen(12), dtype=torch.float64)
    hosvd = _rel(_tucker_recon(*factorize.tucker2(w, (5, 4), n_iter=0)), w)
    hooi = _rel(_tucker_recon(*factorize.tucker2(w, (5, 4), n_iter=20)), w)
    assert hooi <= hosvd + 1e-12


def test_tucker2_dtype():
    w = torch.randn(6, 5, 3, 3, generator=_gen(), dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in factorize.tucker2(w, (3, 3)))
    assert all(t.dtype == torch.float32 for t in factorize.tucker2(w.half(), (3, 3)))


# ---------------------------------------------------------------- CP-ALS


def _cp_exact(shape, rank, seed):
    g = _gen(seed)
    return factorize.cp_to_tensor([torch.randn(n, rank, generator=g) for n in shape])


def test_cp_to_tensor_matches_einsum():
    g = _gen(13)
    fs = [torch.randn(n, 4, generator=g) for n in (5, 3, 2, 6)]
    torch.testing.assert_close(factorize.cp_to_tensor(fs), torch.einsum("ir,jr,kr,lr->ijkl", *fs))


@pytest.mark.parametrize("shape", [(20, 16, 9), (12, 10, 3, 3)])
def test_cp_als_recovers_exact_rank(shape):
    t = _cp_exact(shape, 5, seed=14)
    factors, err = factorize.cp_als(t, 5)
    assert [tuple(f.shape) for f in factors] == [(n, 5) for n in shape]
    assert err < 1e-3
    assert err == pytest.approx(_rel(factorize.cp_to_tensor(factors), t), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("shape", [(1, 1, 9), (1, 1, 25), (1, 9)])
def test_cp_als_exact_at_its_rank_to_float_rounding(shape):
    # the normal equations' ridge (10 eps) shrank every solution by 1.2e-6: a depthwise kernel's rank-1 CP (one
    # group of EfficientNet-Lite0's depthwise convs) erred by 1.14e-6, and the 16 such layers moved its logits 1.9e-5
    t = torch.randn(*shape, generator=_gen(40))
    factors, err = factorize.cp_als(t, 1)
    assert err < 3e-7 and _rel(factorize.cp_to_tensor(factors), t) < 3e-7


def test_cp_als_returned_error_is_honest():
    t = torch.randn(10, 8, 6, generator=_gen(15))
    factors, err = factorize.cp_als(t, 3, n_iter_max=7)
    assert 0.0 < err < 1.0
    assert err == pytest.approx(_rel(factorize.cp_to_tensor(factors), t), rel=1e-5)


def test_cp_als_deterministic():
    t = torch.randn(12, 10, 3, 3, generator=_gen(16))  # rank 5 > 3: the seeded random fill is used
    f1, e1 = factorize.cp_als(t, 5, n_iter_max=20, seed=3)
    f2, e2 = factorize.cp_als(t, 5, n_iter_max=20, seed=3)
    assert e1 == e2
    assert all(torch.equal(a, b) for a, b in zip(f1, f2))
    f3, _ = factorize.cp_als(t, 5, n_iter_max=20, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(f1, f3))


def test_cp_als_error_falls_with_rank():
    t = torch.randn(12, 10, 8, generator=_gen(17))
    assert factorize.cp_als(t, 2)[1] > factorize.cp_als(t, 8)[1]


def test_cp_als_stops_when_converged():
    t = _cp_exact((20, 16, 9), 5, seed=18)
    start = time.perf_counter()
    _, err = factorize.cp_als(t, 5, n_iter_max=1000)
    assert time.perf_counter() - start < 5.0
    assert err < 1e-3


def test_cp_als_dtype_and_zero_tensor():
    t = torch.randn(5, 4, 3, generator=_gen(), dtype=torch.float64)
    factors, _ = factorize.cp_als(t, 2)
    assert all(f.dtype == torch.float64 for f in factors)
    assert all(f.dtype == torch.float32 for f in factorize.cp_als(t.half(), 2)[0])
    factors, err = factorize.cp_als(torch.zeros(4, 3, 2), 2)
    assert err == 0.0 and all(f.shape[1] == 2 for f in factors)


def test_cp_als_close_to_tensorly():
    import tensorly as tl
    from tensorly.decomposition import parafac

    t = torch.randn(32, 32, 9, generator=_gen(19))
    _, err = factorize.cp_als(t, 8)
    with tl.backend_context("pytorch"):
        cp = parafac(t.detach().clone(), 8, init="svd", n_iter_max=200)
        ref_err = _rel(tl.cp_to_tensor(cp), t)
    assert err <= ref_err * 1.05



def _plain_als_sweep(t, factors):
    """Textbook ALS sweep (unfolding times the full Khatri-Rao product, inverse of the Hadamard of Grams)."""
    factors = list(factors)
    for n in range(t.dim()):
        others = [f for i, f in enumerate(factors) if i != n]
        kr = others[0]
        for f in others[1:]:
            kr = torch.einsum("ir,jr->ijr", kr, f).reshape(-1, kr.shape[1])
        gram = torch.ones(kr.shape[1], kr.shape[1], dtype=t.dtype)
        for f in others:
            gram = gram * (f.T @ f)
        f = factorize.unfold(t, n) @ kr @ torch.linalg.inv(gram)
        factors[n] = f / f.norm(dim=0) if n < t.dim() - 1 else f
    return factors


@pytest.mark.parametrize("shape", [(7, 5), (9, 6, 4), (8, 8, 3, 3), (6, 5, 4, 3, 2)])
def test_cp_als_sweep_matches_textbook_als(shape):
    """The dimension-tree sweep computes exactly the textbook ALS updates, for any number of modes."""
    g = _gen(31)
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    factors = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in shape]
    unfolded = (t.movedim(1, -1).reshape(-1, shape[1]), t.reshape(shape[0], -1))
    new, grams, resid2 = factorize._als_sweep(unfolded, list(shape), factors, [f.T @ f for f in factors])
    for got, want in zip(new, _plain_als_sweep(t, factors)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    for f, gram in zip(new, grams):
        torch.testing.assert_close(gram, f.T @ f)
    exact = (t - factorize.cp_to_tensor(new)).square().sum() - t.square().sum()
    assert float(resid2) == pytest.approx(float(exact), rel=1e-9)


@pytest.mark.parametrize("shape,rank", [((15, 12, 9), 20), ((16, 12, 3, 3), 30)])
def test_cp_als_extrapolation_never_increases_the_error(shape, rank):
    t = torch.randn(*shape, generator=_gen(32), dtype=torch.float64)
    trace = []
    factors, err = factorize.cp_als(t, rank, n_iter_max=60, tol=0, trace=trace)
    assert len(trace) < 60  # some extrapolated sweeps did not pay and were discarded ...
    assert all(b <= a for a, b in zip(trace, trace[1:]))  # ... so the accepted errors never went up
    assert trace[-1] == pytest.approx(err, rel=1e-9)  # the Gram-based estimate is the exact error
    assert err == pytest.approx(_rel(factorize.cp_to_tensor(factors), t), rel=1e-12)


@pytest.mark.parametrize("shape,rank", [((20, 20, 9), 40), ((16, 12, 3, 3), 30)])
def test_cp_als_extrapolation_pays(shape, rank):
    """With the same number of sweeps, extrapolation ends at a lower error than plain ALS."""
    t = torch.randn(*shape, generator=_gen(33), dtype=torch.float64)
    _, plain = factorize.cp_als(t, rank, n_iter_max=60, tol=0, extrapolate=False)
    _, extrapolated = factorize.cp_als(t, rank, n_iter_max=60, tol=0)
    assert extrapolated < plain * 0.99


def test_cp_als_stopping_rule():
    """ALS stops at the first sweep whose error fell by less than tol (relative) per sweep over the last five."""
    t = torch.randn(15, 12, 9, generator=_gen(34), dtype=torch.float64)
    trace = []
    factors, err = factorize.cp_als(t, 10, n_iter_max=10_000, tol=1e-3, trace=trace)
    assert 5 < len(trace) < 100
    window = 5
    assert trace[-1 - window] - trace[-1] <= window * 1e-3 * trace[-1]
    assert all(trace[i - window] - trace[i] > window * 1e-3 * trace[i] for i in range(window, len(trace) - 1))
    capped = []
    factors, _ = factorize.cp_als(t, 10, n_iter_max=7, tol=0, trace=capped)
    assert len(capped) <= 7 and capped == trace[:len(capped)]


def test_cp_als_keeps_float64_precision():
    g = _gen(35)
    t = factorize.cp_to_tensor([torch.randn(n, 5, generator=g, dtype=torch.float64) for n in (20, 16, 9)])
    factors, err = factorize.cp_als(t, 5)
    assert all(f.dtype == torch.float64 for f in factors)
    assert err < 1e-8  # the same tensor in float32 ends near 1e-5
    assert _rel(factorize.cp_to_tensor(factors), t) < 1e-8


def test_cp_als_weights_in_first_factor_whatever_the_mode_sizes():
    """The sweep visits the largest mode first; the output is still in the input's mode order, scale in factors[0]."""
    t = torch.randn(3, 20, 9, generator=_gen(36), dtype=torch.float64)
    factors, err = factorize.cp_als(t, 4, n_iter_max=30)
    assert [tuple(f.shape) for f in factors] == [(3, 4), (20, 4), (9, 4)]
    for f in factors[1:]:
        torch.testing.assert_close(f.norm(dim=0), torch.ones(4, dtype=torch.float64))
    assert err == pytest.approx(_rel(factorize.cp_to_tensor(factors), t), rel=1e-12)


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-20, 1e-30])
def test_cp_als_is_scale_invariant(scale):
    # the factor that carries the scale once had Grams that overflowed or vanished in float32: zero factors
    tensor = torch.randn(12, 8, 9, generator=_gen(4))
    factors, error = factorize.cp_als(tensor, 6)
    scaled, scaled_error = factorize.cp_als(tensor * scale, 6)
    assert scaled_error == pytest.approx(error, rel=1e-3)
    rebuilt = factorize.cp_to_tensor([f.double() for f in scaled])
    assert _rel(rebuilt, (tensor * scale).double()) == pytest.approx(error, rel=1e-3)


def test_cp_als_never_nan():
    """Rank far above what the tensor supports leaves singular normal equations: regularised, finite."""
    t = torch.randn(2, 3, 2, generator=_gen(37))
    factors, err = factorize.cp_als(t, 12, n_iter_max=50)
    assert all(torch.isfinite(f).all() for f in factors)
    assert 0.0 <= err < 1e-3
    bad = t.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        factorize.cp_als(bad, 2)


# ---------------------------------------------------------------- EVBMF


def _low_rank(shape, rank, seed, dtype=torch.float32):
    g = _gen(seed)
    return torch.randn(shape[0], rank, generator=g, dtype=dtype) @ torch.randn(rank, shape[1], generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", [(100, 80), (80, 100), (64, 576)])
def test_evbmf_signal_plus_noise(shape):
    a = _low_rank(shape, 7, seed=20)
    noisy = a + 0.01 * a.std() * torch.randn(*shape, generator=_gen(21))
    s = torch.linalg.svdvals(noisy)
    assert factorize.evbmf_rank(s, shape) == 7
    assert factorize.evbmf_rank(s, shape[::-1]) == 7  # orientation does not matter
    assert factorize.evbmf_rank(s * 1e-3, shape) == 7  # nor does the scale


@pytest.mark.parametrize("rank", [30, 32])
def test_evbmf_finds_the_global_minimum_of_its_free_energy(rank):
    """A 68 x 68 weight of rank 30 or 32 plus small noise (EVBMF can see ranks up to 33 on it): bounded Brent over
    the noise variance stopped in a local minimum of the free energy and gave 15, which the original shares."""
    a = _low_rank((68, 68), rank, seed=23)
    s = torch.linalg.svdvals(a + 1e-3 * torch.randn(68, 68, generator=_gen(24)))
    assert factorize.evbmf_rank(s, (68, 68)) == rank


def test_evbmf_pure_noise():
    for seed in range(3):
        s = torch.linalg.svdvals(torch.randn(100, 80, generator=_gen(seed)))
        assert factorize.evbmf_rank(s, (100, 80)) <= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_evbmf_exact_low_rank(dtype):
    a = _low_rank((100, 80), 7, seed=22, dtype=dtype)
    s = torch.linalg.svdvals(a)
    assert factorize.evbmf_rank(s, (100, 80)) == 7
    assert factorize.evbmf_rank(s, (80, 100)) == 7


def test_evbmf_edge_cases():
    assert factorize.evbmf_rank(torch.zeros(10), (10, 20)) == 0
    assert factorize.evbmf_rank(torch.tensor([]), (10, 20)) == 0
    with pytest.raises(ValueError):
        factorize.evbmf_rank(torch.ones(11), (10, 20))


# ---------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    cout=st.integers(1, 9),
    cin=st.integers(1, 9),
    kernel=st.lists(st.integers(1, 3), max_size=2),
    rank=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_property_full_rank_tucker_and_cp_shapes(cout, cin, kernel, rank, seed):
    w = torch.randn(cout, cin, *kernel, generator=_gen(seed), dtype=torch.float64)
    core, u_out, u_in = factorize.tucker2(w, (cout, cin))
    assert _rel(_tucker_recon(core, u_out, u_in), w) < 1e-10
    factors, err = factorize.cp_als(w, rank, n_iter_max=20, seed=seed)
    assert [tuple(f.shape) for f in factors] == [(n, rank) for n in w.shape]
    assert factorize.cp_to_tensor(factors).shape == w.shape
    assert 0.0 <= err <= 1.0 + 1e-9
