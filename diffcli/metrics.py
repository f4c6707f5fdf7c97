"""The eval-fid engine: FID, KID, IS and precision/recall through torch-fidelity, with the protocol recorded.

Generated set:  a checkpoint (sampled on the fly with per-sample seeds), a sample folder (`images/` +
                `sample.json`, whose labels and settings are carried over) or a folder of images.
Reference set:  a dataset by name + split (features cached by (dataset, split, channels×resolution,
                extractor, extractor hash) in ``$XDG_CACHE_HOME/diffcli/ref_stats``), a folder of images, or a
                statistics file written by that cache. For a checkpoint it defaults to the dataset and split
                of the checkpoint's embedded recipe.
Metrics:        torch-fidelity's own functions on features from a torch-fidelity feature extractor
                (`diffcli.features`): `fid_statistics_to_metric`, `kid_features_to_metric`,
                `isc_features_to_metric`, `prc_features_to_metric`. Nothing is re-implemented here.

Processes:      under torchrun (`diffcli eval-fid --nproc N`) every rank generates and extracts the features of
                a batch-aligned block of the image indices; rank 0 gathers the features, scores and writes
                (docs/SCALING.md). The numbers are those of one process.

Images travel as uint8 (N, C, H, W), torch-fidelity's convention; generated samples are quantised exactly as
sample PNGs are written, so a checkpoint and its sample folder give the same numbers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .recipes import MAX_STEPS

METRICS = ("fid", "kid", "is", "pr")
DEFAULT_N = 10_000
STANDARD_N = 10_000  # below this FID is noticeably biased upward; warn
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_NEIGHBORHOOD = 3
IS_SPLITS = 10
REF_STATS_KIND = "diffcli-ref-stats"
REF_STATS_VERSION = "1"
EXTRACTOR_INPUT = {"digits": "native 1×8×8 (no resize inside the extractor)",
                   "inception": "torch-fidelity TF1-compatible bilinear resize to 299×299, grey → RGB"}


# --- image sets ------------------------------------------------------------------------------------------
@dataclass
class ImageSet:
    """uint8 images (N, C, H, W), optional labels (N,), and a description for the protocol record."""

    images: Tensor
    labels: Tensor | None
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]


def parse_metrics(text: str | None) -> tuple[list[str], bool]:
    """`--metrics fid,kid` → (["fid", "kid"], explicit); None → every metric, not explicit."""
    if text is None:
        return list(METRICS), False
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    aliases = {"isc": "is", "prc": "pr", "precision": "pr", "recall": "pr"}
    names = [aliases.get(n, n) for n in names]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise UserError(f"--metrics {text!r}: unknown metric {bad[0] if bad else '(none)'!r}; choose from "
                        f"{', '.join(METRICS)}")
    return list(dict.fromkeys(names)), True


def parse_int_list(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    out = []
    for t in text.split(","):
        t = t.strip()
        try:
            v = int(t)
        except ValueError:
            raise UserError(f"{option} {text!r}: {t!r} is not an integer") from None
        if v < 1:
            raise UserError(f"{option} {text!r}: {v} must be ≥ 1")
        if v > MAX_STEPS:  # finding the steps for a budget counts up to it: a typo's 10^11 would not return
            raise UserError(f"{option} {text!r}: {v} must be at most {MAX_STEPS}")
        out.append(v)
    if not out:
        raise UserError(f"{option} {text!r}: empty")
    return list(dict.fromkeys(out))


def read_folder(folder: Path, option: str, limit: int | None = None) -> Tensor:
    """Every image of a folder (recursively, sorted) as uint8 (N, C, H, W); UserError when the folder is
    missing, empty, unreadable, holds fewer than 2 images or images of mixed sizes or channels."""
    from .data import list_images, read_image
    from .images import to_uint8

    if not folder.exists():
        raise UserError(f"{option} {str(folder)!r}: does not exist")
    if not folder.is_dir():
        raise UserError(f"{option} {str(folder)!r}: not a folder")
    try:
        files = list_images(folder)
    except OSError as e:
        raise UserError(f"{option} {str(folder)!r}: cannot be read ({e.strerror or e})") from None
    if not files:
        raise UserError(f"{option} {str(folder)!r}: holds no images (png, jpg, …)")
    if limit is not None:
        if limit > len(files):
            raise UserError(f"--n {limit}: {option} {str(folder)!r} holds only {len(files)} images")
        files = files[:limit]
    if len(files) < 2:
        for f in files:  # a lone file that is no image is named as such, not counted as one
            read_image(f, None, None)
        raise UserError(f"{option} {str(folder)!r}: holds {len(files)} image; at least 2 are needed")
    out, first = [], None
    for f in files:
        img = read_image(f, None, None)  # UserError naming the file when unreadable
        if first is None:
            first = (f, tuple(img.shape))
        elif tuple(img.shape) != first[1]:
            c, h, w = img.shape
            c0, h0, w0 = first[1]
            raise UserError(f"{option} {str(folder)!r}: images of mixed sizes or channels: {f.name} is {c}×{h}×{w}, "
                            f"{first[0].name} is {c0}×{h0}×{w0}")
        out.append(to_uint8(img[None])[0])
    return torch.stack(out)


def load_generated_folder(folder: Path, n: int | None) -> ImageSet:
    """A sample folder (images/ + sample.json: labels and settings are kept) or a plain folder of images."""
    sample_json = folder / "sample.json"
    if folder.is_dir() and sample_json.is_file() and (folder / "images").is_dir():
        try:
            meta = json.loads(sample_json.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{sample_json}: not readable JSON ({e.__class__.__name__})") from None
        images = read_folder(folder / "images", "GENERATED", n)
        labels = meta.get("labels") if isinstance(meta, dict) else None
        lab, note = None, None
        if isinstance(labels, list) and all(isinstance(v, int) for v in labels):
            # image NNNNNN.png has label NNNNNN: by name, not by position, so that a removed or added file
            # cannot shift every later label onto another image
            from .data import list_images

            names = [f.name for f in list_images(folder / "images")[:len(images)]]
            idx = [int(m.group(1)) for m in (re.fullmatch(r"(\d{6})\.png", nm) for nm in names) if m]
            if len(idx) == len(names) and all(i < len(labels) for i in idx):
                lab = torch.tensor([labels[i] for i in idx], dtype=torch.long)
            else:
                note = (f"class accuracy skipped: {folder / 'images'} holds images that sample.json has no label "
                        f"for (files renamed or added since sampling)")
        info = {"source": "sample-folder", "path": str(folder)}
        if note:
            info["warning"] = note
        keys = ("checkpoint", "checkpoint_sha256", "checkpoint_step", "sampler", "schedule", "steps", "nfe", "seed",
                "cfg", "class")
        info.update({k: meta.get(k) for k in keys} if isinstance(meta, dict) else {})
        guided = meta.get("settings") if isinstance(meta, dict) else None
        if isinstance(guided, dict) and guided.get("classifier"):
            info.update(classifier=guided["classifier"], classifier_scale=guided.get("classifier_scale"))
        return ImageSet(images, lab, info)
    from .data import diffcli_output_images

    images = read_folder(diffcli_output_images(folder) or folder, "GENERATED", n)  # a decode folder: images/
    return ImageSet(images, None, {"source": "folder", "path": str(folder)})


def resize_u8(images: Tensor, resolution: int) -> Tensor:
    """uint8 (N, C, H, W) → (N, C, R, R): centre square crop, then PIL bicubic (up) / Lanczos (down) —
    the same filter the data module uses for datasets."""
    from PIL import Image

    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    out = []
    for img in images:
        arr = img.permute(1, 2, 0).numpy()
        im = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((resolution, resolution), Image.BICUBIC if s < resolution else Image.LANCZOS)
        a = np.asarray(im, dtype=np.uint8)
        out.append(torch.from_numpy((a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1).copy()))
    return torch.stack(out)


# --- reference statistics --------------------------------------------------------------------------------
@dataclass
class Reference:
    """Reference features of the FID/KID/PR layer and their FID statistics."""

    features: Tensor  # (N, D) float32
    mu: np.ndarray
    sigma: np.ndarray
    channels: int
    resolution: int
    extractor: str
    extractor_hash: str
    layer: str
    info: dict

    @property
    def n(self) -> int:
        return len(self.features)


def ref_cache_path(dataset: str, split: str, channels: int, resolution: int, extractor: str, ext_hash: str) -> Path:
    from .features import cache_dir

    return cache_dir() / "ref_stats" / f"{dataset}-{split}-{channels}x{resolution}-{extractor}-{ext_hash}.safetensors"


def save_reference(path: Path, ref: Reference, key: dict) -> None:
    from .checkpoint import save_safetensors

    meta = {"kind": REF_STATS_KIND, "version": REF_STATS_VERSION, "extractor": ref.extractor,
            "extractor_hash": ref.extractor_hash, "layer": ref.layer, "channels": str(ref.channels),
            "resolution": str(ref.resolution), "n": str(ref.n), **{k: str(v) for k, v in key.items()}}
    save_safetensors(path, {"features": ref.features.float(), "mu": torch.from_numpy(ref.mu),
                            "sigma": torch.from_numpy(ref.sigma)}, meta)


def load_stats_file(path: Path, option: str = "--ref") -> Reference:
    """A statistics file written by `save_reference` (e.g. from the cache); UserError if it is not one."""
    from .checkpoint import read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("kind") != REF_STATS_KIND:
        raise UserError(f"{option} {str(path)!r}: not a diffcli statistics file (metadata kind "
                        f"{meta.get('kind')!r}); give a dataset name, a folder, or a file from the statistics cache")
    if meta.get("version") != REF_STATS_VERSION or not {"features", "mu", "sigma"} <= tensors.keys():
        raise UserError(f"{option} {str(path)!r}: statistics file version {meta.get('version')!r} is not supported")
    try:
        ch, res = int(meta["channels"]), int(meta["resolution"])
    except (KeyError, ValueError):
        raise UserError(f"{option} {str(path)!r}: statistics file lacks channels/resolution") from None
    info = {"source": "stats-file", "path": str(path), **{k: meta.get(k) for k in ("dataset", "split")}}
    return Reference(tensors["features"].float(), tensors["mu"].numpy().astype(np.float64),
                     tensors["sigma"].numpy().astype(np.float64), ch, res, meta.get("extractor", "?"),
                     meta.get("extractor_hash", "?"), meta.get("layer", "?"), info)


def _reference_from_images(images: Tensor, ext: "Extractor", info: dict) -> Reference:
    from .features import feature_statistics

    feats = ext.features(images, [ext.layer])[ext.layer].float()
    mu, sigma = feature_statistics(feats)
    return Reference(feats, mu, sigma, images.shape[1], images.shape[-1], ext.name, ext.hash, ext.layer, info)


def dataset_images(name: str, split: str, root: str | None, resolution: int | None = None,
                   path: str | None = None, on_bad_image: str = "fail") -> Tensor:
    """A data-module dataset as uint8 (N, C, H, W) (labels are not needed for a reference)."""
    from pydantic import ValidationError

    from .data import load_dataset
    from .images import to_uint8
    from .recipes import DataConfig

    try:
        cfg = DataConfig(name=name, split=split, root=root or "data", resolution=resolution, path=path,
                         class_conditional=False, on_bad_image=on_bad_image)
    except ValidationError as e:
        err = e.errors()[0]
        raise UserError(f"--ref {name!r} / --ref-split {split!r}: {err.get('msg')}") from None
    data = load_dataset(cfg)
    if data.images is not None:
        return to_uint8(data.images)
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=256, num_workers=0)
    return torch.cat([to_uint8(x) for x, _ in loader])


# --- extractors ------------------------------------------------------------------------------------------
class Extractor:
    """A torch-fidelity feature extractor by diffcli name, with its weights hash and the layers metrics use."""

    def __init__(self, name: str, metrics: list[str], *, device: torch.device, batch_size: int,
                 inception_weights: Path | None = None, digits_seed: int = 0) -> None:
        from .features import EXTRACTORS, create_extractor, default_layer

        if name not in EXTRACTORS:
            raise UserError(f"--extractor {name!r}: unknown; choose one of {', '.join(EXTRACTORS)}")
        if inception_weights is not None and name != "inception":
            raise UserError(f"--inception-weights {str(inception_weights)!r}: only used with --extractor inception "
                            f"(the extractor here is {name!r})")
        self.name, self.device, self.batch_size = name, device, batch_size
        self.layer = default_layer(name, "fid")  # FID, KID and PR share one layer in both extractors
        self.is_layer = default_layer(name, "isc")
        layers = [self.layer] + ([self.is_layer] if "is" in metrics and self.is_layer != self.layer else [])
        self.fe = create_extractor(name, layers, device=device, inception_weights=inception_weights,
                                   digits_seed=digits_seed)
        self.hash = self.fe.weights_hash
        self.weights = str(inception_weights) if inception_weights else (
            "torch hub cache" if name == "inception" else f"digits classifier seed {digits_seed}")

    def check_input(self, shape: tuple[int, int, int], what: str) -> None:
        if self.name == "digits" and shape != (1, 8, 8):
            raise UserError(f"--extractor digits: needs 1×8×8 images (the digits dataset); {what} are "
                            f"{shape[0]}×{shape[1]}×{shape[2]}; use --extractor inception")

    def prepare(self, images: Tensor) -> Tensor:
        if self.name == "inception" and images.shape[1] == 1:
            return images.expand(-1, 3, -1, -1).contiguous()  # what PIL's convert("RGB") does to greyscale
        return images

    def features(self, images: Tensor, layers: list[str]) -> dict[str, Tensor]:
        from .features import extract_features

        self.check_input(tuple(images.shape[1:]), "the images")
        feats = extract_features(self.fe, self.prepare(images), self.batch_size, self.device)
        return {k: feats[k] for k in layers}


def _dataset_names() -> tuple[str, ...]:
    """The dataset names a recipe (and --ref) accepts."""
    from .recipes import DataConfig

    return DataConfig.model_fields["name"].annotation.__args__  # type: ignore[union-attr]


def _ref_is_one_set(ref: str) -> bool:
    """--ref names a statistics file or a folder (one set of images), not a dataset with splits."""
    return Path(ref).suffix == ".safetensors" or ref not in _dataset_names()


def resolve_reference(ref: str | None, split: str | None, data_root: str | None, ext: Extractor, *,
                      default: dict | None, cache: bool, log=None) -> Reference:
    """Reference features from a stats file, a folder, or a dataset (cached). `default` is the checkpoint's
    data config (name, split, root, resolution, path) used when `ref` is None."""
    from .data import diffcli_output_images

    names = _dataset_names()
    if ref is None:
        if default is None:
            raise UserError("--ref is needed: the generated set is a folder without a checkpoint to take the "
                            "training dataset from; give a dataset name (e.g. digits), a folder, or a stats file")
        name, res, root, dpath = default["name"], default.get("resolution"), default.get("root"), default.get("path")
        split = split or default.get("split", "train")
        root = data_root or root
    else:
        p = Path(ref)
        if p.suffix == ".safetensors":
            if not p.is_file():
                raise UserError(f"--ref {ref!r}: statistics file does not exist")
            r = load_stats_file(p)
            if r.extractor != ext.name or r.extractor_hash != ext.hash:
                raise UserError(f"--ref {ref!r}: statistics made with extractor {r.extractor} (hash "
                                f"{r.extractor_hash}), not the {ext.name} extractor in use (hash {ext.hash})")
            return r
        if ref not in names:  # a dataset name wins; write ./digits for a folder of that name
            if not p.exists():
                raise UserError(f"--ref {ref!r}: neither a dataset ({', '.join(n for n in names if n != 'imagefolder')}),"
                                f" a folder, nor a statistics file")
            # a diffcli sample folder (sample.json + images/) is read as GENERATED is: its images/, not grid.png
            sample_folder = diffcli_output_images(p) is not None
            images = read_folder(diffcli_output_images(p) or p, "--ref")
            ext.check_input(tuple(images.shape[1:]), "the reference images")
            return _reference_from_images(images, ext, {"source": "sample-folder" if sample_folder else "folder",
                                                        "path": str(p)})
        if ref == "imagefolder":
            raise UserError("--ref 'imagefolder': give the folder itself as --ref")
        name, res, root, dpath = ref, None, data_root, None
        split = split or "train"
    if split not in ("train", "test", "all"):
        raise UserError(f"--ref-split {split!r}: choose train, test or all")
    t0 = time.perf_counter()
    if name == "imagefolder":  # a checkpoint trained on a folder: no cache (the folder may change)
        # the images as the model was trained on them (resized to data.resolution, data.on_bad_image applied),
        # not the raw files: a folder of 32×32 images trained at 16, or with a skipped bad file, is its data too
        images = dataset_images(name, split, root, res, path=dpath,
                                on_bad_image=(default or {}).get("on_bad_image", "fail"))
        return _reference_from_images(images, ext, {"source": "folder", "path": dpath})
    images = None
    if res is None and name == "digits":
        res = 8
    if res is None:
        images = dataset_images(name, split, root)
        res = images.shape[-1]
    channels = 1 if name in ("digits", "mnist") else 3
    path = ref_cache_path(name, split, channels, res, ext.name, ext.hash)
    info = {"source": "dataset", "dataset": name, "split": split, "stats_file": str(path)}
    if cache and path.is_file():
        try:
            r = load_stats_file(path, "cache")
            if (r.extractor, r.extractor_hash, r.channels, r.resolution) == (ext.name, ext.hash, channels, res):
                r.info = {**info, "cache": "hit"}
                return r
        except UserError:
            pass  # a corrupt or foreign cache file: recompute and replace it
        if log:
            log(f"stale statistics cache {path}: recomputing")
    if images is None:
        images = dataset_images(name, split, root, res)
    ext.check_input(tuple(images.shape[1:]), f"the {name} images")
    r = _reference_from_images(images, ext, {**info, "cache": "miss" if cache else "off"})
    r.info["seconds"] = round(time.perf_counter() - t0, 3)
    if cache:
        save_reference(path, r, {"dataset": name, "split": split})
    return r


# --- metrics ---------------------------------------------------------------------------------------------
def compute_metrics(gen: dict[str, Tensor], ref: Reference, metrics: list[str], *, layer: str, is_layer: str,
                    seed: int = 2020) -> dict[str, float]:
    """torch-fidelity's metrics between generated features {layer: (N, D)} and a Reference.

    Keys: frechet_distance, kid_mean, kid_std, inception_score_mean, inception_score_std, precision,
    recall, f_score (those of `metrics`)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    from .features import feature_statistics, frechet_distance

    f1, f2 = gen[layer].float(), ref.features.float()
    n1, n2 = len(f1), len(f2)
    out: dict[str, float] = {}
    if "fid" in metrics:
        mu, sigma = feature_statistics(f1)
        out["fid"] = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    if "kid" in metrics:
        k = kid_features_to_metric(f1, f2, kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset_size(n1, n2),
                                   rng_seed=seed, verbose=False)
        out["kid_mean"], out["kid_std"] = k["kernel_inception_distance_mean"], k["kernel_inception_distance_std"]
    if "is" in metrics:
        s = isc_features_to_metric(gen[is_layer], splits=is_splits(len(gen[is_layer])), shuffle=True,
                                   rng_seed=seed)
        out["is_mean"], out["is_std"] = s["inception_score_mean"], s["inception_score_std"]
    if "pr" in metrics:
        p = prc_features_to_metric(f1, f2, prc_neighborhood=PR_NEIGHBORHOOD, prc_batch_size=10000,
                                   save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"], out["f_score"] = p["precision"], p["recall"], p["f_score"]
    return {k: float(v) for k, v in out.items()}


def small_n_warnings(n_gen: int, n_ref: int, dim: int) -> list[str]:
    w = []
    for what, n in (("generated", n_gen), ("reference", n_ref)):
        if n <= dim:
            w.append(f"{n} {what} images ≤ feature dimension {dim}: the FID covariance is rank-deficient; "
                     f"the number is not comparable to anything")
        elif n < STANDARD_N:
            w.append(f"{n} {what} images < {STANDARD_N:,}: FID is biased upward at small n; compare only numbers "
                     f"computed at the same n")
    return w


def kid_subset_size(n_gen: int, n_ref: int) -> int:
    """Images per KID subset: torch-fidelity's 1,000, or all of the smaller set."""
    return min(KID_SUBSET_SIZE, n_gen, n_ref)


def is_splits(n_gen: int) -> int:
    """IS splits: 10, or one per image below that."""
    return min(IS_SPLITS, n_gen)


def small_n_kid_is_warnings(metrics, n_gen: int, n_ref: int) -> list[str]:
    """KID and IS caveats at small n (FID's are `small_n_warnings`): below ~100 images a KID subset or an
    IS split holds too few images for the number to mean anything — 2 images give IS = 1 exactly."""
    w = []
    subset, splits = kid_subset_size(n_gen, n_ref), is_splits(n_gen)
    if "kid" in metrics and subset < 100:
        w.append(f"KID from subsets of {subset} images is dominated by noise (see its ±); use ≥ 1,000 images per set")
    if "is" in metrics and n_gen // max(1, splits) < 100:
        w.append(f"IS from {splits} split(s) of {n_gen // max(1, splits)} image(s) is not meaningful; use ≥ 1,000 "
                 f"generated images")
    return w


# --- the command -----------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    generated: Path
    ref: str | None = None
    ref_split: str | None = None
    data_root: str | None = None
    metrics: str | None = None
    extractor: str | None = None
    inception_weights: Path | None = None
    sampler: str | None = None  # comma list
    nfe: str | None = None  # comma list
    steps: int | None = None
    schedule: str | None = None
    cfg: float | None = None  # None: the checkpoint recipe's sample.cfg
    classifier: Path | None = None  # classifier guidance while generating from a checkpoint
    classifier_scale: float = 0.0
    n: int | None = None
    seed: int = 0
    batch_size: int = 256
    resize: bool = False
    cache: bool = True
    device: str = "auto"
    out: Path | None = None
    json_path: Path | None = None
    digits_seed: int = 0
    force: bool = False  # replace an earlier sweep's eval_fid.* in --out


@dataclass
class EvalResult:
    records: list[dict]
    files: list[Path]
    warnings: list[str]


def _is_eval_record(p: Path) -> bool:
    """Whether `p` is an eval-fid --json record (one evaluation, or a sweep's list of them)."""
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    recs = doc.get("sweep") if isinstance(doc, dict) and "sweep" in doc else [doc]
    return isinstance(recs, list) and bool(recs) and all(
        isinstance(r, dict) and "diffcli_version" in r and "metrics" in r for r in recs)


def _is_checkpoint(p: Path) -> bool:
    return p.is_file() and p.suffix == ".safetensors"


def _plan(opts: EvalOptions, ck, notes: list[str] | None = None) -> list[tuple[str, int]]:
    """(sampler, steps) for every combination of --sampler × --nfe (or --steps). An adaptive sampler in a
    sweep of several runs once at its default tolerance — the reference row beside the fixed-step ones — with a note;
    alone, a step count or NFE for it is refused (it would be ignored)."""
    from .samplers import SAMPLER_INFO

    names = [s.strip() for s in (opts.sampler or ck.recipe.sample.sampler).split(",")]
    if not all(names):
        raise UserError(f"--sampler {opts.sampler!r}: an empty name in the list; give names separated by commas "
                        f"(e.g. ddim,heun)")
    for s in names:
        if s not in SAMPLER_INFO:
            raise UserError(f"--sampler {s!r}: unknown; choose one of {', '.join(SAMPLER_INFO)}")
    nfes = parse_int_list(opts.nfe, "--nfe")
    if nfes is not None and opts.steps is not None:
        raise UserError("give --steps or --nfe, not both")
    if opts.steps is not None and opts.steps < 1:
        raise UserError(f"--steps {opts.steps}: must be ≥ 1")
    plan = []
    for s in names:
        info = SAMPLER_INFO[s]
        if info.adaptive and (opts.steps is not None or nfes is not None):
            flag = f"--steps {opts.steps}" if opts.steps is not None else f"--nfe {opts.nfe}"
            if len(names) == 1:
                raise UserError(f"{flag}: {s} is adaptive (it takes its own steps, their number follows from "
                                f"its tolerance); drop {flag.split()[0]}")
            if notes is not None:
                notes.append(f"{s} is adaptive: it runs once, at its default tolerance, not at each {flag}")
            plan.append((s, ck.recipe.sample.steps))  # the grid gives only its ends σ_max → σ_min
            continue
        for nfe in (nfes or [None]):
            if nfe is None:
                plan.append((s, opts.steps if opts.steps is not None else ck.recipe.sample.steps))
                continue
            try:
                steps = info.steps_for_nfe(nfe)
            except ValueError as e:
                raise UserError(f"--nfe {nfe} with --sampler {s}: {e}") from None
            if steps < max(1, info.min_steps):
                raise UserError(f"--nfe {nfe}: too small for {s} (it needs at least "
                                f"{info.nfe(max(1, info.min_steps))} denoiser calls)")
            plan.append((s, steps))
    return plan


@dataclass
class _Prepared:
    """What every rank knows once the input is checked (rank 0 also holds the reference and the record)."""

    dev: torch.device
    ck: object | None = None
    ck_hash: str | None = None
    settings: list | None = None  # one SampleSettings per generation job; None: a folder, nothing to generate
    classifier: object | None = None  # the guiding NoisyClassifier, if any
    gen_set: ImageSet | None = None
    ext: Extractor | None = None
    ref: Reference | None = None
    metrics: list[str] = field(default_factory=list)  # after small-n drops
    resize: str = "none"
    resize_to: int | None = None
    warnings: list[str] = field(default_factory=list)
    base: dict = field(default_factory=dict)


def _prepare(opts: EvalOptions, dev: torch.device, log, *, main: bool = True, world_size: int = 1) -> _Prepared:
    """Check every input before anything is generated; load the checkpoint, the extractor and (on rank 0,
    `main`) the generated folder and the reference. Raises UserError for bad input."""
    from . import __version__

    metrics, explicit = parse_metrics(opts.metrics)
    if opts.n is not None and opts.n < 2:
        raise UserError(f"--n {opts.n}: at least 2 images are needed")
    from .recipes import MAX_BATCH

    if not 1 <= opts.batch_size <= MAX_BATCH:
        raise UserError(f"--batch-size {opts.batch_size}: must be in [1, {MAX_BATCH}]")
    if opts.seed < 0:
        raise UserError(f"--seed {opts.seed}: must be ≥ 0")
    if opts.inception_weights is not None and not Path(opts.inception_weights).is_file():
        raise UserError(f"--inception-weights {str(opts.inception_weights)!r}: no such file")
    if opts.ref_split is not None and opts.ref is not None and _ref_is_one_set(opts.ref):
        raise UserError(f"--ref-split {opts.ref_split!r}: --ref {opts.ref!r} is a statistics file or a folder, "
                        f"which has no splits; --ref-split applies to a dataset name")
    if opts.out is not None:
        from .runtime import check_out_folder

        check_out_folder(opts.out)
    if opts.out is not None and not opts.force and any((Path(opts.out) / f).exists() for f in SWEEP_FILES):
        raise UserError(f"--out {str(opts.out)!r} already holds an eval-fid sweep; choose another folder or pass "
                        f"--force to replace it")
    if opts.json_path is not None:
        jp = Path(opts.json_path)
        if jp.is_dir():
            raise UserError(f"--json {str(jp)!r} is a folder; give a file name (e.g. {str(jp / 'fid.json')!r})")
        if not jp.parent.is_dir():
            raise UserError(f"--json {str(jp)!r}: folder {str(jp.parent)!r} does not exist")
        if jp.exists() or jp.is_symlink():  # never a user's file lost to a second run
            if not opts.force:
                raise UserError(f"--json {str(jp)!r} already exists; choose another file or pass --force to "
                                f"replace an earlier eval-fid record")
            if not _is_eval_record(jp):
                raise UserError(f"--json {str(jp)!r} is not an eval-fid record; --force replaces only diffcli's "
                                f"own output — move it or choose another file")
    g = Path(opts.generated)
    if not g.exists():
        raise UserError(f"GENERATED {str(g)!r}: does not exist (give a checkpoint, a sample folder or a folder)")
    p = _Prepared(dev)
    n_req = opts.n if opts.n is not None else DEFAULT_N

    # generated set (or the plan to generate it) and the default reference
    default_ref = None
    if _is_checkpoint(g):
        from .checkpoint import file_hash, load_checkpoint
        from .generate import SampleSettings, sampling_warning, validate_settings

        p.ck_hash = file_hash(g)  # before loading: the hash names the weights that are evaluated
        p.ck = ck = load_checkpoint(g, dev)
        p.settings = []
        cfg = opts.cfg if opts.cfg is not None else (ck.recipe.sample.cfg if ck.denoiser.num_classes else 1.0)
        for sampler, steps in _plan(opts, ck, p.warnings):  # every job is checked before the first image is generated
            s = SampleSettings(sampler=sampler, steps=steps, schedule=opts.schedule, cfg=cfg, n=n_req,
                               batch_size=opts.batch_size, seed=opts.seed,
                               classifier=str(opts.classifier) if opts.classifier else None,
                               classifier_scale=opts.classifier_scale)
            validate_settings(s, ck.denoiser.num_classes)
            if (w := sampling_warning(s, ck.denoiser, ck.meta)) is not None and w not in p.warnings:
                p.warnings.append(w)
            if s.schedule == "tuned":  # the solver learned by `diffcli sample --tune-schedule`, from the sidecar
                from .generate import resolve_tuned_schedule

                resolve_tuned_schedule(ck, s, dev)
            p.settings.append(s)
        from .classifier import guiding_classifier

        p.classifier = guiding_classifier(opts.classifier, opts.classifier_scale, ck.meta, ck.denoiser.num_classes,
                                          dev)
        if len(p.settings) > 1 and opts.out is None:
            raise UserError("a sweep (several --sampler/--nfe values) writes a CSV and a plot: give --out DIR")
        d = ck.recipe.data
        default_ref = {"name": d.name, "split": d.split, "root": d.root, "resolution": d.resolution, "path": d.path,
                       "on_bad_image": d.on_bad_image}
        gen_shape, n_gen = (ck.channels, ck.resolution, ck.resolution), n_req
    elif g.is_dir():
        if opts.sampler or opts.nfe or opts.steps is not None or opts.cfg is not None:
            raise UserError(f"--sampler/--nfe/--steps/--cfg need a checkpoint; GENERATED {str(g)!r} is a folder")
        if opts.classifier is not None or opts.classifier_scale != 0:
            raise UserError(f"--classifier/--classifier-scale need a checkpoint; GENERATED {str(g)!r} is a folder "
                            f"(its sample.json records how it was guided)")
        if not main:  # nothing to generate: rank 0 reads and scores the folder alone
            return p
        p.gen_set = load_generated_folder(g, opts.n)
        if p.gen_set.info.get("warning"):
            p.warnings.append(p.gen_set.info.pop("warning"))
        gen_shape, n_gen = p.gen_set.shape, len(p.gen_set.images)
        ckp = p.gen_set.info.get("checkpoint")
        if ckp and Path(ckp).is_file():
            from .checkpoint import read_header
            from .recipes import recipe_from_json

            try:
                _, meta = read_header(ckp)
                d = recipe_from_json(meta["recipe"], ckp).data
                default_ref = {"name": d.name, "split": d.split, "root": d.root, "resolution": d.resolution,
                               "path": d.path, "on_bad_image": d.on_bad_image}
            except (UserError, KeyError):
                default_ref = None
    else:
        raise UserError(f"GENERATED {str(g)!r}: not a .safetensors checkpoint nor a folder")
    if opts.out is not None:
        try:
            import matplotlib  # noqa: F401  (the sweep plot; fail before generating, not after)
        except ImportError:
            raise UserError("--out: the sweep plot needs matplotlib; pip install 'diffcli[plot]'") from None

    if opts.ref == "digits":  # its shape is known before any extractor (Inception's weights) is fetched
        _check_shapes(gen_shape, 1, 8, opts.resize, g)
    # extractor: digits for 1×8×8 sets, Inception otherwise
    ext_name = opts.extractor or ("digits" if gen_shape == (1, 8, 8) else "inception")
    p.ext = ext = Extractor(ext_name, metrics, device=dev, batch_size=opts.batch_size,
                            inception_weights=opts.inception_weights, digits_seed=opts.digits_seed)
    if not main:  # rank 0 alone needs the reference (and shares what the others need of it)
        return p
    p.ref = ref = resolve_reference(opts.ref, opts.ref_split, opts.data_root, ext, default=default_ref,
                                    cache=opts.cache, log=log)
    if _check_shapes(gen_shape, ref.channels, ref.resolution, opts.resize, g):
        p.resize_to = ref.resolution
        p.resize = (f"generated {gen_shape[1]}×{gen_shape[2]} → {ref.resolution}×{ref.resolution} "
                    f"(centre crop, PIL bicubic up / Lanczos down)")
    p.metrics = list(metrics)
    if "pr" in metrics and min(n_gen, ref.n) <= PR_NEIGHBORHOOD:
        if explicit:
            raise UserError(f"--metrics pr: precision/recall needs more than {PR_NEIGHBORHOOD} images per set "
                            f"(got {n_gen} generated, {ref.n} reference)")
        p.metrics.remove("pr")
        p.warnings.append(f"precision/recall skipped: needs more than {PR_NEIGHBORHOOD} images per set")
    p.base = {
        "diffcli_version": __version__, "torch_fidelity_version": _tf_version(), "torch_version": torch.__version__,
        "python": platform.python_version(), "device": str(dev), "processes": world_size,
        "extractor": ext.name, "extractor_weights": ext.weights, "extractor_weights_hash": ext.hash,
        "feature_layer": ext.layer, "feature_dim": int(ref.features.shape[1]),
        "extractor_input": EXTRACTOR_INPUT[ext.name], "resize": p.resize,
        "reference": {**ref.info, "n": ref.n, "channels": ref.channels, "resolution": ref.resolution},
        "n_reference": ref.n,
        "kid_subsets": KID_SUBSETS, "pr_neighborhood": PR_NEIGHBORHOOD, "metric_seed": 2020,
    }
    return p


def _spaced_ticks(values: list[int], min_ratio: float = 1.25) -> list[int]:
    """Tick values on a log axis at least `min_ratio` apart, the larger kept: heun's NFE 9 beside 10 would print
    as one label "910"."""
    kept: list[int] = []
    for v in sorted(values, reverse=True):
        if not kept or kept[-1] >= min_ratio * max(v, 1):
            kept.append(v)
    return sorted(kept)


def _check_shapes(gen_shape: tuple[int, ...], channels: int, resolution: int, resize: bool, source) -> bool:
    """UserError naming GENERATED when its images cannot be compared with a (channels, resolution²) reference;
    True when they need resizing (--resize given)."""
    if gen_shape[0] != channels:
        raise UserError(f"GENERATED {str(source)!r}: the images have {gen_shape[0]} channel(s), the reference "
                        f"{channels}")
    if tuple(gen_shape[1:]) == (resolution, resolution):
        return False
    if not resize:
        raise UserError(f"GENERATED {str(source)!r}: the images are {gen_shape[1]}×{gen_shape[2]}, the reference "
                        f"{resolution}×{resolution}; pass --resize to resize the generated set to the reference "
                        f"resolution")
    return True


def check(opts: EvalOptions, log=None) -> None:
    """Check every input of an evaluation (and fill the reference-statistics cache) without generating:
    what `diffcli eval-fid --nproc N` runs before it starts the workers, so bad input is reported once."""
    from .runtime import resolve_device

    _prepare(opts, resolve_device(opts.device), log or (lambda *a, **k: None))


def batch_shard(n: int, batch_size: int, world) -> tuple[int, int]:
    """This rank's contiguous indices [lo, hi) of n, cut at multiples of `batch_size`: every rank then runs
    exactly the batches one process would (generation and feature extraction alike), so even the
    floating-point results of batched network calls match a one-process run, not just the seeded noise."""
    blo, bhi = world.shard(math.ceil(n / batch_size))
    return min(blo * batch_size, n), min(bhi * batch_size, n)


def evaluate(opts: EvalOptions, log=None) -> EvalResult | None:
    """Run eval-fid (see module docstring); writes --json, and for sweeps CSV + PNG into --out.

    Under torchrun every rank generates its contiguous, batch-aligned block of the image indices and extracts
    their features; rank 0 gathers the features, computes the metrics, logs and writes, and returns the
    result; the other ranks return None. Per-sample seeding makes the numbers those of a one-process run."""
    from . import distributed as dist
    from .images import to_uint8
    from .runtime import resolve_device

    t_start = time.perf_counter()
    world, dev = dist.init(resolve_device(opts.device))
    log = (log if world.is_main else None) or (lambda *a, **k: None)
    err = None
    try:
        p = _prepare(opts, dev, log, main=world.is_main, world_size=world.size)
    except UserError as e:
        if not world.distributed:
            raise
        p, err = None, e
    dist.raise_once(err, world)  # bad input: rank 0 reports it, once; the other ranks exit quietly
    metrics, resize_to = dist.broadcast_from_main((p.metrics, p.resize_to), world)
    if p.settings is None and not world.is_main:
        return None
    ext = p.ext
    layers = [ext.layer] + ([ext.is_layer] if "is" in metrics and ext.is_layer != ext.layer else [])
    records = []
    for s in (p.settings if p.settings is not None else [None]):
        t_gen, grec = None, None
        if s is not None:
            lo, hi = batch_shard(s.n, s.batch_size, world)
            from .samplers import SAMPLER_INFO

            how = ("adaptive steps" if SAMPLER_INFO[s.sampler].adaptive
                   else f"{s.steps} step{'' if s.steps == 1 else 's'}")
            log(f"generating {s.n} images: {s.sampler}, {how}"
                + (f" ({world.size} processes)" if world.distributed else ""))
            t0 = time.perf_counter()
            imgs, grec = generate_images(p.ck, s, dev, range(lo, hi), show_progress=world.is_main,
                                         classifier=p.classifier)
            t_gen = time.perf_counter() - t0
            images = to_uint8(imgs)
            labels = torch.tensor(grec["labels"], dtype=torch.long) if grec.get("labels") is not None else None
        else:
            images, labels = p.gen_set.images, p.gen_set.labels
        shape = (images.shape[1], resize_to, resize_to) if resize_to is not None else tuple(images.shape[1:])
        if resize_to is not None and len(images):
            images = resize_u8(images, resize_to)
        t0 = time.perf_counter()
        feats = ext.features(images, layers) if len(images) else None
        t_feat = time.perf_counter() - t0
        # class accuracy of conditional digits needs the (tiny) images themselves on rank 0
        keep_images = labels is not None and shape == (1, 8, 8)
        part = {"n": len(images), "features": feats, "labels": labels, "images": images if keep_images else None,
                "record": grec, "generation_seconds": t_gen, "feature_seconds": t_feat}
        parts = dist.gather_to_main(part, world) if s is not None else [part]
        if not world.is_main:
            continue
        parts = [q for q in parts if q["n"]]  # a rank may hold no batch at all when n is small
        feats = {k: torch.cat([q["features"][k] for q in parts]) for k in layers}
        labels = torch.cat([q["labels"] for q in parts]) if labels is not None else None
        n_images = sum(q["n"] for q in parts)
        t_feat = max(q["feature_seconds"] for q in parts)
        rec = dict(p.base)
        if s is not None:
            grec = parts[0]["record"]
            t_gen = max(q["generation_seconds"] for q in parts)
            rec.update({"generated": {"source": "checkpoint", "path": str(p.ck.path)}, "checkpoint": str(p.ck.path),
                        "checkpoint_sha256": p.ck_hash, "checkpoint_step": p.ck.step, "sampler": grec["sampler"],
                        "schedule": grec["schedule"], "steps": grec["steps"], "nfe": grec["nfe"], "cfg": s.cfg,
                        "classifier": str(opts.classifier) if opts.classifier else None,
                        "classifier_scale": opts.classifier_scale, "seed": opts.seed,
                        "seeds": f"image i uses seed mix({opts.seed}, i)",
                        "generation_seconds": round(t_gen, 3)})
        else:
            info = p.gen_set.info
            rec.update({"generated": info, "checkpoint": info.get("checkpoint"),
                        "checkpoint_sha256": info.get("checkpoint_sha256"),
                        "checkpoint_step": info.get("checkpoint_step"), "sampler": info.get("sampler"),
                        "schedule": info.get("schedule"), "steps": info.get("steps"), "nfe": info.get("nfe"),
                        "cfg": info.get("cfg"), "classifier": info.get("classifier"),
                        "classifier_scale": info.get("classifier_scale"), "seed": info.get("seed"),
                        "seeds": None if info.get("seed") is None else f"image i uses seed mix({info['seed']}, i)",
                        "generation_seconds": None})
        t0 = time.perf_counter()
        vals = compute_metrics(feats, p.ref, metrics, layer=ext.layer, is_layer=ext.is_layer)
        t_met = time.perf_counter() - t0
        acc = None
        if keep_images and 0 <= int(labels.min()) and int(labels.max()) < 10:
            from .features import class_accuracy

            acc = class_accuracy(torch.cat([q["images"] for q in parts]), labels, seed=opts.digits_seed)
        # FID's small-n caveats concern FID alone: a KID / IS / precision-recall run does not get them
        w = small_n_warnings(n_images, p.ref.n, int(p.ref.features.shape[1])) if "fid" in metrics else []
        w += small_n_kid_is_warnings(metrics, n_images, p.ref.n)
        rec.update({
            "metrics": vals, "metrics_requested": metrics, "class_accuracy": acc, "n_generated": n_images,
            "kid_subset_size": kid_subset_size(n_images, p.ref.n) if "kid" in metrics else None,
            "is_splits": is_splits(n_images) if "is" in metrics else None,
            "eval_seconds": round(t_feat + t_met, 3), "feature_seconds": round(t_feat, 3),
            "metric_seconds": round(t_met, 3),
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "warnings": list(dict.fromkeys(p.warnings + w)),
        })
        records.append(rec)
        log(_one_line(rec))
    if not world.is_main:
        return None
    for r in records:
        r["total_seconds"] = round(time.perf_counter() - t_start, 3)
    all_warn = list(dict.fromkeys(w for r in records for w in r["warnings"]))
    files = []
    if opts.out is not None:
        files += write_sweep(opts.out, records)
    if opts.json_path is not None:
        from .checkpoint import atomic_write_text

        doc = records[0] if len(records) == 1 else {"sweep": records}
        atomic_write_text(opts.json_path, json.dumps(doc, indent=2, default=_json_default))
        files.append(Path(opts.json_path))
    return EvalResult(records, files, all_warn)


def generate_images(ck, s, dev: torch.device, indices: range, *, show_progress: bool,
                    classifier=None) -> tuple[Tensor, dict]:
    """Images `indices` of a run with settings `s` from a loaded checkpoint (diffcli.generate), guided by
    `classifier` when one is given."""
    from .generate import generate

    return generate(ck.denoiser, ck.channels, ck.resolution, s, device=dev, indices=indices,
                    show_progress=show_progress, classifier=classifier)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o).__name__)


