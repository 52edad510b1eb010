"""`var-rt fid`: FID, Inception Score and (on request) precision/recall under the protocol of the ADM evaluator
(openai/guided-diffusion `evaluations/evaluator.py`), the one behind the numbers of the VAR, LlamaGen and CoDe
papers: 50,000 samples against `VIRTUAL_imagenet256_labeled.npz` (arr_0: 10,000 reference images, uint8 NHWC,
plus the precomputed `mu`/`sigma` of their pool_3 features).

The network is the TF "2015-12-05" Inception graph, run through torch-fidelity's port of it
(`FeatureExtractorInceptionV3`, "inception-v3-compat": the graph's bilinear resize to 299 px inside the network,
TF's average pooling, its max-pool quirk in the last block) with the pytorch-fid/torch-fidelity conversion of the
TF weights (`pt_inception-2015-12-05-6726825d.pth`). It is the one piece of this module we do not write
ourselves, and it sits behind one function, `load_inception`; the arithmetic is ours:

- FID: `frechet_distance` on the samples' pool_3 mean/covariance and the reference file's STORED mu/sigma (the
  reference images are only run through the network when the file has no stored statistics); the matrix square
  root, the eps offset for singular products and the imaginary-part check are the ADM evaluator's.
- IS: `inception_score` from the logits without the final bias (ADM multiplies pool_3 by the softmax weights
  only), 10 splits. ADM splits the file in its order; our npz files are class-ordered (image i has class
  i // per_class), so the splits are taken from one fixed random permutation (seed 0) instead.
- precision/recall (`--precision-recall`): the k=3 nearest-neighbour manifolds of both feature sets as in ADM,
  squared distances in float32 (ADM: float16 with a float32 fallback). Needs the reference images' features.
- sFID (ADM's spatial features, mixed_6/conv) is not computed.

npz files are read in batches straight from the archive (a 50k x 256 x 256 x 3 file is 9.8 GB), never whole.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import types
import warnings
import zipfile

import numpy as np

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name of the converted TF weights
WEIGHTS_NAMES = (WEIGHTS_NAME, "weights-inception-2015-12-05-6726825d.pth")  # ... and torch-fidelity's
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
WEIGHTS_ENV = "VAR_RT_INCEPTION_WEIGHTS"
FIDELITY_PIN = "torch-fidelity==0.4.0"
IS_SPLITS = 10
IS_SEED = 0
PR_K = 3  # ADM's nhood_sizes=(3,)
ADM_REF_SIZE = 256


# ----------------------------------------------------------------------------------------------- arithmetic

def feature_stats(feats: np.ndarray):
    """Mean and covariance (rows are observations, unbiased as np.cov) in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"statistics need at least 2 feature vectors (got shape {f.shape})")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), as the ADM evaluator (and pytorch-fid) compute it:
    scipy.linalg.sqrtm of the product; if that is not finite, eps is added to both diagonals and it is redone;
    an imaginary part is dropped when the diagonal's is within 1e-3 of zero, an error otherwise."""
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"Frechet distance of mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # singular products are handled just below
        covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product of covariances; adding {eps} to their diagonals", RuntimeWarning,
                      stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrt of the covariance product has an imaginary component "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS, seed: int | None = IS_SEED):
    """(mean, std) over `splits` parts of exp(E_x KL(p(y|x) || p(y))), p(y) the part's mean prediction.
    seed None: parts in the given order (the ADM evaluator's way); else one fixed permutation first.
    Computed in float64 from the logits (log_softmax, log of the mean by log-sum-exp): a probability that
    underflows to 0 contributes 0, never 0 * log 0."""
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"inception score needs logits (N, classes), got shape {z.shape}")
    n = z.shape[0]
    splits = splits if n >= splits else 1  # fewer images than splits: one split of all (ADM: n < 5000)
    if seed is not None:
        z = z[np.random.RandomState(seed).permutation(n)]
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        part, logpart = p[lo:hi], logp[lo:hi]
        top = logpart.max(axis=0)  # log of the mean prediction, in log space: finite even where p underflows
        logq = top + np.log(np.exp(logpart - top).sum(axis=0)) - np.log(hi - lo)
        kl = (part * (logpart - logq)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
    """Squared Euclidean distances of the rows of a and b (torch, float32), clamped at 0 as ADM does."""
    import torch
    d = (a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None, :]
    return torch.clamp_min(d, 0.0)


def knn_radii(feats, k: int = PR_K, block: int = 2048, device: str = "cpu") -> np.ndarray:
    """Squared distance of each row to its k-th nearest neighbour in the same set (itself counting as the 0th)."""
    import torch
    x = torch.as_tensor(np.asarray(feats, np.float32), device=device)
    if x.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} feature vectors (got {x.shape[0]})")
    out = []
    with _exact_fp32():
        for i in range(0, x.shape[0], block):
            d = _sq_dists(x[i:i + block], x)
            out.append(torch.topk(d, k + 1, dim=1, largest=False).values[:, k].cpu())
    return torch.cat(out).numpy()


