"""Datasets, all scaled to [-1, 1] and shaped (C, H, W).

digits       sklearn's load_digits: 1,797 8×8 greyscale digits, 10 classes, embedded (no download). Default.
mnist        torchvision MNIST (28×28, 10 classes), `download = true` to fetch.
cifar10      torchvision CIFAR-10 (32×32 RGB, 10 classes), `download = true` to fetch.
celeba       torchvision CelebA, or a folder holding `img_align_celeba/` (+ `list_eval_partition.txt`); centre
             crop 128×128 at (top 57, left 25) of the 218×178 aligned faces, then resize — the DDIM paper's
             CelebA-64 setting (Song et al. 2021, following NCSN).
imagefolder  any folder of images; labels from sub-folder names when every image sits in one.

Small datasets are held as one tensor (`ImageData.images`); large ones stream through `ImageData.dataset`
(a torch Dataset of (image, label)) with DataLoader workers. Flips are applied by the training loop, per
sample and from the step's generator, so both paths are deterministic and resumable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .recipes import DataConfig

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
IN_MEMORY_BYTES = 2 * 1024**3  # hold a dataset as one float32 tensor below this size
CELEBA_CROP = (57, 25, 128, 128)  # top, left, height, width (DDIM/NCSN CelebA crop)


@dataclass
class ImageData:
    name: str
    channels: int
    resolution: int
    num_classes: int  # 0 when unlabelled (or labels not used)
    images: Tensor | None = None  # (N, C, H, W) float32 in [-1, 1], when in memory
    labels: Tensor | None = None  # (N,) int64, when in memory and labelled
    dataset: torch.utils.data.Dataset | None = None  # streaming: items (image (C,H,W), label int64)
    class_names: list[str] = field(default_factory=list)
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)  # the first few skipped files and why
    notes: list[str] = field(default_factory=list)  # what the loader decided that the user should hear

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.dataset)


# ---------------------------------------------------------------------------------------------------------
def digits_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as (N, 1, 8, 8) float32 in [-1, 1] and (N,) int64 labels.

    Split: a fixed permutation (seed 0) holds out 20% (360 images) as `test`; `all` is every image."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0) * 2 - 1
    y = d.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(x))
    n_test = 360
    idx = {"train": perm[n_test:], "test": perm[:n_test], "all": np.arange(len(x))}[split]
    return x[idx][:, None], y[idx]


def _resize(images: Tensor, resolution: int) -> Tensor:
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    import torch.nn.functional as F

    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)


# what to put where when the download is not possible: the layout torchvision checks for
TORCHVISION_HINTS = {"mnist": "put the four unzipped *-ubyte files (train-images-idx3-ubyte, …) in {root}/MNIST/raw/",
                     "cifar10": "unpack cifar-10-python.tar.gz into {root} (it makes {root}/cifar-10-batches-py/)"}


def _torchvision_missing(name: str, root: str, err: Exception, download: bool = False) -> UserError:
    """A torchvision dataset that is not on disk; with data.download = true, a download that failed."""
    why = " ".join(str(err).split())[:160] or err.__class__.__name__
    # "place the files there" alone does not say which files or where: name the layout torchvision reads
    place = TORCHVISION_HINTS.get(name, "place the files in {root}").format(root=root)
    if download:
        return UserError(f"data.name = {name!r}: not under data.root = {root!r} and the download failed ({why}); "
                         f"check the network, or {place}")
    return UserError(f"data.name = {name!r}: not found under data.root = {root!r} ({why}). "
                     f"Set data.download = true (needs internet: `--set data.download=true`), or {place}")


def _load_torchvision(cfg: DataConfig) -> ImageData:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[cfg.name]
    parts = []
    for train in {"train": [True], "test": [False], "all": [True, False]}[cfg.split]:
        try:
            ds = cls(cfg.root, train=train, download=cfg.download)
        except Exception as e:  # torchvision raises RuntimeError or URLError; both mean "not here"
            raise _torchvision_missing(cfg.name, cfg.root, e, cfg.download) from None
        parts.append(ds)
    xs, ys = [], []
    for ds in parts:
        arr = np.asarray(ds.data)
        arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
        xs.append(torch.from_numpy(arr.copy()))
        ys.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.long))
    x = torch.cat(xs).float() / 127.5 - 1
    res = cfg.resolution or x.shape[-1]
    return ImageData(cfg.name, x.shape[1], res, 10 if cfg.class_conditional else 0, _resize(x, res),
                     torch.cat(ys) if cfg.class_conditional else None,
                     class_names=list(getattr(parts[0], "classes", [])))


# ---------------------------------------------------------------------------------------------------------
class FileImages(torch.utils.data.Dataset):
    """Images from files: centre-cropped (or a fixed crop box), resized, scaled to [-1, 1]."""

    def __init__(self, files: list[Path], labels: list[int] | None, channels: int, resolution: int,
                 crop: tuple[int, int, int, int] | None = None) -> None:
        self.files, self.labels = files, labels
        self.channels, self.resolution, self.crop = channels, resolution, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img = read_image(self.files[i], self.channels, self.resolution, self.crop)
        return img, (self.labels[i] if self.labels is not None else -1)


_GRAY_MODES = ("L", "LA", "La", "1", "I", "F")  # and every "I;16…" variant


def image_channels(mode: str) -> int:
    return 1 if mode in _GRAY_MODES or mode.startswith("I;16") else 3


def content_channels(im) -> int:
    """Channels of a PIL image's content: a palette image (P, PA) whose colours are all grey is greyscale —
    PNG optimisers and GIF store grey images that way, and its mode alone would make it RGB."""
    if im.mode in ("P", "PA"):
        rgb = np.asarray(im.convert("RGB"))
        return 1 if bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()) else 3
    return image_channels(im.mode)


def _to_8bit(im):
    """A high-bit-depth grayscale PIL image (I;16*, I, F) as mode L, scaled, not clipped: PIL's convert("L")
    clips such values to 255 and turns a 16-bit scan into a white page."""
    from PIL import Image

    a = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        top = 1.0 if a.size and a.max() <= 1.0 else 255.0
    else:  # 16-bit content (I;16, or I holding 16-bit values); I with 8-bit values stays as it is
        top = 65535.0 if im.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
    return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def read_image(path: Path, channels: int | None, resolution: int | None,
               crop: tuple[int, int, int, int] | None = None) -> Tensor:
    """One image file -> (C, H, W) float32 in [-1, 1]. Raises UserError naming the file when unreadable
    or of another channel count than `channels`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            c = content_channels(im)
            if channels is not None and c != channels:
                kind = {1: "greyscale (1 channel)", 3: "RGB (3 channels)"}
                raise UserError(f"{path}: is {kind.get(c, f'{c}-channel')} (PIL mode {mode}"
                                f"{', alpha not counted' if 'A' in mode else ''}), the dataset is "
                                f"{kind.get(channels, f'{channels}-channel')}")
            if mode in ("I", "F") or mode.startswith("I;16"):
                im = _to_8bit(im)
            im = im.convert("L" if c == 1 else "RGB")
            if crop is not None:
                top, left, h, w = crop
                if im.size[0] < left + w or im.size[1] < top + h:
                    # PIL pads a box beyond the image with black: a smaller (already cropped or resized) face
                    # would train as a mostly black image, silently
                    raise UserError(f"{path}: is {im.size[0]}×{im.size[1]}, smaller than the CelebA crop box "
                                    f"(rows {top}–{top + h}, columns {left}–{left + w} of the 178×218 aligned "
                                    f"faces); for other images use data.name = \"imagefolder\"")
                im = im.crop((left, top, left + w, top + h))
            if resolution is not None:
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                if s != resolution:
                    im = im.resize((resolution, resolution), Image.BICUBIC if s < resolution else Image.LANCZOS)
            arr = np.asarray(im, dtype=np.uint8)
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 127.5 - 1