def _tf_version() -> str:
    import torch_fidelity

    return torch_fidelity.__version__


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _one_line(rec: dict) -> str:
    m = rec["metrics"]
    head = f"{rec['sampler']} NFE {rec['nfe']}: " if rec.get("sampler") else ""
    parts = [f"{k} {_fmt(v)}" for k, v in m.items() if not k.endswith("_std") and k != "f_score"]
    if rec.get("class_accuracy") is not None:
        parts.append(f"class acc {rec['class_accuracy']:.3f}")
    return head + ", ".join(parts)


CSV_COLUMNS = ["sampler", "schedule", "steps", "nfe", "cfg", "classifier_scale", "n_generated", "n_reference",
               "fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall", "f_score", "class_accuracy",
               "generation_seconds", "eval_seconds"]


SWEEP_FILES = ("eval_fid.csv", "eval_fid.png", "eval_fid.json")


def write_sweep(out: Path, records: list[dict]) -> list[Path]:
    """OUT/eval_fid.csv (one row per sampler × NFE), OUT/eval_fid.png (metric vs NFE), OUT/eval_fid.json."""
    from .checkpoint import atomic_write_text

    from .runtime import check_out_folder

    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in records:
        row = {k: r.get(k) for k in CSV_COLUMNS}
        row.update({k: v for k, v in r["metrics"].items() if k in CSV_COLUMNS})
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    atomic_write_text(out / "eval_fid.csv", buf.getvalue())
    atomic_write_text(out / "eval_fid.json", json.dumps({"sweep": records}, indent=2, default=_json_default))
    files = [out / "eval_fid.csv", out / "eval_fid.json"]
    png = plot_sweep(out / "eval_fid.png", records)
    if png is not None:
        files.append(png)
    return files


