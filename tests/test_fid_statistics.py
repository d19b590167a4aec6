"""FID and KID as statistics: the fast FID against pytorch-fid and closed forms, KID against the
unbiased MMD² written out and a closed-form population value, both standard errors (and the
paired one of a difference of FIDs) against the spread actually observed over independent sets
of generated samples, and the jackknife on a torch device against numpy."""

from math import comb

import numpy as np
import pytest
import torch

from diffusion_lib.jackknife import paired_stderr, replicate_stderr
from diffusion_lib.metrics.frechet import FrechetReference, fid_jackknife
from diffusion_lib.metrics.kid import kernel_inception_distance

from conftest import SHARED

POOL3 = SHARED / "data" / "inception_pool3_train_subset.npy"
needs_pool3 = pytest.mark.skipif(
    not POOL3.is_file(), reason=f"the real Inception pool3 features are not at {POOL3} (../shared is absent)"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread for the jackknife's torch.linalg, as conftest gives numpy one BLAS
    thread: beside a sweep on 2 cores, MKL's threaded eigensolver waits for descheduled threads,
    and a jackknife ran up to 20× slower on two threads than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool3() -> np.ndarray:
    """5,085 × 2,048 float64 Inception pool3 features of CIFAR-10 training images."""
    return np.load(POOL3).astype(np.float64)


@pytest.fixture(scope="module")
def reference_1085(pool3) -> FrechetReference:
    """The first 1,085 images: fewer than the 2,048 dimensions, so Σ_r has 964 zero eigenvalues."""
    return FrechetReference.from_features(pool3[:1085])


@pytest.fixture(scope="module")
def disjoint_sets(pool3, reference_1085) -> tuple[np.ndarray, np.ndarray, list]:
    """16 disjoint sets of 250 generated samples (the images after the reference's), each set's
    FID and its jackknife."""
    sets = pool3[1085 : 1085 + 16 * 250].reshape(16, 250, -1)
    return sets, np.array([reference_1085.fid(x) for x in sets]), [fid_jackknife(reference_1085, x) for x in sets]


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# --- FID -------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_pool3
def test_fid_equals_an_exact_svd_route_and_pytorch_fid_with_fewer_and_with_more_samples_than_dimensions(pool3):
    """1,500 generated samples take the N×N Gram route, 2,500 the D×D one (D = 2,048). Both
    against an independent exact route: tr √(Σ_r^½ Σ_g Σ_r^½) is the sum of the singular values
    of (X − μ) Σ_r^½ / √(N−1). pytorch-fid's sqrtm adds √(round-off) for each zero eigenvalue
    of a singular Σ_g (549 at 1,500 samples: ≈ 5e-7 relative), so it is held to 1e-6; it is
    compared once, at 2,500 (its sqrtm of a 2,048² matrix is the slowest step here)."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    real = pool3[:2585]
    reference = FrechetReference.from_features(real)
    sigma_r = np.cov(real, rowvar=False)
    sqrt_sigma_r = sqrt_psd(sigma_r)
    for n in (1500, 2500):
        generated = pool3[2585 : 2585 + n]
        centered = generated - generated.mean(0)
        trace_sqrt = np.linalg.svd(centered @ sqrt_sigma_r, compute_uv=False).sum() / np.sqrt(n - 1)
        exact = (
            np.sum((real.mean(0) - generated.mean(0)) ** 2)
            + np.trace(sigma_r)
            + np.sum(centered**2) / (n - 1)
            - 2 * trace_sqrt
        )
        assert reference.fid(generated) == pytest.approx(exact, rel=1e-10), n
    theirs = calculate_frechet_distance(generated.mean(0), np.cov(generated, rowvar=False), real.mean(0), sigma_r)
    assert reference.fid(generated) == pytest.approx(theirs, rel=1e-6)


@pytest.mark.slow
@needs_pool3
def test_fid_from_stats_agrees_with_fid_of_features_for_a_rank_deficient_reference(pool3):
    real = pool3[:1085]  # fewer images than dimensions: Σ_r has 964 zero eigenvalues
    reference = FrechetReference.from_features(real)
    again = FrechetReference.from_stats(real.mean(0), np.cov(real, rowvar=False), len(real))
    for generated in (pool3[1085:1335], pool3[1085:3585]):
        from_stats = again.fid_from_stats(generated.mean(0), np.cov(generated, rowvar=False))
        assert reference.fid(generated) == pytest.approx(from_stats, rel=1e-9)
    assert reference.fid(real) == pytest.approx(0, abs=1e-6)


def test_fid_from_stats_equals_the_closed_form_for_commuting_covariances():
    """Diagonal covariances: FID = ‖μ₁ − μ₂‖² + Σ (√a_i − √b_i)², zero variances included."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 3, size=50), rng.uniform(0, 3, size=50)
    a[:10] = 0
    b[5:20] = 0
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    rotation = np.linalg.qr(rng.normal(size=(50, 50)))[0]  # a shared basis keeps them commuting
    fid = FrechetReference.from_stats(mu1, rotation @ np.diag(a) @ rotation.T).fid_from_stats(
        mu2, rotation @ np.diag(b) @ rotation.T
    )
    assert fid == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
@needs_pool3
def test_fid_standard_error_matches_the_spread_over_disjoint_sample_sets(disjoint_sets):
    """Reference fixed (1,085 images); 16 disjoint sets of 250 generated samples."""
    _, fids, jackknifes = disjoint_sets
    observed = np.std(fids, ddof=1)
    reported = np.array([jackknife.stderr for jackknife in jackknifes])
    assert 1 / 1.5 < reported.mean() / observed < 1.5
    assert np.all((reported > observed / 2) & (reported < observed * 2))  # each set on its own


@pytest.mark.parametrize("dims, n", [(16, 100), (64, 40)], ids=["N>D", "N<D"])
def test_fid_standard_error_matches_the_spread_over_200_synthetic_sample_sets(dims, n):
    rng = np.random.default_rng(dims)
    reference = FrechetReference.from_features(rng.normal(size=(5000, dims)))
    mixing = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    sets = [rng.normal(size=(n, dims)) @ mixing + 0.3 for _ in range(200)]
    observed = np.std([reference.fid(x) for x in sets], ddof=1)
    reported = np.mean([fid_jackknife(reference, x).stderr for x in sets])
    assert 0.8 < reported / observed < 1.25


# --- the jackknife on a torch device; paired standard errors ---------------------------------


def jackknife_replicates_by_svd(reference: FrechetReference, features: np.ndarray, num_groups: int) -> np.ndarray:
    """`fid_jackknife`'s replicates computed independently in numpy: its groups (the first d·G of
    a permutation seeded with 0, d = N // G), each replicate's tr (Σ_r^½ Σ Σ_r^½)^½ the sum of the
    singular values of (X − μ) Σ_r^½ / √(N − 1), which needs no rule for zero eigenvalues."""
    n = len(features)
    d = n // num_groups
    replicates = []
    for group in np.random.default_rng(0).permutation(n)[: d * num_groups].reshape(num_groups, d):
        kept = np.delete(features, group, axis=0)
        centered = kept - kept.mean(0)
        trace_sqrt = np.linalg.svd(centered @ reference.sqrt_sigma, compute_uv=False).sum() / np.sqrt(n - d - 1)
        trace_sigma = np.sum(centered**2) / (n - d - 1)
        replicates.append(
            np.sum((reference.mu - kept.mean(0)) ** 2) + np.trace(reference.sigma) + trace_sigma - 2 * trace_sqrt
        )
    return np.array(replicates)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dims, num_reference, n",
    [(16, 500, 100), (64, 500, 40), (64, 40, 100)],
    ids=["N>D", "N<D", "N>D, rank-deficient reference"],
)
def test_jackknife_on_a_torch_device_equals_an_independent_numpy_computation(device, dims, num_reference, n):
    """Both eigenvalue problems (D×D, and the N×N Gram matrix), and a reference of fewer images
    than dimensions, whose 25 zero eigenvalues must add exactly 0 (their square roots taken as
    √round-off would add ~1e-8 of the FID). From an array with `device`, and from a tensor, whose
    device it runs on. Well-conditioned features (a rotation, scales 0.5–2): a nearly singular
    mixing would leave eigenvalues so small that √λ from any eigensolver is off by ~1e-9."""
    rng = np.random.default_rng(dims + num_reference)
    mixing = np.linalg.qr(rng.normal(size=(dims, dims)))[0] * np.linspace(0.5, 2, dims)
    reference = FrechetReference.from_features(rng.normal(size=(num_reference, dims)) @ mixing)
    features = rng.normal(size=(n, dims)) @ mixing + 0.3
    expected = jackknife_replicates_by_svd(reference, features, num_groups=25)
    for jackknife in (
        fid_jackknife(reference, features, device=device),
        fid_jackknife(reference, torch.from_numpy(features).to(device)),
    ):
        assert isinstance(jackknife.replicates, np.ndarray) and jackknife.replicates.dtype == np.float64
        np.testing.assert_allclose(jackknife.replicates, expected, rtol=1e-9, atol=0)
        assert jackknife.stderr == pytest.approx(replicate_stderr(expected, n), rel=1e-9)