def _inside(points, centres, radii, block: int = 2048, device: str = "cpu") -> np.ndarray:
    """For each point: is it within (squared distance <=) the radius of at least one centre?"""
    import torch
    p = torch.as_tensor(np.asarray(points, np.float32), device=device)
    c = torch.as_tensor(np.asarray(centres, np.float32), device=device)
    r = torch.as_tensor(np.asarray(radii, np.float32), device=device)
    out = []
    with _exact_fp32():
        for i in range(0, p.shape[0], block):
            out.append((_sq_dists(p[i:i + block], c) <= r[None, :]).any(dim=1).cpu())
    return torch.cat(out).numpy()


def precision_recall(ref_feats, sample_feats, k: int = PR_K, device: str = "cpu"):
    """Improved precision/recall (Kynkaanniemi et al.) as the ADM evaluator computes it: precision = share of
    samples inside some reference k-NN ball, recall = share of references inside some sample k-NN ball."""
    r_ref = knn_radii(ref_feats, k, device=device)
    r_smp = knn_radii(sample_feats, k, device=device)
    precision = float(_inside(sample_feats, ref_feats, r_ref, device=device).mean())
    recall = float(_inside(ref_feats, sample_feats, r_smp, device=device).mean())
    return precision, recall


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 in convolutions or matmuls while features and distances are computed (CUDA's default for cuDNN)."""
    import torch
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------- npz files

class NpzImages:
    """arr_0 of an npz file: uint8 (N, H, W, 3), checked from its header, read in batches from the archive."""

    def __init__(self, path: str, key: str = "arr_0"):
        self.path, self.key = path, key
        member = key + ".npy"
        with _open_zip(path) as zf:
            if member not in zf.namelist():
                raise ValueError(f"{path}: no {key} in the npz (it has: {', '.join(_keys(zf)) or 'nothing'})")
            with zf.open(member) as f:
                self.shape, self.fortran, dtype, self.offset = _npy_header(f, path, key)
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3:
            hint = ""
            if dtype.kind == "f":
                hint = " (float images: scale to 0..255, round and cast to uint8 first)"
            elif len(self.shape) == 4 and self.shape[1] == 3:
                hint = " (this looks like NCHW: transpose to NHWC)"
            raise ValueError(f"{path}: {key} must be uint8 images (N, H, W, 3), got {dtype} {tuple(self.shape)}{hint}")
        self.n, self.height, self.width = int(self.shape[0]), int(self.shape[1]), int(self.shape[2])
        if self.n < 2 or self.height < 1 or self.width < 1:
            raise ValueError(f"{path}: {key} has shape {tuple(self.shape)}; at least 2 non-empty images are needed")

    def batches(self, batch: int):
        """Yields uint8 (b, H, W, 3) arrays in file order."""
        if self.offset is None or self.fortran:  # unusual layouts: read whole
            arr = np.load(self.path)[self.key]
            for i in range(0, self.n, batch):
                yield np.ascontiguousarray(arr[i:i + batch])
            return
        with _open_zip(self.path) as zf, zf.open(self.key + ".npy") as f:
            f.read(self.offset)
            for i in range(0, self.n, batch):
                out = np.empty((min(batch, self.n - i), self.height, self.width, 3), np.uint8)
                _read_into(f, out, self.path)
                yield out


class Reference:
    """The reference npz: stored `mu`/`sigma` (ADM's VIRTUAL_*.npz) and/or reference images `arr_0`."""

    def __init__(self, path: str):
        self.path = path
        with _open_zip(path) as zf:
            keys = set(_keys(zf))
        self.images = NpzImages(path) if "arr_0" in keys else None
        self.mu = self.sigma = None
        if "mu" in keys or "sigma" in keys:
            if not {"mu", "sigma"} <= keys:
                raise ValueError(f"{path}: has {'mu' if 'mu' in keys else 'sigma'} but not "
                                 f"{'sigma' if 'mu' in keys else 'mu'}; both or neither")
            with np.load(path) as z:
                mu, sigma = z["mu"], z["sigma"]
            if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or mu.dtype.kind != "f" \
                    or sigma.dtype.kind != "f":
                raise ValueError(f"{path}: mu must be float (D,) and sigma float (D, D), got mu {mu.dtype} "
                                 f"{mu.shape}, sigma {sigma.dtype} {sigma.shape}")
            if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                raise ValueError(f"{path}: mu/sigma contain NaN or inf")
            if not np.allclose(sigma, sigma.T, rtol=1e-5, atol=1e-8):
                raise ValueError(f"{path}: sigma is not symmetric, so not a covariance matrix")
            self.mu, self.sigma = mu.astype(np.float64), sigma.astype(np.float64)
        elif self.images is None:
            raise ValueError(f"{path}: neither stored statistics (mu, sigma) nor reference images (arr_0) "
                             f"(it has: {', '.join(sorted(keys)) or 'nothing'})")

    @property
    def has_stats(self) -> bool:
        return self.mu is not None


@contextlib.contextmanager
def _open_zip(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not an npz file (np.savez writes one)") from None
    with zf:
        yield zf


def _keys(zf):
    return sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))


