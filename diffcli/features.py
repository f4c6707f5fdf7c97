"""Feature extractors for eval-fid, registered into torch-fidelity, and the digits Fréchet distance.

Two extractors (``EXTRACTORS``), both plugged into torch-fidelity's registry so that its own metric code
(FID, KID, IS, precision/recall) runs on them unchanged:

``digits``     a small CNN trained on the digits *train* split (``diffcli.data.digits_arrays("train")``),
               deterministic from a seed, cached as safetensors in ``$XDG_CACHE_HOME/diffcli`` (default
               ``~/.cache/diffcli``). Features: ``features`` (64-d penultimate activations; FID/KID/PR) and
               ``logits`` (10 classes; IS and class accuracy). It scores ≥ 97% on the held-out test split.
               Inception on 8×8 greyscale digits is meaningless; this is the digits analogue.
``inception``  torch-fidelity's InceptionV3 (the standard FID network, TF-compatible 299×299 bilinear resize).
               The weights come from ``--inception-weights PATH`` (.safetensors, or the official .pth read
               with ``torch.load(weights_only=True)``, which cannot run code) or the torch hub cache; when
               neither exists and the download fails, a UserError says where to put the file.

Every extractor takes uint8 images (B, C, H, W) in [0, 255] — torch-fidelity's convention — so that a
folder of PNGs and the same images held in memory give the same numbers.

Quick use (e.g. in a training benchmark)::

    from diffcli.features import digits_frechet_distance
    fd = digits_frechet_distance(samples, reference)   # float tensors (N, 1, 8, 8) in [-1, 1], N ≥ 2
    # or from statistics: frechet_distance(mu1, sigma1, mu2, sigma2)

``digits_frechet_distance`` quantises both sets to uint8 exactly as PNG files are written
(``diffcli.images.to_uint8``), so it matches ``diffcli eval-fid --extractor digits`` on saved samples.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError

DIGITS_EXTRACTOR = "diffcli-digits"  # names in torch-fidelity's registry
INCEPTION_EXTRACTOR = "diffcli-inception"
EXTRACTORS = {"digits": DIGITS_EXTRACTOR, "inception": INCEPTION_EXTRACTOR}
DIGITS_VERSION = "1"  # bump when the network or its training changes: old cache files are then ignored
DIGITS_FEATURE_DIM = 64
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FEATURE_DIM = 2048


def cache_dir() -> Path:
    """The user cache folder: ``$XDG_CACHE_HOME/diffcli`` or ``~/.cache/diffcli``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "diffcli"


def tensors_hash(tensors: dict[str, Tensor], n: int = 16) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every tensor in name order: identifies weights
    independently of file metadata."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    return h.hexdigest()[:n]


# --- the digits classifier -------------------------------------------------------------------------------
class DigitsNet(nn.Module):
    """Small CNN for 8×8 greyscale digits: float (B, 1, 8, 8) in [-1, 1] → (features (B, 64), logits (B, 10)).

    Kept small on purpose: it trains in seconds on one CPU thread and still scores ≈ 98% on the test split."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, DIGITS_FEATURE_DIM)
        self.fc2 = nn.Linear(DIGITS_FEATURE_DIM, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 4×4
        f = F.relu(self.fc1(h.flatten(1)))
        return f, self.fc2(self.drop(f))


@dataclass
class DigitsClassifier:
    """A trained DigitsNet (eval mode) with its weights hash, seed, test accuracy and cache file."""

    net: DigitsNet
    hash: str
    seed: int
    test_accuracy: float
    path: Path | None

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        """Class ids (N,) int64 of float images (N, 1, 8, 8) in [-1, 1]."""
        dev = next(self.net.parameters()).device
        out = [self.net(images[i:i + batch_size].to(dev, torch.float32))[1].argmax(1).cpu()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


@contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG for init and dropout without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Random translation by up to one pixel per image (pad with background −1, crop), from `g`."""
    b = len(x)
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (b,), generator=g)
    dx = torch.randint(0, 3, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(8)[None])  # (B, 8)
    cols = (dx[:, None] + torch.arange(8)[None])
    idx_b = torch.arange(b)[:, None, None]
    return pad[idx_b, 0, rows[:, :, None], cols[:, None, :]][:, None]


