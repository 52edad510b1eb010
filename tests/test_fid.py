"""`var-rt fid`: the ADM-protocol arithmetic (Frechet distance, Inception Score, k-NN precision/recall), the npz
readers, the missing-weights error, and the whole command with a stub feature extractor (offline, no weights)."""
import importlib.util
import json
import sys
import zipfile

import numpy as np
import pytest
from scipy import linalg

from var_rt import cli
from var_rt import fid as F


# ----------------------------------------------------------------------------------------------- Frechet distance

def direct_fid(f1, f2):
    """The textbook formula, written out with scipy directly (trace of sqrtm of the product)."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)


def test_frechet_distance_matches_direct_scipy_and_eigenvalues():
    rng = np.random.RandomState(0)
    f1 = rng.randn(400, 12) @ rng.randn(12, 12)
    f2 = rng.randn(300, 12) * 1.5 + 0.3
    got = F.frechet_distance(*F.feature_stats(f1), *F.feature_stats(f2))
    assert got == pytest.approx(direct_fid(f1, f2), rel=1e-10)
    # Tr sqrt(S1 S2) = sum of the square roots of the (real, non-negative) eigenvalues of S1 S2
    (m1, s1), (m2, s2) = F.feature_stats(f1), F.feature_stats(f2)
    ev = np.linalg.eigvals(s1 @ s2).real
    by_eig = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()
    assert got == pytest.approx(by_eig, rel=1e-8)


def test_frechet_distance_closed_form_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.0, -1.0])
    v1, v2 = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 9.0])
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()  # 21 + 1 + 1 + 0.25 + 0
    assert want == pytest.approx(23.25)
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, abs=1e-10)


def test_frechet_distance_symmetric_zero_and_rank_deficient():
    rng = np.random.RandomState(1)
    a, b = F.feature_stats(rng.randn(200, 8)), F.feature_stats(rng.randn(150, 8) + 0.5)
    assert F.frechet_distance(*a, *b) == pytest.approx(F.frechet_distance(*b, *a), rel=1e-9)
    assert abs(F.frechet_distance(*a, *a)) < 1e-8 * np.trace(a[1])
    # fewer samples than dimensions (rank-deficient covariances, as 2048-d features of a small run): finite, >= 0,
    # and equal to the eigenvalue form
    f1, f2 = rng.randn(5, 16), rng.randn(6, 16)
    got = F.frechet_distance(*F.feature_stats(f1), *F.feature_stats(f2))
    assert np.isfinite(got) and got >= -1e-6
    assert got == pytest.approx(direct_fid(f1, f2), rel=1e-5, abs=1e-5)


def test_frechet_distance_singular_product_retries_with_eps_on_the_diagonals(monkeypatch):
    seen, real = [], linalg.sqrtm

    def sqrtm(m):
        seen.append(m.copy())
        return np.full_like(m, np.nan) if len(seen) == 1 else real(m)
    monkeypatch.setattr(linalg, "sqrtm", sqrtm)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 0.0])
    with pytest.warns(RuntimeWarning, match="singular product"):
        got = F.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=1e-6)
    assert np.allclose(seen[1], (s1 + 1e-6 * np.eye(2)) @ (s2 + 1e-6 * np.eye(2)))
    e = 1e-6  # the traces are the original ones, the square root is of the offset product (as ADM)
    assert got == pytest.approx(5 + 4 - 2 * (np.sqrt((1 + e) * (4 + e)) + np.sqrt((4 + e) * e)), abs=1e-9)


def test_frechet_distance_rejects_a_real_imaginary_part_and_mismatched_shapes():
    # not covariances: S1 S2 = diag(-1, 1) has no real square root
    with pytest.raises(ValueError, match="imaginary component"):
        F.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))
    with pytest.raises(ValueError, match="mismatched"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        F.feature_stats(np.zeros((1, 4)))


# ----------------------------------------------------------------------------------------------- Inception Score

def test_inception_score_uniform_is_one_and_balanced_one_hot_is_the_class_count():
    assert F.inception_score(np.zeros((100, 7))) == pytest.approx((1.0, 0.0), abs=1e-12)
    assert F.inception_score(np.random.RandomState(0).randn(50, 1)) == pytest.approx((1.0, 0.0))  # one class
    classes, n = 10, 200
    onehot = 1000.0 * np.eye(classes)[np.arange(n) % classes]  # every consecutive block of 20: each class twice
    mean, std = F.inception_score(onehot, splits=10, seed=None)
    assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0, abs=1e-9)
    # a constant shift of a row's logits changes nothing
    shifted = onehot + np.random.RandomState(2).randn(n, 1) * 50
    assert F.inception_score(shifted, seed=None)[0] == pytest.approx(classes, rel=1e-9)


def test_inception_score_splits_a_fixed_permutation_of_class_ordered_files():
    classes, per_class = 10, 20
    labels = np.repeat(np.arange(classes), per_class)  # class-ordered, as `var-rt sample` writes
    onehot = 1000.0 * np.eye(classes)[labels]
    # in file order each split holds one class: IS 1 (what ADM's in-order splits would give for this file)
    assert F.inception_score(onehot, splits=10, seed=None)[0] == pytest.approx(1.0)
    # with the permutation: exp(entropy of each split's class histogram), averaged
    mean, std = F.inception_score(onehot, splits=10, seed=0)
    perm = labels[np.random.RandomState(0).permutation(len(labels))]
    want = []
    for i in range(10):
        q = np.bincount(perm[i * 20:(i + 1) * 20], minlength=classes) / 20
        q = q[q > 0]
        want.append(np.exp(-(q * np.log(q)).sum()))
    assert mean == pytest.approx(np.mean(want), rel=1e-9) and std == pytest.approx(np.std(want), rel=1e-6)
    assert mean > 5  # far from the in-order 1


def test_inception_score_matches_the_plain_softmax_formula():
    z = np.random.RandomState(3).randn(300, 20) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    want = []
    for i in range(10):
        part = p[i * 30:(i + 1) * 30]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        want.append(np.exp(kl.sum(1).mean()))
    assert F.inception_score(z, splits=10, seed=None) == pytest.approx((np.mean(want), np.std(want)), rel=1e-10)
    # fewer images than splits: one split of all of them
    part = p[:4]
    one = np.exp((part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean())
    assert F.inception_score(z[:4], splits=10, seed=None) == pytest.approx((one, 0.0), rel=1e-10)


# ----------------------------------------------------------------------------------------------- precision / recall

def brute_pr(ref, smp, k=3):
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    precision = (d2(smp, ref) <= r_ref[None, :]).any(1).mean()
    recall = (d2(ref, smp) <= r_smp[None, :]).any(1).mean()
    return precision, recall


def test_precision_recall_known_cases_and_brute_force():
    rng = np.random.RandomState(4)
    ref = rng.randn(40, 5).astype(np.float32)
    assert F.precision_recall(ref, ref.copy()) == (1.0, 1.0)
    assert F.precision_recall(ref, ref + 100) == (0.0, 0.0)
    smp = (rng.randn(60, 5) * 1.3 + 0.4).astype(np.float32)
    got = F.precision_recall(ref, smp)
    want = brute_pr(ref.astype(np.float64), smp.astype(np.float64))
    assert got == pytest.approx(want, abs=1.5 / 60)  # float32 ties at most flip a point or so
    assert 0 < got[0] < 1 and 0 < got[1] < 1
    # blocking does not matter
    assert F.knn_radii(smp, block=7) == pytest.approx(F.knn_radii(smp, block=1000), rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="more than 3"):
        F.knn_radii(ref[:3])


# ----------------------------------------------------------------------------------------------- npz readers

def imgs(n=5, h=6, w=7, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_sample_npz_is_read_in_batches_exactly(tmp_path, save):
    x = imgs(11)
    save(tmp_path / "s.npz", arr_0=x)
    r = F.NpzImages(str(tmp_path / "s.npz"))
    assert (r.n, r.height, r.width) == (11, 6, 7)
    for b in (1, 3, 11, 100):
        parts = list(r.batches(b))
        assert [len(p) for p in parts][:-1] == [b] * (len(parts) - 1)
        assert np.array_equal(np.concatenate(parts), x)


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 8, 8, 3), np.float32), "float images"),
    (np.zeros((4, 3, 8, 8), np.uint8), "NCHW"),
    (np.zeros((8, 8, 3), np.uint8), r"uint8 images \(N, H, W, 3\)"),
    (np.zeros((4, 8, 8, 4), np.uint8), r"got uint8 \(4, 8, 8, 4\)"),
    (np.zeros((1, 8, 8, 3), np.uint8), "at least 2"),
    (np.zeros((4, 8, 8, 3), np.int64), "got int64"),
])
def test_sample_npz_rejects_wrong_dtype_and_shape(tmp_path, arr, match):
    np.savez(tmp_path / "bad.npz", arr_0=arr)
    with pytest.raises(ValueError, match=match) as e:
        F.NpzImages(str(tmp_path / "bad.npz"))
    assert "\n" not in str(e.value)


def test_npz_files_that_are_not_npz_or_lack_arrays(tmp_path):
    np.savez(tmp_path / "other.npz", images=imgs())
    with pytest.raises(ValueError, match="no arr_0 .*it has: images"):
        F.NpzImages(str(tmp_path / "other.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an npz"):
        F.NpzImages(str(tmp_path / "junk.npz"))
    np.save(tmp_path / "plain.npy", imgs())
    with pytest.raises(ValueError, match="not an npz"):
        F.Reference(str(tmp_path / "plain.npy"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        F.NpzImages(str(tmp_path / "missing.npz"))
    # an array member whose header promises more images than it holds: reported, not silently short
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (5, 6, 7, 3)})
    buf.write(imgs(4).tobytes())
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as z:
        z.writestr("arr_0.npy", buf.getvalue())
    r = F.NpzImages(str(tmp_path / "t.npz"))
    with pytest.raises(ValueError, match="truncated"):
        list(r.batches(2))


def test_reference_npz_formats(tmp_path):
    d = 6
    mu, sigma = np.arange(d, dtype=np.float64), np.eye(d) * 2
    np.savez(tmp_path / "adm.npz", arr_0=imgs(4), mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
    r = F.Reference(str(tmp_path / "adm.npz"))
    assert r.has_stats and r.images.n == 4 and np.array_equal(r.mu, mu) and np.array_equal(r.sigma, sigma)
    np.savez(tmp_path / "stats.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    r = F.Reference(str(tmp_path / "stats.npz"))
    assert r.has_stats and r.images is None and r.mu.dtype == np.float64
    np.savez(tmp_path / "images.npz", arr_0=imgs(4))
    r = F.Reference(str(tmp_path / "images.npz"))
    assert not r.has_stats and r.images.n == 4
    bad = {
        "mu_only": (dict(mu=mu), "has mu but not sigma"),
        "sigma_shape": (dict(mu=mu, sigma=np.eye(d + 1)), r"sigma float \(D, D\)"),
        "int_mu": (dict(mu=np.arange(d), sigma=sigma), "mu must be float"),
        "nan": (dict(mu=mu, sigma=np.full((d, d), np.nan)), "NaN"),
        "asym": (dict(mu=mu, sigma=np.triu(np.ones((d, d)))), "not symmetric"),
        "empty": (dict(other=mu), "neither stored statistics"),
        "bad_images": (dict(arr_0=np.zeros((4, 8, 8, 3), np.float64)), "must be uint8"),
    }
    for name, (arrays, match) in bad.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=match):
            F.Reference(str(tmp_path / f"{name}.npz"))


# ----------------------------------------------------------------------------------------------- the command

@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """A torch hub cache with nothing in it and no weights variable: nothing the developer has cached leaks in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(F.WEIGHTS_ENV, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_missing_weights_is_one_line_and_exit_2(tmp_path, no_weights, capsys):
    np.savez(tmp_path / "s.npz", arr_0=imgs(4))
    np.savez(tmp_path / "ref.npz", arr_0=imgs(4, seed=1))
    assert cli.main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("var-rt: error: FID needs the Inception weights (pt_inception-2015-12-05-6726825d.pth)")
    assert "--inception-weights PATH" in err and str(no_weights) in err and "download once with" in err
    # a given path that is not there: also one line
    assert cli.main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"),
                     "--inception-weights", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nope.pth: no such file" in err
    # a cached file under either library's name is found
    no_weights.mkdir(parents=True)
    (no_weights / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert F.find_weights() == str(no_weights / "weights-inception-2015-12-05-6726825d.pth")


def test_wrong_sample_file_is_reported_before_weights(tmp_path, no_weights, capsys):
    np.savez(tmp_path / "s.npz", arr_0=imgs(4).astype(np.float32) / 255)
    np.savez(tmp_path / "ref.npz", arr_0=imgs(4))
    assert cli.main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "must be uint8" in err


W_LOGITS = np.random.RandomState(7).randn(8, 5)


def stub_extract(batch):
    """A deterministic stand-in for Inception: 8 'pool' features per image, 5 'logits'."""
    x = batch.astype(np.float64) / 255
    pool = np.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, : x.shape[1] // 2, : x.shape[2] // 2, :2].mean((1, 2))],
                          axis=1)
    return pool.astype(np.float32), (pool @ W_LOGITS * 4).astype(np.float32)


@pytest.fixture
def stubbed(tmp_path, monkeypatch, no_weights):
    calls = []

    def load(weights, device):
        calls.append((weights, device))
        return stub_extract
    monkeypatch.setattr(F, "load_inception", load)
    w = tmp_path / "w.pth"
    w.write_bytes(b"stub weights")
    return str(w), calls


def test_fid_command_with_stub_extractor_uses_stored_ref_stats(tmp_path, stubbed, capsys):
    weights, calls = stubbed
    x, r = imgs(40, 16, 16, seed=0), imgs(30, 16, 16, seed=1)
    # stored statistics deliberately different from the reference images' own: the stored ones must be used
    ref_mu, ref_sigma = np.full(8, 0.4), np.eye(8) * 0.01
    np.savez(tmp_path / "s.npz", arr_0=x)
    np.savez(tmp_path / "ref.npz", arr_0=r, mu=ref_mu, sigma=ref_sigma)
    out = tmp_path / "out.json"
    rc = cli.main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights,
                   "--json", str(out), "--batch", "7", "--device", "cpu", "--quiet"])
    assert rc == 0 and calls == [(weights, "cpu")]
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0].startswith("FID ") and printed.out.splitlines()[1].startswith("IS ")
    assert printed.err == ""  # --quiet: no progress bar
    res = json.loads(out.read_text())
    pool, logits = stub_extract(x)
    want_fid = F.frechet_distance(*F.feature_stats(pool), ref_mu, ref_sigma)
    assert res["fid"] == pytest.approx(want_fid, rel=1e-9)
    assert res["fid"] != pytest.approx(F.frechet_distance(*F.feature_stats(pool), *F.feature_stats(stub_extract(r)[0])))
    assert (res["inception_score"], res["inception_score_std"]) == pytest.approx(F.inception_score(logits))
    assert res["n_samples"] == 40 and res["image_size"] == [16, 16] and res["n_ref_images"] == 30
    assert res["ref_stats"] == "stored mu/sigma"
    assert res["precision"] is None and res["recall"] is None and res["sfid"] is None
    assert "not computed" in res["protocol"]["precision_recall"] and res["protocol"]["is_splits"] == 10
    assert res["inception_weights_sha256"] == F.sha256(weights)
    assert any("256x256" in n for n in res["notes"]) and any("50,000" in n for n in res["notes"])