def _npy_header(f, path, key):
    """(shape, fortran_order, dtype, bytes before the data or None) of an .npy stream."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:  # let np.load parse the rest
            with np.load(path, mmap_mode=None) as z:
                a = z[key]
            return a.shape, False, a.dtype, None
    except ValueError as e:
        raise ValueError(f"{path}: {key} is not a readable array ({e})") from None
    return shape, fortran, dtype, f.tell()


def _read_into(f, out: np.ndarray, path):
    """Fill `out` from the stream (a zip member may return fewer bytes than asked)."""
    view, got = memoryview(out).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise ValueError(f"{path}: truncated (arr_0 ends early)")
        got += n


# ----------------------------------------------------------------------------------------------- the network

def weights_cache_dir() -> str:
    """Where torch-fidelity and pytorch-fid cache their download: the torch hub's checkpoints folder."""
    import torch
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def find_weights(path: str | None = None) -> str:
    """--inception-weights, else $VAR_RT_INCEPTION_WEIGHTS, else either library's name in the hub cache."""
    for given, what in ((path, "--inception-weights"), (os.environ.get(WEIGHTS_ENV), WEIGHTS_ENV)):
        if given:
            if not os.path.isfile(given):
                raise FileNotFoundError(f"{what} {given}: no such file (the Inception weights {WEIGHTS_NAME})")
            return given
    cache = weights_cache_dir()
    for name in WEIGHTS_NAMES:
        if os.path.isfile(os.path.join(cache, name)):
            return os.path.join(cache, name)
    raise ValueError(f"FID needs the Inception weights ({WEIGHTS_NAME}): pass --inception-weights PATH or put it "
                     f"in {cache} (or set {WEIGHTS_ENV}); download once with: curl -L --create-dirs -o "
                     f"{os.path.join(cache, WEIGHTS_NAME)} {WEIGHTS_URL}")