def list_images(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, sorted). Hidden files and folders (a name starting with
    ".") are left out: macOS's "._x.jpg" AppleDouble files are no images, and a ".ipynb_checkpoints/" copy
    would count twice (or, as a sub-folder of the root, become a class)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def diffcli_output_images(folder: Path) -> Path | None:
    """`folder/images` when `folder` is a diffcli sample or decode output (sample.json or decode.json beside
    images/): its images are those, not grid.png or decoded.png. None for any other folder."""
    if (folder / "images").is_dir() and any((folder / f).is_file() for f in ("sample.json", "decode.json")):
        return folder / "images"
    return None


def _materialise(name: str, ds: FileImages, num_classes: int, class_names: list[str], skip_bad: bool) -> ImageData:
    """Hold a file dataset in memory when it is small enough, else stream it."""
    nbytes = len(ds) * ds.channels * ds.resolution**2 * 4
    if nbytes > IN_MEMORY_BYTES:
        return ImageData(name, ds.channels, ds.resolution, num_classes, dataset=ds, class_names=class_names)
    imgs, labels, skipped, reasons = [], [], 0, []
    for i in range(len(ds)):
        try:
            img, y = ds[i]
        except UserError as e:
            if not skip_bad:  # say how to go on without the file, not only which file it is
                raise UserError(f"{e}; data.on_bad_image = \"skip\" leaves such files out") from None
            skipped += 1
            if len(reasons) < 3:
                reasons.append(str(e))
            continue
        imgs.append(img)
        labels.append(y)
    if len(imgs) == 0:
        raise UserError(f"data: no readable images among {len(ds)} file(s)")
    lab = torch.tensor(labels, dtype=torch.long) if num_classes else None
    return ImageData(name, ds.channels, ds.resolution, num_classes, torch.stack(imgs), lab,
                     class_names=class_names, skipped=skipped, skipped_reasons=reasons)