def synthetic_reference_and_mixing(dims: int, seed: int) -> tuple[FrechetReference, np.ndarray]:
    rng = np.random.default_rng(seed)
    return FrechetReference.from_features(rng.normal(size=(5000, dims))), rng.normal(size=(dims, dims)) / np.sqrt(dims)


@pytest.mark.slow
def test_paired_stderr_of_independent_sample_sets_adds_their_variances():
    """Disjoint draws share no noise, so the paired SE² has the expectation se_a² + se_b² (its
    cross term Σ (a_g − ā)(b_g − b̄) averages to 0): the ratio of the means over 200 draws is 1
    within ~1% (one draw's ratio scatters by ~17%). se_b ≈ 2 se_a here, so dropping either term
    (ratio 0.2 or 0.8) or adding the standard errors instead of their squares (1.8) is far
    outside ±10%. N < D: the Gram side, as at a milestone."""
    reference, mixing = synthetic_reference_and_mixing(64, seed=10)
    rng = np.random.default_rng(11)
    paired_squares, unpaired_squares = [], []
    for _ in range(200):
        a = fid_jackknife(reference, rng.normal(size=(50, 64)) @ mixing + 0.3)
        b = fid_jackknife(reference, rng.normal(size=(50, 64)) @ mixing * 1.3 + 0.5)
        paired_squares.append(paired_stderr(a.replicates, b.replicates, 50) ** 2)
        unpaired_squares.append(a.stderr**2 + b.stderr**2)
    assert 0.9 < np.mean(paired_squares) / np.mean(unpaired_squares) < 1.1