def plot_sweep(path: Path, records: list[dict]) -> Path | None:
    """Metric vs NFE, one line per sampler, one panel per metric (matplotlib, the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--out: the sweep plot needs matplotlib; pip install 'diffcli[plot]'") from None
    from .checkpoint import atomic_write_bytes

    panels = [(k, lbl) for k, lbl in (("fid", "FID (lower is better)"), ("kid_mean", "KID"),
                                      ("precision", "precision"), ("recall", "recall"),
                                      ("class_accuracy", "class accuracy"), ("is_mean", "IS"))
              if any(_val(r, k) is not None for r in records)]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    samplers = list(dict.fromkeys(r.get("sampler") for r in records))
    for ax, (key, label) in zip(axes.flat, panels):
        for s in samplers:
            pts = sorted((r["nfe"], _val(r, key)) for r in records if r.get("sampler") == s
                         and _val(r, key) is not None and r.get("nfe") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(s))
        ax.set_xscale("log")
        nfes = _spaced_ticks(sorted({r["nfe"] for r in records if r.get("nfe") is not None}))
        ax.set_xticks(nfes, [str(v) for v in nfes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("NFE (denoiser calls)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    r0 = records[0]
    fig.suptitle(f"{r0.get('checkpoint') or ''}  ·  {r0['extractor']} features  ·  n = {r0['n_generated']} vs "
                 f"{r0['n_reference']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _val(r: dict, key: str):
    return r.get("class_accuracy") if key == "class_accuracy" else r["metrics"].get(key)


def summary_rows(rec: dict) -> list[tuple[str, str]]:
    """(label, value) rows for the on-screen table of one evaluation."""
    m = rec["metrics"]
    rows = []
    if "fid" in m:
        rows.append(("FID", f"{m['fid']:.4f}"))
    if "kid_mean" in m:
        rows.append(("KID", f"{m['kid_mean']:.5f} ± {m['kid_std']:.5f}"))
    if "is_mean" in m:
        rows.append(("IS", f"{m['is_mean']:.3f} ± {m['is_std']:.3f}"))
    if "precision" in m:
        rows.append(("precision / recall", f"{m['precision']:.3f} / {m['recall']:.3f}"))
    if rec.get("class_accuracy") is not None:
        rows.append(("class accuracy", f"{rec['class_accuracy']:.3f}"))
    ref = rec["reference"]
    ref_txt = (f"{ref.get('dataset')}:{ref.get('split')} (cache {ref.get('cache')})" if ref["source"] == "dataset"
               else f"{ref['source']} {ref.get('path')}")
    rows += [("n generated / reference", f"{rec['n_generated']} / {rec['n_reference']}"),
             ("reference", ref_txt),
             ("extractor", f"{rec['extractor']} ({rec['feature_layer']}, {rec['feature_dim']}-d, "
                           f"hash {rec['extractor_weights_hash']})"),
             ("resize", rec["resize"])]
    if rec.get("sampler"):
        rows.append(("sampler", f"{rec['sampler']} ({rec.get('schedule')}, {rec.get('steps')} "
                                f"step{'' if rec.get('steps') == 1 else 's'}, NFE {rec.get('nfe')}, "
                                f"cfg {rec.get('cfg')}, seed {rec.get('seed')})"))
    if rec.get("classifier"):
        rows.append(("classifier guidance", f"{rec['classifier']} (scale {rec.get('classifier_scale')})"))
    if rec.get("checkpoint_sha256"):
        rows.append(("checkpoint", f"{rec.get('checkpoint')} (sha256 {rec['checkpoint_sha256']})"))
    rows.append(("seconds", f"eval {rec['eval_seconds']:.2f}"
                 + (f", generation {rec['generation_seconds']:.2f}" if rec.get("generation_seconds") else "")))
    return rows


def sweep_table(records: list[dict]):
    from rich.table import Table

    t = Table(title="diffcli eval-fid sweep", title_justify="left")
    cols = ["sampler", "NFE", "FID", "KID", "precision", "recall", "class acc"]
    for c in cols:
        t.add_column(c)
    for r in records:
        m = r["metrics"]
        t.add_row(str(r.get("sampler")), str(r.get("nfe")), _fmt(m.get("fid")), _fmt(m.get("kid_mean")),
                  _fmt(m.get("precision")), _fmt(m.get("recall")), _fmt(r.get("class_accuracy")))
    return t
