import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import ImageNetInfo  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from vitq.data import (  # noqa: E402
    ImageDataset,
    ImageRecord,
    make_loader,
    model_transform,
    scan_image_folder,
    select_records,
)
from vitq.errors import VitqError  # noqa: E402

SMALL = T.Compose([T.Resize((16, 16)), T.ToTensor()])
WNIDS = ["n01440764", "n01443537", "n15075141"]


def write_image(path, seed, fmt=None):
    rng = random.Random(seed)
    Image.frombytes("RGB", (40, 40), rng.randbytes(40 * 40 * 3)).save(path, format=fmt)


def make_tree(root, classes, per_class=3):
    """Class folders with mixed-case extensions plus files the scanner must ignore."""
    exts = [".jpg", ".PNG", ".jpeg"]
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True)
        for i in range(per_class):
            fmt = "PNG" if i % 3 == 1 else "JPEG"
            write_image(d / f"img{i}{exts[i % len(exts)]}", seed=100 * c + i, fmt=fmt)
        (d / "notes.txt").write_text("not an image")
        write_image(d / ".hidden.jpg", seed=7, fmt="JPEG")
        (d / "nested").mkdir()
        write_image(d / "nested" / "deep.jpg", seed=8, fmt="JPEG")
    write_image(root / "stray.jpg", seed=9, fmt="JPEG")
    (root / ".cache").mkdir()
    return root


def test_wnid_labels_partial_split(tmp_path):
    root = make_tree(tmp_path / "val", WNIDS)
    recs = scan_image_folder(root)
    names = ImageNetInfo().label_names()
    assert [names.index(w) for w in WNIDS] == [0, 1, 999]
    assert len(recs) == 9
    for r in recs:
        assert os.path.isabs(r.path) and os.path.basename(r.path).startswith("img")
        assert names[r.label] == os.path.basename(os.path.dirname(r.path))
    assert sorted({r.label for r in recs}) == [0, 1, 999]
    assert recs == sorted(recs, key=lambda r: (os.path.dirname(r.path), os.path.basename(r.path)))
    # A split holding only a later class is still labelled by name, never by position.
    only = make_tree(tmp_path / "only", ["n15075141"])
    assert {r.label for r in scan_image_folder(str(only))} == {999}


def test_folder_labels(tmp_path):
    root = make_tree(tmp_path / "ds", ["zebra", "apple", "mango"], per_class=2)
    recs = scan_image_folder(root, labels="folder")
    by_class = {os.path.basename(os.path.dirname(r.path)): r.label for r in recs}
    assert by_class == {"apple": 0, "mango": 1, "zebra": 2}
    assert len(recs) == 6


def test_unknown_wnid(tmp_path):
    root = make_tree(tmp_path / "ds", ["n01440764", "cats"], per_class=1)
    with pytest.raises(VitqError, match="cats") as e:
        scan_image_folder(root)
    assert "--labels folder" in str(e.value)


def test_bad_roots(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(VitqError, match=re.escape(str(missing))):
        scan_image_folder(missing)
    f = tmp_path / "file.jpg"
    write_image(f, seed=1, fmt="JPEG")
    with pytest.raises(VitqError, match=re.escape(str(f))):
        scan_image_folder(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VitqError, match="contains no images") as e:
        scan_image_folder(empty)
    assert str(empty) in str(e.value)
    (empty / "n01440764").mkdir()
    (empty / "n01440764" / "readme.txt").write_text("x")
    with pytest.raises(VitqError, match="contains no images"):
        scan_image_folder(empty)
    with pytest.raises(VitqError, match="labels"):
        scan_image_folder(empty, labels="bogus")


def test_select_records():
    recs = [ImageRecord(f"/d/c{i % 4}/img{i:03d}.jpg", i % 4) for i in range(100)]
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    a = select_records(recs, 10, seed=3)
    assert len(a) == 10 and len(set(a)) == 10
    assert a == sorted(a, key=lambda r: r.path)
    assert a == select_records(shuffled, 10, seed=3)  # independent of input order
    assert a != select_records(recs, 10, seed=4)
    assert select_records(shuffled, None, 0) == sorted(recs, key=lambda r: r.path)
    assert select_records(shuffled, 500, 0) == sorted(recs, key=lambda r: r.path)
    for bad in (0, -1):
        with pytest.raises(VitqError):
            select_records(recs, bad, 0)


def corrupt_tree(root):
    make_tree(root, WNIDS[:2], per_class=3)
    (root / WNIDS[0] / "img1b.jpg").write_bytes(random.Random(5).randbytes(2000))
    good = root / "tmp.png"
    write_image(good, seed=6, fmt="PNG")
    data = good.read_bytes()
    good.unlink()
    (root / WNIDS[1] / "img0b.png").write_bytes(data[: len(data) // 2])
    return {str(root / WNIDS[0] / "img1b.jpg"), str(root / WNIDS[1] / "img0b.png")}


def test_corrupt_files_skipped(tmp_path):
    bad = corrupt_tree(tmp_path / "ds")
    recs = scan_image_folder(tmp_path / "ds")
    assert len(recs) == 8
    ds = ImageDataset(recs, SMALL)
    flags = [ds[i][2] for i in range(len(ds))]
    assert {r.path for r, ok in zip(recs, flags) if not ok} == bad
    loader = make_loader(recs, SMALL, batch_size=3)
    assert len(loader) == 3 and loader.num_images == 8
    first = list(loader)
    good = [r for r in recs if r.path not in bad]
    images = torch.cat([x for x, _ in first])
    labels = torch.cat([y for _, y in first])
    assert images.dtype == torch.float32 and images.shape == (6, 3, 16, 16)
    assert labels.dtype == torch.long and labels.tolist() == [r.label for r in good]
    for img, r in zip(images, good):
        assert torch.equal(img, SMALL(Image.open(r.path).convert("RGB")))
    assert set(loader.skipped) == bad and len(loader.skipped) == 2
    second = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert len(second) == len(first) and len(loader.skipped) == 2


def test_all_bad_batch_is_skipped(tmp_path):
    bad = corrupt_tree(tmp_path / "ds")
    recs = [r for r in scan_image_folder(tmp_path / "ds") if r.path in bad]
    recs.append(scan_image_folder(tmp_path / "ds")[0])
    batches = list(make_loader(recs, SMALL, batch_size=2))
    assert len(batches) == 1 and batches[0][0].shape[0] == 1


def test_loader_two_workers(tmp_path):
    bad = corrupt_tree(tmp_path / "ds")
    recs = scan_image_folder(tmp_path / "ds")
    ref = list(make_loader(recs, SMALL, batch_size=3))
    loader = make_loader(recs, SMALL, batch_size=3, num_workers=2)
    got = list(loader)
    assert len(got) == len(ref)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got))
    assert set(loader.skipped) == bad


def test_model_transform(tmp_path):
    import timm

    model = timm.create_model(
        "deit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=1000
    )
    transform, desc = model_transform(model)
    json.dumps(desc)
    assert desc["input_size"] == [3, 32, 32]
    assert set(desc) >= {"input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "repr"}
    make_tree(tmp_path / "ds", WNIDS[:1], per_class=2)
    x, y = next(iter(make_loader(scan_image_folder(tmp_path / "ds"), transform, batch_size=2)))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 0]
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 1000)