@pytest.mark.slow
def test_paired_stderr_of_sample_sets_sharing_their_noise_is_much_smaller_and_right():
    """Model B's features are model A's scaled and shifted, plus a small perturbation of their
    own: the sampling noise both FIDs share cancels in FID_A − FID_B. The paired SE is under
    half the unpaired √(se_a² + se_b²) in every draw (0.3 on average), and matches the spread
    of the difference over 200 draws, which the unpaired one overstates ~4×."""
    reference, mixing = synthetic_reference_and_mixing(64, seed=20)
    rng = np.random.default_rng(21)
    differences, paired, unpaired = [], [], []
    for _ in range(200):
        features_a = rng.normal(size=(50, 64)) @ mixing + 0.3
        features_b = features_a * 1.1 + 0.2 + 0.05 * rng.normal(size=(50, 64))
        a, b = fid_jackknife(reference, features_a), fid_jackknife(reference, features_b)
        differences.append(reference.fid(features_a) - reference.fid(features_b))
        paired.append(paired_stderr(a.replicates, b.replicates, 50))
        unpaired.append(np.hypot(a.stderr, b.stderr))
    paired, unpaired = np.array(paired), np.array(unpaired)
    assert np.all(paired < unpaired / 2)
    assert 0.8 < paired.mean() / np.std(differences, ddof=1) < 1.25


@pytest.mark.slow
@needs_pool3
def test_paired_stderr_matches_the_spread_of_fid_differences_over_disjoint_real_sample_sets(
    disjoint_sets, reference_1085
):
    """A second model seeing the same noise: model B's features are each set's own, shrunk by 10%
    and perturbed by a fixed draw of 0.2 × each feature's standard deviation (the unpaired SE
    overstates the spread of FID_A − FID_B ~2× here). Reference fixed (1,085 images); 16
    disjoint sets of 250 samples."""
    sets, fids_a, jackknifes_a = disjoint_sets
    perturbation = np.random.default_rng(0).normal(size=sets.shape[1:]) * sets.reshape(-1, sets.shape[2]).std(0)
    differences, paired = [], []
    for features_a, fid_a, jackknife_a in zip(sets, fids_a, jackknifes_a):
        features_b = 0.9 * features_a + 0.2 * perturbation
        differences.append(fid_a - reference_1085.fid(features_b))
        jackknife_b = fid_jackknife(reference_1085, features_b)
        paired.append(paired_stderr(jackknife_a.replicates, jackknife_b.replicates, len(features_a)))
    assert 1 / 1.5 < np.mean(paired) / np.std(differences, ddof=1) < 1.5