def test_fid_command_computes_ref_stats_from_images_and_precision_recall(tmp_path, stubbed, capsys):
    weights, _ = stubbed
    x, r = imgs(40, 16, 16, seed=0), imgs(30, 16, 16, seed=1)
    np.savez(tmp_path / "s.npz", arr_0=x)
    np.savez(tmp_path / "ref.npz", arr_0=r)
    out = tmp_path / "out.json"
    assert cli.main(["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights", weights,
                     "--json", str(out), "--precision-recall", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "no mu/sigma; statistics computed from its 30 images" in printed.out
    assert "precision " in printed.out
    res = json.loads(out.read_text())
    sp, rp = stub_extract(x)[0], stub_extract(r)[0]
    assert res["fid"] == pytest.approx(F.frechet_distance(*F.feature_stats(sp), *F.feature_stats(rp)), rel=1e-9)
    assert res["ref_stats"].startswith("computed from its 30 images")
    assert (res["precision"], res["recall"]) == pytest.approx(F.precision_recall(rp, sp))


def test_fid_command_rejects_precision_recall_without_ref_images_and_bad_dims(tmp_path, stubbed, capsys):
    weights, _ = stubbed
    np.savez(tmp_path / "s.npz", arr_0=imgs(10))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    base = ["fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "stats.npz"), "--inception-weights", weights]
    assert cli.main(base + ["--precision-recall"]) == 2
    assert "needs the reference images" in capsys.readouterr().err
    assert cli.main(base + ["--quiet"]) == 2  # the stub's features have 8 dims, the stored stats 2048
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mu has 2048 dims" in err


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None,
                    reason="torch-fidelity not installed (pip install --no-deps torch-fidelity==0.4.0)")
def test_real_inception_port_loads_without_torchvision(tmp_path, monkeypatch):
    """torch-fidelity's Inception, with random weights in the converted file's format: imports without
    torchvision (the package's __init__ is bypassed), takes uint8 NHWC of any size, gives 2048 + 1008."""
    import torch
    cls = F._inception_class()
    assert "torch_fidelity" not in sys.modules or hasattr(sys.modules["torch_fidelity"], "__file__")
    with monkeypatch.context() as m:  # build once with random weights to write a state dict of the right keys
        m.setattr(cls, "load_state_dict", lambda self, *a, **k: None)
        m.setattr(torch, "load", lambda *a, **k: {})
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    sd = net.state_dict()
    torch.save(sd, tmp_path / "w.pth")  # pytorch-fid's file comes from a torchvision model: with num_batches_tracked
    extract = F.load_inception(str(tmp_path / "w.pth"), "cpu")
    pool, logits = extract(imgs(2, 32, 40))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and pool.dtype == np.float32
    assert np.isfinite(pool).all() and np.isfinite(logits).all()
    # torch-fidelity's own conversion has no num_batches_tracked: loads as well, same features
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "tf.pth")
    pool2, logits2 = F.load_inception(str(tmp_path / "tf.pth"), "cpu")(imgs(2, 32, 40))
    assert np.array_equal(pool, pool2) and np.array_equal(logits, logits2)
    # a file that is not the weights: one line
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="cannot load the Inception weights") as e:
        F.load_inception(str(tmp_path / "bad.pth"), "cpu")
    assert "\n" not in str(e.value)
