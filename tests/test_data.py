"""Datasets: embedded digits, image folders (labels from sub-folders), a fabricated CelebA folder and its crop."""

from __future__ import annotations

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