# --- KID -------------------------------------------------------------------------------------


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Gretton et al. (2012) MMD²_u with the KID kernel, pair by pair."""

    def k(a, b):
        return (a @ b / len(a) + 1) ** 3

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_on_the_full_sets_is_the_unbiased_mmd2_and_its_stderr_the_delete_one_jackknife():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 8)), rng.normal(0.3, 1.2, size=(50, 8))
    kid, stderr = kernel_inception_distance(x, y, num_subsets=1, subset_size=50)
    assert kid == pytest.approx(unbiased_mmd2(x, y), rel=1e-10)
    replicates = np.array([unbiased_mmd2(np.delete(x, i, axis=0), y) for i in range(len(x))])
    jackknife = np.sqrt((len(x) - 1) / len(x) * np.sum((replicates - replicates.mean()) ** 2))
    assert stderr == pytest.approx(jackknife, rel=1e-8)


def test_kid_over_many_small_subsets_averages_to_the_full_set_value_and_adds_their_noise():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 8)), rng.normal(0.3, 1.2, size=(50, 8))
    full, full_stderr = kernel_inception_distance(x, y, num_subsets=1, subset_size=50)
    kid, stderr = kernel_inception_distance(x, y, num_subsets=4000, subset_size=10)
    subset_noise = np.sqrt(stderr**2 - full_stderr**2)
    assert subset_noise > 0
    assert abs(kid - full) < 4 * subset_noise


def gaussian_moments(mu: np.ndarray, cov: np.ndarray) -> list[np.ndarray]:
    """E[x], E[x⊗x], E[x⊗x⊗x] of x ~ N(mu, cov)."""
    third = np.einsum("a,b,c->abc", mu, mu, mu)
    third += np.einsum("a,bc->abc", mu, cov) + np.einsum("b,ac->abc", mu, cov) + np.einsum("c,ab->abc", mu, cov)
    return [mu, np.outer(mu, mu) + cov, third]


def population_kid(mu_p, cov_p, mu_q, cov_q) -> float:
    """MMD² for k(x, y) = Σ_r C(3, r) (xᵀy/d)^r: (xᵀy)^r = ⟨x^⊗r, y^⊗r⟩, so the mean embeddings
    differ by the moment tensors, MMD² = Σ_r C(3, r) d^−r ‖E_p x^⊗r − E_q x^⊗r‖²."""
    d = len(mu_p)
    pairs = zip(gaussian_moments(mu_p, cov_p), gaussian_moments(mu_q, cov_q))
    return sum(comb(3, r) * d**-r * np.sum((a - b) ** 2) for r, (a, b) in enumerate(pairs, start=1))


@pytest.mark.slow
def test_kid_is_near_zero_for_identical_distributions_and_finds_the_closed_form_for_a_shift():
    """The reference is large, so its own noise (left out of the stderr) hardly counts."""
    rng = np.random.default_rng(2)
    d = 4
    reference = rng.normal(size=(3000, d))
    same, same_stderr = kernel_inception_distance(rng.normal(size=(400, d)), reference)
    assert abs(same) < 4 * same_stderr

    shift = np.full(d, 0.5)
    expected = population_kid(np.zeros(d), np.eye(d), shift, np.eye(d))
    shifted, shifted_stderr = kernel_inception_distance(rng.normal(size=(400, d)) + shift, reference)
    assert shifted > 4 * shifted_stderr  # clearly positive ...
    assert abs(shifted - expected) < 4 * shifted_stderr  # ... and the right value


def test_kid_standard_error_matches_the_spread_over_100_sample_sets():
    """Reference fixed; subsets smaller than the sets, so both parts of the variance count."""
    rng = np.random.default_rng(3)
    d = 4
    reference = rng.normal(size=(400, d))
    results = np.array(
        [
            kernel_inception_distance(
                rng.normal(size=(200, d)) + 0.5, reference, num_subsets=10, subset_size=100, seed=s
            )
            for s in range(100)
        ]
    )
    assert 0.75 < results[:, 1].mean() / results[:, 0].std(ddof=1) < 1.33