def train_digits_classifier(seed: int = 0, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3) -> DigitsNet:
    """Train DigitsNet on the digits train split, deterministically from `seed` (CPU, float32, a few seconds).

    Adam with a cosine learning-rate decay, ±1-pixel shifts as augmentation; every random draw (init,
    shuffling, shifts, dropout) comes from `seed`. One intra-op thread: faster for a net this small and
    free of thread-count-dependent reductions."""
    from .data import digits_arrays

    x_np, y_np = digits_arrays("train")
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y, g, seed, epochs, batch_size, lr)
    finally:
        torch.set_num_threads(threads)


def _train(x: Tensor, y: Tensor, g: torch.Generator, seed: int, epochs: int, batch_size: int, lr: float) -> DigitsNet:
    with _seeded(seed):
        net = DigitsNet()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        steps = epochs * ((len(x) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                _, logits = net(_shift(x[idx], g))
                loss = F.cross_entropy(logits, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net.eval()


def digits_test_accuracy(net: DigitsNet) -> float:
    """Accuracy on the 360 held-out digits (the `test` split, never seen in training)."""
    from .data import digits_arrays

    x, y = digits_arrays("test")
    with torch.no_grad():
        pred = net(torch.from_numpy(x))[1].argmax(1).numpy()
    return float((pred == y).mean())


def digits_classifier_path(seed: int = 0) -> Path:
    return cache_dir() / f"digits_classifier_v{DIGITS_VERSION}_seed{seed}.safetensors"


_LOADED: dict[tuple[str, int], DigitsClassifier] = {}


def load_digits_classifier(seed: int = 0, device: str | torch.device = "cpu",
                           log=None) -> DigitsClassifier:
    """The digits classifier for `seed`: from the cache file when valid, else trained (seconds) and cached.

    A cache file that is corrupt, of another version or seed, or whose weights do not match its recorded
    hash is retrained and replaced (atomic write)."""
    from .checkpoint import read_safetensors, save_safetensors

    path = digits_classifier_path(seed)
    key = (str(path), seed)
    if key in _LOADED:
        clf = _LOADED[key]
        clf.net.to(device)
        return clf
    net = DigitsNet()
    clf = None
    if path.exists():
        try:
            tensors, meta = read_safetensors(path)
            if (meta.get("kind") == "digits-classifier" and meta.get("version") == DIGITS_VERSION
                    and meta.get("seed") == str(seed) and meta.get("hash") == tensors_hash(tensors)):
                net.load_state_dict(tensors, strict=True)
                clf = DigitsClassifier(net.eval(), meta["hash"], seed, float(meta["test_accuracy"]), path)
        except (UserError, RuntimeError, KeyError, ValueError):
            clf = None  # unusable cache file: retrain below and replace it
    if clf is None:
        if log:
            log(f"training the digits feature extractor (seed {seed}) → {path}")
        net = train_digits_classifier(seed)
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        h = tensors_hash(sd)
        acc = digits_test_accuracy(net)
        try:
            save_safetensors(path, sd, {"kind": "digits-classifier", "version": DIGITS_VERSION, "seed": str(seed),
                                        "hash": h, "test_accuracy": repr(acc),
                                        "trained_on": "digits train split (1437 images)"})
        except Exception:  # a read-only cache is not fatal: the classifier is deterministic anyway
            path = None
        clf = DigitsClassifier(net, h, seed, acc, path)
    clf.net.requires_grad_(False)
    clf.net.to(device)
    _LOADED[key] = clf
    return clf


# --- torch-fidelity extractors ---------------------------------------------------------------------------
def _tf():
    import torch_fidelity  # noqa: F401  (heavy: imported only when a metric is computed)
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    return FeatureExtractorBase, FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor


def _make_digits_extractor_class():
    FeatureExtractorBase, _, _ = _tf()

    class FeatureExtractorDigits(FeatureExtractorBase):
        """torch-fidelity extractor over the digits classifier. Input uint8 (B, 1, 8, 8).

        kwargs: ``digits_seed`` (int, default 0) picks the classifier."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            clf = load_digits_classifier(int(kwargs.get("digits_seed", 0) or 0))
            self.net = DigitsNet()
            self.net.load_state_dict(clf.net.state_dict())
            self.weights_hash = clf.hash
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return "features", "logits"

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1:] == (1, 8, 8)):
                raise ValueError(f"digits extractor expects uint8 (B, 1, 8, 8), got {getattr(x, 'shape', x)}")
            f, logits = self.net(x.float() / 127.5 - 1)
            out = {"features": f, "logits": logits}
            return tuple(out[k] for k in self.features_list)

    return FeatureExtractorDigits


def inception_hub_path() -> Path:
    """Where torch hub (and torch-fidelity) keep the InceptionV3 weights: $TORCH_HOME/hub/checkpoints/…"""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def load_inception_state_dict(path: str | Path | None, timeout: float = 30.0) -> dict[str, Tensor]:
    """InceptionV3 weights without unpickling code: a .safetensors file, or the official .pth through
    ``torch.load(weights_only=True)``. `path` None: the torch hub cache, downloading it there if missing.
    Every failure is a UserError that says where to put the file."""
    where = (f"download {INCEPTION_URL} on a machine with internet and pass --inception-weights PATH, "
             f"or put it at {inception_hub_path()}")
    if path is None:
        path = inception_hub_path()
        if not path.exists():
            _download(INCEPTION_URL, path, timeout, where)
    p = Path(path)
    if not p.exists():
        raise UserError(f"--inception-weights {str(p)!r}: no such file; {where}")
    if p.is_dir():
        raise UserError(f"--inception-weights {str(p)!r}: is a folder, not a weights file; {where}")
    if p.suffix == ".safetensors":
        from .checkpoint import read_safetensors

        sd, _ = read_safetensors(p)
        return sd
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not the weights file"
        raise UserError(f"--inception-weights {str(p)!r}: not a readable InceptionV3 weights file "
                        f"({e.__class__.__name__}); {where}") from None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise UserError(f"--inception-weights {str(p)!r}: not a state dict of tensors; {where}")
    return sd


def _download(url: str, dest: Path, timeout: float, where: str) -> None:
    import urllib.request

    from .checkpoint import atomic_write_bytes

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - fixed https URL
            data = r.read()
    except Exception as e:  # noqa: BLE001 - offline, DNS, proxy, HTTP errors all mean "cannot fetch"
        raise UserError(f"--extractor inception: cannot fetch the InceptionV3 weights ({e.__class__.__name__}: "
                        f"{str(e)[:80]}); {where}") from None
    atomic_write_bytes(dest, data)


def _make_inception_extractor_class():
    _tf()
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe_inc

    class FeatureExtractorInceptionSafe(fe_inc.FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3, unchanged, except that its weights are loaded by
        `load_inception_state_dict` (torch-fidelity itself reads local files with ``weights_only=False``,
        i.e. arbitrary pickles, which diffcli never does). kwargs: ``feature_extractor_weights_path``."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            sd = load_inception_state_dict(feature_extractor_weights_path)
            self.weights_hash = tensors_hash(sd)
            # torch-fidelity's constructor fetches the state dict itself; hand it ours instead.
            with mock.patch.object(fe_inc, "load_state_dict_from_url", lambda *a, **k: sd):
                try:
                    super().__init__(name, features_list, feature_extractor_weights_path=None, **kwargs)
                except RuntimeError as e:
                    raise UserError(f"--inception-weights: the file does not hold InceptionV3 weights "
                                    f"({str(e).splitlines()[0][:100]})") from None

    return FeatureExtractorInceptionSafe


def register_extractors() -> None:
    """Register ``diffcli-digits`` and ``diffcli-inception`` in torch-fidelity (idempotent)."""
    _, registry, register = _tf()
    if DIGITS_EXTRACTOR not in registry:
        register(DIGITS_EXTRACTOR, _make_digits_extractor_class())
    if INCEPTION_EXTRACTOR not in registry:
        register(INCEPTION_EXTRACTOR, _make_inception_extractor_class())


def create_extractor(name: str, layers: list[str], *, device: torch.device | str = "cpu",
                     inception_weights: str | Path | None = None, digits_seed: int = 0):
    """A torch-fidelity feature extractor by diffcli name (``digits`` | ``inception``), eval mode, on `device`."""
    if name not in EXTRACTORS:
        raise UserError(f"--extractor {name!r}: unknown; choose one of {', '.join(EXTRACTORS)}")
    register_extractors()
    from torch_fidelity.utils import create_feature_extractor

    kw = {"verbose": False, "digits_seed": digits_seed}
    if inception_weights is not None:
        kw["feature_extractor_weights_path"] = str(inception_weights)
    fe = create_feature_extractor(EXTRACTORS[name], list(layers), cuda=False, **kw)
    return fe.to(device)


def default_layer(name: str, metric: str) -> str:
    """The feature layer torch-fidelity uses for `metric` (isc, fid, kid, prc) with extractor `name`."""
    register_extractors()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[EXTRACTORS[name]].get_default_feature_layer_for_metric(metric)


class UInt8Images(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as a torch Dataset, torch-fidelity's input type."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def extract_features(extractor, images_u8: Tensor, batch_size: int = 256,
                     device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Features of uint8 images (N, C, H, W) through torch-fidelity's own extraction loop: {layer: (N, D)}."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    cuda = torch.device(device).type == "cuda"
    return get_featuresdict_from_dataset(UInt8Images(images_u8), extractor, min(batch_size, len(images_u8)),
                                         cuda, True, False)


# --- Fréchet distance ------------------------------------------------------------------------------------
def feature_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of features (N, D) by torch-fidelity's `fid_features_to_statistics`."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    s = fid_features_to_statistics(features.detach().cpu().to(torch.float64))
    return s["mu"], s["sigma"]


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. for FID):
    ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), computed by torch-fidelity's `fid_statistics_to_metric`.
    Arrays or tensors: mu (D,), sigma (D, D)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    def arr(v):
        return np.asarray(v.detach().cpu().numpy() if torch.is_tensor(v) else v, dtype=np.float64)

    return float(fid_statistics_to_metric({"mu": arr(mu1), "sigma": arr(sigma1)},
                                          {"mu": arr(mu2), "sigma": arr(sigma2)}, False)[KEY_METRIC_FID])


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (N, C, H, W) → uint8, exactly as sample PNGs are written."""
    from .images import to_uint8 as _u8

    return _u8(images)


def digits_features(images: Tensor, seed: int = 0) -> Tensor:
    """64-d digits-classifier features (N, 64) of float images (N, 1, 8, 8) in [-1, 1] (or uint8)."""
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise UserError(f"digits features need images shaped (N, 1, 8, 8), got {tuple(images.shape)}")
    u8 = images if images.dtype == torch.uint8 else to_uint8(images)
    fe = create_extractor("digits", ["features"], digits_seed=seed)
    return extract_features(fe, u8)["features"]


def digits_frechet_distance(a: Tensor, b: Tensor, seed: int = 0) -> float:
    """The digits FID-analogue between two image sets, each (N, 1, 8, 8) float in [-1, 1] (or uint8), N ≥ 2.

    Features: the cached digits classifier's 64-d penultimate layer (trained on first use, seconds);
    statistics and distance: torch-fidelity's. Same number as ``diffcli eval-fid --extractor digits --metrics
    fid`` on the same images. Note the covariance has rank < 64 when N ≤ 64: use N in the hundreds or more."""
    for name, x in (("a", a), ("b", b)):
        if len(x) < 2:
            raise UserError(f"digits_frechet_distance: set {name} has {len(x)} image(s); need at least 2")
    mu1, s1 = feature_statistics(digits_features(a, seed))
    mu2, s2 = feature_statistics(digits_features(b, seed))
    return frechet_distance(mu1, s1, mu2, s2)


def class_accuracy(images: Tensor, labels: Tensor, seed: int = 0) -> float:
    """Fraction of class-conditional samples (N, 1, 8, 8) in [-1, 1] that the digits classifier assigns to
    their own label (N,): does a sample of class k look like a k?"""
    clf = load_digits_classifier(seed)
    x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else to_uint8(images).float() / 127.5 - 1
    pred = clf.predict(x)
    return float((pred == labels.cpu().long()).float().mean())
