"""Datasets: embedded digits, image folders (labels from sub-folders), a fabricated CelebA folder and its crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcli.data import CELEBA_CROP, load_dataset
from diffcli.errors import UserError
from diffcli.recipes import DataConfig


def test_digits_split_shape_and_range():
    tr = load_dataset(DataConfig(name="digits"))
    te = load_dataset(DataConfig(name="digits", split="test"))
    al = load_dataset(DataConfig(name="digits", split="all"))
    assert tr.images.shape == (1437, 1, 8, 8) and te.images.shape == (360, 1, 8, 8) and len(al) == 1797
    assert float(tr.images.min()) == -1.0 and float(tr.images.max()) == 1.0
    assert tr.num_classes == 10 and set(tr.labels.tolist()) == set(range(10))
    assert load_dataset(DataConfig(name="digits", class_conditional=False)).labels is None
    assert load_dataset(DataConfig(name="digits", resolution=16)).images.shape[-1] == 16


def _img(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_imagefolder_labels_from_subfolders(tmp_path):
    for cls, col in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        for i in range(3):
            _img(tmp_path / cls / f"{i}.png", (20, 12), col)
    d = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), resolution=8))
    assert d.images.shape == (6, 3, 8, 8) and d.num_classes == 2 and d.class_names == ["cats", "dogs"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.allclose(d.images[0, 0], torch.ones(8, 8)) and torch.allclose(d.images[0, 2], -torch.ones(8, 8))


def test_imagefolder_bad_files(tmp_path):
    _img(tmp_path / "a.png", (8, 8), 128, "L")
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="b.png"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path)))
    d = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), on_bad_image="skip"))
    assert len(d) == 1 and d.skipped == 1 and d.channels == 1
    (tmp_path / "b.png").unlink()
    _img(tmp_path / "c.png", (8, 8), (1, 2, 3))
    with pytest.raises(UserError, match=r"c.png: is RGB \(3 channels\)"):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), on_bad_image="fail"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        load_dataset(DataConfig(name="imagefolder", path=str(empty)))


def test_celeba_folder_crop_and_partition(tmp_path):
    """The DDIM crop: rows 57..185, columns 25..153 of the 218×178 aligned face, then resize."""
    root = tmp_path / "data" / "celeba"
    arr = np.zeros((218, 178, 3), dtype=np.uint8)
    top, left, h, w = CELEBA_CROP
    arr[top:top + h, left:left + w] = 255  # white inside the crop box, black outside
    for i in range(1, 5):
        (root / "img_align_celeba").mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / "img_align_celeba" / f"{i:06d}.jpg", quality=100)
    (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n000004.jpg 2\n")
    d = load_dataset(DataConfig(name="celeba", root=str(tmp_path / "data"), resolution=16))
    assert d.images.shape == (2, 3, 16, 16) and d.num_classes == 0
    assert float(d.images.min()) > 0.9  # the crop holds only the white box
    assert len(load_dataset(DataConfig(name="celeba", root=str(tmp_path / "data"), split="test"))) == 1


@pytest.mark.parametrize("name", ["mnist", "cifar10", "celeba"])
def test_missing_dataset_says_how_to_get_it(tmp_path, name):
    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(name=name, root=str(tmp_path), class_conditional=name != "celeba"))
    assert "download" in str(e.value) and "\n" not in str(e.value)


def test_sixteen_bit_and_gray_alpha_images_are_read_scaled(tmp_path):
    """A 16-bit grayscale PNG is scaled to 8 bits (PIL's convert("L") would clip it to a white page), and
    grayscale + alpha is one channel, like grayscale."""
    import numpy as np
    from PIL import Image

    from diffcli.data import read_image

    a = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)  # 0 … 63000 of 65535
    Image.fromarray(a).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode == "I;16"
    t = read_image(tmp_path / "i16.png", None, None)
    expect = np.rint(a / 65535 * 255) / 127.5 - 1
    assert t.shape == (1, 8, 8) and np.allclose(t[0].numpy(), expect, atol=1e-6)
    la = np.stack([np.arange(64).reshape(8, 8) * 4, np.full((8, 8), 255)], -1).astype(np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    t = read_image(tmp_path / "la.png", None, None)
    assert t.shape == (1, 8, 8) and np.allclose(t[0].numpy(), la[..., 0] / 127.5 - 1, atol=1e-6)


def test_grey_palette_image_is_one_channel(tmp_path):
    """A palette PNG (or GIF) whose colours are all grey is greyscale: `encode` refused such a digit as "RGB"
    and eval-fid read it as 3 channels. A palette with colour stays RGB."""
    from diffcli.data import read_image

    a = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(a).convert("P").save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    t = read_image(tmp_path / "p.png", 1, None)
    assert t.shape == (1, 8, 8) and np.allclose(t[0].numpy(), a / 127.5 - 1, atol=1e-6)
    assert read_image(tmp_path / "p.png", None, None).shape == (1, 8, 8)
    Image.fromarray(np.stack([a, a // 2, a], -1)).convert("P").save(tmp_path / "colour.png")
    assert read_image(tmp_path / "colour.png", None, None).shape == (3, 8, 8)
    with pytest.raises(UserError, match="RGB"):
        read_image(tmp_path / "colour.png", 1, None)


def test_imagefolder_channels_by_majority_not_first_file(tmp_path):
    """One greyscale image sorting first in an RGB folder: the folder is RGB and the greyscale file is the bad one
    (fail names it and says how to skip it; skip drops it) — not every RGB file."""
    _img(tmp_path / "a" / "0.png", (8, 8), 100, "L")
    for cls in ("a", "b"):
        for i in range(1, 4):
            _img(tmp_path / cls / f"{i}.png", (8, 8), (255, 0, 0))
    with pytest.raises(UserError, match=r"a/0\.png: is greyscale .*data\.on_bad_image = \"skip\""):
        load_dataset(DataConfig(name="imagefolder", path=str(tmp_path)))
    d = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), on_bad_image="skip"))
    assert d.channels == 3 and len(d) == 6 and d.skipped == 1 and "0.png: is greyscale" in d.skipped_reasons[0]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_imagefolder_size_by_majority(tmp_path):
    _img(tmp_path / "0.png", (20, 12), (1, 2, 3))  # odd one first
    for i in range(1, 4):
        _img(tmp_path / f"{i}.png", (16, 16), (1, 2, 3))
    assert load_dataset(DataConfig(name="imagefolder", path=str(tmp_path))).images.shape == (4, 3, 16, 16)


def test_imagefolder_ignores_hidden_files_and_folders(tmp_path):
    """macOS "._x.png" AppleDouble files are no images; ".ipynb_checkpoints/" copies are no class."""
    for cls in ("a", "b"):
        _img(tmp_path / cls / "1.png", (8, 8), (255, 0, 0))
    (tmp_path / "a" / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    _img(tmp_path / ".ipynb_checkpoints" / "1-checkpoint.png", (8, 8), (0, 0, 255))
    _img(tmp_path / "b" / ".ipynb_checkpoints" / "1-checkpoint.png", (8, 8), (0, 0, 255))
    d = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path)))
    assert len(d) == 2 and d.class_names == ["a", "b"] and d.labels.tolist() == [0, 1]


def test_imagefolder_mixed_depths_train_unlabelled_and_say_so(tmp_path):
    """Labels come from one level of class folders: images at other depths drop them, with a note naming one."""
    _img(tmp_path / "a" / "1.png", (8, 8), (255, 0, 0))
    _img(tmp_path / "b" / "deeper" / "1.png", (8, 8), (0, 255, 0))
    d = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path)))
    assert d.num_classes == 0 and d.labels is None
    assert len(d.notes) == 1 and str(Path("b") / "deeper" / "1.png") in d.notes[0]
    flat = tmp_path / "flat"
    _img(flat / "1.png", (8, 8), (255, 0, 0))
    assert load_dataset(DataConfig(name="imagefolder", path=str(flat))).notes == []  # one folder: nothing to say


def test_celeba_image_smaller_than_the_crop_is_refused(tmp_path):
    """PIL pads a crop box beyond the image with black: a 64×64 face would train as a black square."""
    _img(tmp_path / "img_align_celeba" / "000001.jpg", (64, 64), (200, 100, 50))
    with pytest.raises(UserError, match=r"000001\.jpg: is 64×64, smaller than the CelebA crop box"):
        load_dataset(DataConfig(name="celeba", root=str(tmp_path), resolution=16, class_conditional=False))


@pytest.mark.parametrize("name,layout", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")])
def test_missing_torchvision_dataset_names_the_layout(tmp_path, name, layout):
    with pytest.raises(UserError) as e:
        load_dataset(DataConfig(name=name, root=str(tmp_path)))
    assert str(tmp_path / layout) in str(e.value) and "\n" not in str(e.value)


def test_eval_fid_reference_of_a_folder_checkpoint_is_its_training_data(tmp_path, monkeypatch):
    """A checkpoint trained on a folder at data.resolution = 8 with data.on_bad_image = "skip": its default
    reference is those images as trained on (8×8, the broken file left out), not the raw 16×16 files."""
    from diffcli import metrics

    for i in range(3):
        _img(tmp_path / f"{i}.png", (16, 16), (255, 0, 0))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    monkeypatch.setattr(metrics, "_reference_from_images", lambda images, ext, info: images)
    default = {"name": "imagefolder", "split": "train", "root": "data", "resolution": 8, "path": str(tmp_path),
               "on_bad_image": "skip"}
    images = metrics.resolve_reference(None, None, None, None, default=default, cache=False)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8 and int(images[:, 0].min()) == 255