def _inception_class():
    """torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3, without torchvision: the
    package's __init__ imports every feature extractor (CLIP, VGG, DINOv2 need torchvision), the Inception one
    needs only torch, so the package is entered through a bare parent module when it is not imported yet."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name not in sys.modules:
        spec = importlib.util.find_spec("torch_fidelity")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"FID needs torch-fidelity's port of the TF Inception: pip install --no-deps "
                             f"{FIDELITY_PIN} scipy (torchvision is not needed)")
        bare = "torch_fidelity" not in sys.modules
        if bare:
            pkg = types.ModuleType("torch_fidelity")
            pkg.__path__ = list(spec.submodule_search_locations)
            sys.modules["torch_fidelity"] = pkg
        try:
            importlib.import_module(name)
        except Exception as e:
            raise ValueError(f"cannot import {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             f"var-rt fid is tested with {FIDELITY_PIN}") from None
        finally:
            if bare:
                sys.modules.pop("torch_fidelity", None)
    return sys.modules[name].FeatureExtractorInceptionV3


def fidelity_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("torch-fidelity")
    except Exception:
        return None


def load_inception(weights: str, device: str):
    """The feature extractor: a function from uint8 (B, H, W, 3) numpy images to (pool_3 (B, 2048), logits
    without bias (B, 1008)), float32 numpy. Any size goes in; the network resizes to 299 px as the TF graph."""
    import torch
    cls = _inception_class()
    try:
        net = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"cannot load the Inception weights {weights} ({type(e).__name__}: {msg[:300]})") from None
    net = net.to(device).eval()

    def extract(batch: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2)
        with torch.no_grad(), _exact_fp32():
            pool, logits = net(x)
        return pool.float().cpu().numpy(), logits.float().cpu().numpy()

    return extract


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- the command

def features(images: NpzImages, extract, batch: int, desc: str, quiet: bool):
    """(pool_3, logits) of all images, in file order, with a progress bar on stderr."""
    from tqdm import tqdm
    pools, logits = [], []
    with tqdm(total=images.n, unit="img", desc=desc, disable=quiet, dynamic_ncols=True) as bar:
        for b in images.batches(batch):
            p, l = extract(b)
            if p.shape[0] != b.shape[0] or l.shape[0] != b.shape[0]:
                raise RuntimeError(f"feature extractor returned {p.shape[0]}/{l.shape[0]} rows for {b.shape[0]} images")
            pools.append(np.asarray(p, np.float32))
            logits.append(np.asarray(l, np.float32))
            bar.update(b.shape[0])
    return np.concatenate(pools), np.concatenate(logits)


def run(a) -> int:
    """`var-rt fid SAMPLES.npz --ref REF.npz`: prints FID and IS (and precision/recall), writes --json."""
    import torch
    import var_rt
    log = (lambda *_: None) if a.quiet else (lambda *x: print(*x, flush=True))
    if a.batch < 1:
        raise ValueError(f"--batch must be >= 1 (got {a.batch})")
    samples = NpzImages(a.npz)  # headers first: a wrong file is reported before anything slow
    ref = Reference(a.ref)
    if a.precision_recall and ref.images is None:
        raise ValueError(f"--precision-recall needs the reference images (arr_0) in {a.ref}")
    try:
        import scipy  # noqa: F401
    except ImportError:
        raise ValueError("FID needs scipy (its matrix square root): pip install scipy (or var_rt[fid])") from None
    weights = find_weights(a.inception_weights)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extract = load_inception(weights, device)
    notes = []
    if samples.height != ADM_REF_SIZE or samples.width != ADM_REF_SIZE:
        notes.append(f"samples are {samples.height}x{samples.width}; the ADM reference batch is 256x256 and "
                     "LlamaGen's 384 px numbers are for samples resized to 256 (bicubic) before evaluation")
    log(f"var-rt fid: {samples.n} samples ({samples.height}x{samples.width}) from {a.npz}; reference {a.ref}; "
        f"Inception {weights} on {device}")
    s_pool, s_logits = features(samples, extract, a.batch, "samples", a.quiet)
    mu, sigma = feature_stats(s_pool)
    r_pool = None
    if a.precision_recall or not ref.has_stats:
        r_pool, _ = features(ref.images, extract, a.batch, "reference", a.quiet)
    if ref.has_stats:
        ref_mu, ref_sigma = ref.mu, ref.sigma
        source = "stored mu/sigma"
    else:
        ref_mu, ref_sigma = feature_stats(r_pool)
        source = f"computed from its {ref.images.n} images (no stored mu/sigma)"
        notes.append(f"the reference file has no mu/sigma: statistics computed from its {ref.images.n} images")
        log(f"var-rt fid: note: {a.ref} has no mu/sigma; statistics computed from its {ref.images.n} images")
    if ref_mu.shape[0] != mu.shape[0]:
        raise ValueError(f"{a.ref}: mu has {ref_mu.shape[0]} dims but the Inception pool_3 features have "
                         f"{mu.shape[0]}; a reference for another network?")
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    is_mean, is_std = inception_score(s_logits, IS_SPLITS, IS_SEED)
    precision = recall = None
    if a.precision_recall:
        precision, recall = precision_recall(r_pool, s_pool, PR_K, device=device)
    if samples.n != 50000:
        notes.append(f"{samples.n} samples; the papers' numbers are for 50,000 (FID is biased upward for fewer)")
    if samples.n <= mu.shape[0]:
        notes.append(f"{samples.n} samples for {mu.shape[0]}-d features: the sample covariance is rank-deficient")
    result = {
        "fid": fid, "inception_score": is_mean, "inception_score_std": is_std,
        "precision": precision, "recall": recall, "sfid": None,
        "n_samples": samples.n, "image_size": [samples.height, samples.width],
        "samples": os.path.abspath(a.npz), "ref": os.path.abspath(a.ref), "ref_stats": source,
        "n_ref_images": ref.images.n if ref.images is not None else None,
        "protocol": {
            "evaluator": "ADM (openai/guided-diffusion evaluations/evaluator.py)",
            "network": "TF Inception 2015-12-05 via torch-fidelity inception-v3-compat; pool_3 (2048) for "
                       "FID/PR, logits without bias (1008) for IS; resize to 299 inside the network",
            "is_splits": IS_SPLITS if samples.n >= IS_SPLITS else 1,
            "is_split_order": f"fixed random permutation (seed {IS_SEED})",
            "precision_recall": f"k={PR_K}, float32 distances" if a.precision_recall else
                                "not computed (pass --precision-recall)",
            "sfid": "not computed",
        },
        "inception_weights": os.path.abspath(weights), "inception_weights_sha256": sha256(weights),
        "torch_fidelity": fidelity_version(), "device": device, "batch": a.batch, "notes": notes,
        "versions": {"var_rt": var_rt.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    print(f"FID {fid:.4f}  (reference {a.ref}: {source})")
    print(f"IS  {is_mean:.3f} +- {is_std:.3f}  ({result['protocol']['is_splits']} splits)")
    if precision is not None:
        print(f"precision {precision:.4f}  recall {recall:.4f}  (k={PR_K})")
    for n in notes:
        log(f"var-rt fid: note: {n}")
    if a.json:
        from var_rt.images import atomic_path  # missing folders made; Ctrl-C or a crash leaves no partial file
        with atomic_path(a.json, suffix=".json") as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        log(f"var-rt fid: wrote {a.json}")
    return 0