def _load_imagefolder(cfg: DataConfig) -> ImageData:
    root = Path(cfg.path or "")
    if not root.is_dir():
        raise UserError(f"data.path = {cfg.path!r}: not a folder")
    files = list_images(root)
    if not files:
        raise UserError(f"data.path = {cfg.path!r}: holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    parents = {f.parent for f in files}
    labelled = cfg.class_conditional and all(f.parent.parent == root for f in files) and len(parents) > 1
    notes = []
    if cfg.class_conditional and not labelled and len(parents) > 1:
        # labels come from one level of class folders; a mixed layout trains unconditionally — say so, or a
        # user who asked for classes finds out only when `--class` is refused
        odd = next(f for f in files if f.parent.parent != root)
        notes.append(f"data.class_conditional = true, but not every image is one folder below data.path (e.g. "
                     f"{odd.relative_to(root)}): training without labels; put the images in data.path/CLASS/ for "
                     f"labels, or set data.class_conditional = false")
    class_names = sorted(p.name for p in parents) if labelled else []
    labels = [class_names.index(f.parent.name) for f in files] if labelled else None
    channels, size = _common_format(files)
    if channels is None:
        raise UserError(f"data.path = {cfg.path!r}: no readable images")
    res = cfg.resolution or size
    ds = FileImages(files, labels, channels, res)
    data = _materialise("imagefolder", ds, len(class_names), class_names, cfg.on_bad_image == "skip")
    data.notes.extend(notes)
    return data


PROBE_FILES = 1000  # files looked at (evenly spaced) to find a folder's channel count and size


def _common_format(files: list[Path]) -> tuple[int | None, int | None]:
    """The channel count and size (shorter side) most of a folder's readable images have, from up to
    PROBE_FILES of them evenly spaced. By majority, not by the first file: one greyscale (or odd-sized) image
    that sorts first must not make the other images the "bad" ones (a failed run naming a good file, or
    on_bad_image = "skip" training on that one image). (None, None) when none is readable."""
    from collections import Counter

    from PIL import Image

    step = max(1, len(files) // PROBE_FILES)
    chans, sizes = Counter(), Counter()
    for f in files[::step][:PROBE_FILES]:
        try:
            with Image.open(f) as im:
                im.load()  # decodes: a truncated or corrupt file is not counted
                c, size = content_channels(im), min(im.size)
        except Exception:
            continue
        chans[c] += 1
        sizes[(c, size)] += 1
    if not chans:
        return None, None
    c = chans.most_common(1)[0][0]
    return c, max(((n, s) for (ch, s), n in sizes.items() if ch == c))[1]


def celeba_folder(root: Path) -> Path | None:
    for cand in (root / "celeba", root):
        if (cand / "img_align_celeba").is_dir():
            return cand
    return None


def _load_celeba(cfg: DataConfig) -> ImageData:
    res = cfg.resolution or 64
    root = Path(cfg.root)
    folder = celeba_folder(root)
    if folder is None and cfg.download:
        import torchvision

        try:  # torchvision's Google-Drive download often hits its quota; the folder path is the fallback
            torchvision.datasets.CelebA(str(root), split="all", download=True)
        except Exception as e:
            raise UserError(f"data.name = 'celeba': download failed ({e.__class__.__name__}); download "
                            f"img_align_celeba.zip and list_eval_partition.txt by hand and unpack them into "
                            f"{str(root / 'celeba')!r}") from None
        folder = celeba_folder(root)
    if folder is None:
        raise UserError(f"data.name = 'celeba': no img_align_celeba/ under data.root = {cfg.root!r}; set "
                        f"data.download = true or unpack img_align_celeba.zip (and list_eval_partition.txt) into "
                        f"{str(root / 'celeba')!r}")
    files = sorted((folder / "img_align_celeba").glob("*.jpg")) or list_images(folder / "img_align_celeba")
    part_file = folder / "list_eval_partition.txt"
    if part_file.exists() and cfg.split != "all":
        want = {"train": "0", "test": "2"}[cfg.split]
        keep = {ln.split()[0] for ln in part_file.read_text().splitlines() if len(ln.split()) == 2
                and ln.split()[1] == want}
        files = [f for f in files if f.name in keep]
    if not files:
        raise UserError(f"data.name = 'celeba': no images for split {cfg.split!r} in {str(folder)!r}")
    ds = FileImages(files, None, 3, res, crop=CELEBA_CROP)
    return _materialise("celeba", ds, 0, [], cfg.on_bad_image == "skip")


def load_dataset(cfg: DataConfig) -> ImageData:
    """The dataset a recipe names, ready for training (see module docstring)."""
    if cfg.name == "digits":
        x, y = digits_arrays(cfg.split)
        images = torch.from_numpy(x)
        res = cfg.resolution or 8
        return ImageData("digits", 1, res, 10 if cfg.class_conditional else 0, _resize(images, res),
                         torch.from_numpy(y) if cfg.class_conditional else None,
                         class_names=[str(i) for i in range(10)])
    if cfg.name in ("mnist", "cifar10"):
        return _load_torchvision(cfg)
    if cfg.name == "celeba":
        return _load_celeba(cfg)
    return _load_imagefolder(cfg)
