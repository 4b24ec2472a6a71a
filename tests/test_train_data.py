"""asvit_kernels.train.data: datasets (digits, fake CIFAR pickles, a tiny ImageFolder), the
deterministic DDP-sharded batches, and the generator-driven batch augmentation."""
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asvit_kernels.train.data import (
    CIFAR10_MEAN, IMAGENET_MEAN, ImageFolderDataset, TensorImageDataset, augment, batches,
    num_batches, open_dataset, rank_indices, resize, to_float,
)


# ----------------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def digits():
    return open_dataset()


def test_digits_shapes_and_split(digits):
    from sklearn.datasets import load_digits

    d = digits
    assert (d.name, d.num_classes, d.image_size) == ("digits", 10, 32)
    assert len(d.train) + len(d.val) == 1797
    img, label = d.train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and isinstance(label, int)
    assert d.train.images.shape == (len(d.train), 3, 32, 32)
    assert torch.equal(d.train.images[:, 0], d.train.images[:, 2])      # grey, replicated
    assert int(d.train.images.max()) > 200 and int(d.train.images.min()) == 0
    assert len(d.mean) == len(d.std) == 3 and 0 < d.mean[0] < 1 and 0 < d.std[0] < 1

    # stratified: each class sends round(0.2 * n_c) to val
    target = torch.as_tensor(load_digits().target)
    for c in range(10):
        n_c = int((target == c).sum())
        assert int((d.val.labels == c).sum()) == round(0.2 * n_c)
    # disjoint, together everything, labels follow the source indices
    tr, va = set(d.train.indices.tolist()), set(d.val.indices.tolist())
    assert not tr & va and tr | va == set(range(1797))
    assert torch.equal(d.val.labels, target[d.val.indices])

    # pixels: the 8x8 source upsampled bilinearly, scaled to 0..255
    i = int(d.val.indices[3])
    src = torch.as_tensor(load_digits().images[i], dtype=torch.float32)[None, None] / 16
    ref = F.interpolate(src, size=(32, 32), mode="bilinear", align_corners=False)
    ref = (ref * 255).round().clamp(0, 255).to(torch.uint8)[0, 0]
    assert torch.equal(d.val.images[3, 1], ref)


def test_digits_deterministic(digits):
    again = open_dataset("digits")
    assert torch.equal(again.train.images, digits.train.images)
    assert torch.equal(again.val.indices, digits.val.indices)
    assert again.mean == digits.mean
    other = open_dataset(seed=1, image_size=16, val_fraction=0.5)
    assert not torch.equal(other.val.indices, digits.val.indices)
    assert other.train.images.shape[1:] == (3, 16, 16) and other.image_size == 16
    assert abs(len(other.val) - 1797 / 2) <= 10


# ------------------------------------------------------------------------------------------ CIFAR

def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _fake_cifar10(root, rows=2, test_rows=3):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches_ = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, rows)]
        _dump(d / f"data_batch_{i}", {"batch_label": f"batch {i}", "data": data, "labels": labels})
        batches_.append((data, labels))
    test = rng.integers(0, 256, (test_rows, 3072), dtype=np.uint8)
    test[1, 2 * 1024 + 5 * 32 + 7] = 201     # pixel (c=2, y=5, x=7) of test image 1
    test_labels = [9, 0, 3]
    _dump(d / "test_batch", {"data": test, "labels": test_labels})
    _dump(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return d, batches_, test, test_labels


def test_cifar10(tmp_path):
    d, train_batches, test, test_labels = _fake_cifar10(tmp_path)
    data = open_dataset(d)
    assert (data.name, data.num_classes, data.image_size, data.mean) == ("cifar10", 10, 32, CIFAR10_MEAN)
    assert (len(data.train), len(data.val)) == (10, 3)
    img, label = data.val[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert int(img[2, 5, 7]) == 201 and label == 0
    assert data.val.labels.tolist() == test_labels
    # train = the five batches in order; pixel (c, y, x) = row[c*1024 + y*32 + x]
    row = train_batches[2][0][1]                     # data_batch_3, row 1 -> train item 5
    for c, y, x in [(0, 0, 0), (1, 31, 0), (2, 17, 29), (0, 3, 31)]:
        assert int(data.train[5][0][c, y, x]) == int(row[c * 1024 + y * 32 + x])
    assert data.train.labels.tolist() == sum((b[1] for b in train_batches), [])
    assert data.train.classes == [f"c{i}" for i in range(10)]

    parent = open_dataset(tmp_path)                  # the directory holding cifar-10-batches-py
    assert parent.name == "cifar10" and torch.equal(parent.val.images, data.val.images)
    assert open_dataset(d, image_size=16).train.images.shape == (10, 3, 16, 16)


def test_cifar100(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    train[3, 0 * 1024 + 31 * 32 + 1] = 7              # pixel (0, 31, 1) of train image 3
    _dump(d / "train", {"data": train, "fine_labels": [99, 0, 50, 1], "coarse_labels": [0, 1, 2, 3]})
    _dump(d / "test", {"data": train[:2], "fine_labels": [5, 6], "coarse_labels": [0, 0]})
    for path in (d, tmp_path):
        data = open_dataset(path)
        assert (data.name, data.num_classes, len(data.train), len(data.val)) == ("cifar100", 100, 4, 2)
        assert data.train.labels.tolist() == [99, 0, 50, 1]
        assert int(data.train[3][0][0, 31, 1]) == 7


def test_cifar_errors(tmp_path):
    d, *_ = _fake_cifar10(tmp_path)
    _dump(d / "test_batch", {"pixels": np.zeros((1, 3072), np.uint8), "labels": [0]})
    with pytest.raises(ValueError, match="test_batch.*'data'"):
        open_dataset(d)
    (d / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        open_dataset(d)
    (d / "data_batch_2").write_bytes(b"not a pickle")
    (d / "data_batch_3").write_bytes(b"")
    with pytest.raises(ValueError, match="data_batch_2"):
        open_dataset(d)


# ------------------------------------------------------------------------------------ ImageFolder

def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(2)
    # 20 wide, 16 high; image_size 14 -> shorter side round(14 / 0.875) = 16: no resize, the crop
    # starts at x = (20 - 14) / 2 = 3, y = 1.
    pix = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    _png(tmp_path / "train" / "cat" / "a.png", pix)
    _png(tmp_path / "train" / "cat" / "sub" / "b.PNG", np.full((40, 30, 3), 9, np.uint8))
    _png(tmp_path / "train" / "ant" / "c.png", np.full((30, 50, 3), (10, 20, 30), np.uint8))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    _png(tmp_path / "val" / "cat" / "d.png", pix)

    data = open_dataset(tmp_path, image_size=14)
    assert data.num_classes == 2 and data.train.classes == ["ant", "cat"]
    assert data.name == f"imagefolder:{tmp_path.resolve()}" and data.mean == IMAGENET_MEAN
    assert isinstance(data.train, ImageFolderDataset)
    assert [label for _, label in data.train.samples] == [0, 1, 1] and len(data.val) == 1
    img, label = data.val[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 14, 14) and label == 1
    assert torch.equal(img, torch.from_numpy(pix[1:15, 3:17]).permute(2, 0, 1))
    ant, _ = data.train[0]                           # resized and cropped: still the solid colour
    assert ant.shape == (3, 14, 14) and ant[:, 7, 7].tolist() == [10, 20, 30]
    assert open_dataset(tmp_path).train[2][0].shape == (3, 224, 224)     # default size

    # through the DataLoader path, with a worker process
    imgs, labels = next(batches(data.train, batch_size=3, shuffle=False, seed=0, epoch=0, num_workers=1))
    assert imgs.shape == (3, 3, 14, 14) and labels.tolist() == [0, 1, 1] and labels.dtype == torch.int64


def test_image_folder_errors(tmp_path):
    pytest.importorskip("PIL")
    img = np.zeros((8, 8, 3), np.uint8)
    _png(tmp_path / "train" / "a" / "x.png", img)
    _png(tmp_path / "val" / "a" / "x.png", img)
    _png(tmp_path / "val" / "zebra" / "x.png", img)
    with pytest.raises(ValueError, match="zebra") as e:
        open_dataset(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "val" / "zebra" / "x.png").unlink()
    (tmp_path / "val" / "zebra").rmdir()
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no images"):
        open_dataset(tmp_path)
    (tmp_path / "train" / "empty").rmdir()
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png"):
        open_dataset(tmp_path).train[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_gives_the_same_one_line_error_with_workers(tmp_path, workers):
    # DataLoader re-raises a worker's error with the worker's whole traceback in its message.
    pytest.importorskip("PIL")
    _png(tmp_path / "train" / "a" / "good.png", np.zeros((8, 8, 3), np.uint8))
    _png(tmp_path / "val" / "a" / "good.png", np.zeros((8, 8, 3), np.uint8))
    bad = tmp_path / "train" / "a" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    data = open_dataset(tmp_path, image_size=8)
    with pytest.raises(ValueError) as e:
        list(batches(data.train, batch_size=2, shuffle=False, seed=0, epoch=0, num_workers=workers))
    message = str(e.value)
    assert message.startswith(f"cannot decode image {bad}") and "\n" not in message
    assert "Traceback" not in message and "worker" not in message


# ----------------------------------------------------------------------------------------- errors

def test_path_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        open_dataset(missing)
    for word in (str(missing), "CIFAR", "ImageFolder", "data_batch_1"):
        assert word in str(e.value)
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory") as e:
        open_dataset(f)
    assert str(f) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither") as e:
        open_dataset(str(empty))
    assert str(empty) in str(e.value) and "ImageFolder" in str(e.value) and "test_batch" in str(e.value)


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(val_fraction=0.0), ValueError, "val_fraction"),
    (dict(val_fraction=1.0), ValueError, "val_fraction"),
    (dict(val_fraction="0.2"), TypeError, "val_fraction"),
    (dict(image_size=0), ValueError, "image_size"),
    (dict(image_size=2.5), TypeError, "image_size"),
    (dict(seed="1"), TypeError, "seed"),
])
def test_argument_errors(tmp_path, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        open_dataset(tmp_path / "never-looked-at", **kwargs)   # checked before the path


# ---------------------------------------------------------------------------------------- batches

N = 103


@pytest.fixture(scope="module")
def numbered():
    """Item i: image filled with i % 256, label i (so a batch tells which items it holds)."""
    idx = torch.arange(N)
    images = (idx % 256).to(torch.uint8).view(N, 1, 1, 1).expand(N, 3, 4, 4).contiguous()
    return TensorImageDataset(images, idx)


class _Items(torch.utils.data.Dataset):
    """Not in memory as far as batches() knows: goes through the DataLoader."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def _labels(it):
    return torch.cat([y for _, y in it]) if it else torch.empty(0, dtype=torch.int64)


def test_batches_cover_and_shard(numbered):
    kw = dict(batch_size=8, shuffle=True, seed=3, epoch=0)
    out = list(batches(numbered, drop_last=False, **kw))
    assert [len(y) for _, y in out] == [8] * 12 + [7]
    x, y = out[0]
    assert x.dtype == torch.uint8 and x.shape == (8, 3, 4, 4) and y.dtype == torch.int64
    assert torch.equal(x[:, 0, 0, 0].long(), y % 256)
    assert sorted(_labels(out).tolist()) == list(range(N))
    assert _labels(out).tolist() != list(range(N))                 # shuffled

    for drop_last in (True, False):
        r0, r1 = (_labels(list(batches(numbered, rank=r, world=2, drop_last=drop_last, **kw)))
                  for r in (0, 1))
        assert len(r0) == len(r1)
        if drop_last:
            assert not set(r0.tolist()) & set(r1.tolist()) and len(r0) % 8 == 0
        else:                                                    # wrap-padded: one repeat
            assert set(r0.tolist()) | set(r1.tolist()) == set(range(N)) and len(r0) == 52

    assert torch.equal(_labels(list(batches(numbered, **kw))), _labels(list(batches(numbered, **kw))))
    assert not torch.equal(_labels(list(batches(numbered, **kw))),
                           _labels(list(batches(numbered, **{**kw, "epoch": 1}))))
    plain = _labels(list(batches(numbered, batch_size=10, shuffle=False, seed=0, epoch=5)))
    assert plain.tolist() == list(range(100))


def test_batches_skip_and_loader_path(numbered):
    kw = dict(batch_size=6, shuffle=True, seed=1, epoch=2, rank=1, world=3, drop_last=False)
    full = list(batches(numbered, **kw))
    for k in (0, 1, 4, len(full)):
        tail = list(batches(numbered, skip=k, **kw))
        assert len(tail) == len(full) - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, full[k:]))
    slow = list(batches(_Items(numbered), skip=2, **kw))              # DataLoader, in-process
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(slow, full[2:]))
    assert len(slow) == len(full) - 2
    sub = torch.utils.data.Subset(numbered, list(range(50, 100)))
    assert sorted(_labels(list(batches(sub, batch_size=7, shuffle=True, seed=0, epoch=0,
                                       drop_last=False))).tolist()) == list(range(50, 100))
    assert torch.equal(rank_indices(N, shuffle=True, seed=1, epoch=2, rank=1, world=3, drop_last=False),
                       _labels(full))


@pytest.mark.parametrize("n, bs, world, drop_last", [
    (103, 8, 1, True), (103, 8, 1, False), (103, 8, 2, True), (103, 8, 4, False),
    (5, 2, 8, False), (5, 2, 8, True), (0, 4, 2, False), (16, 4, 2, True),
])
def test_num_batches(n, bs, world, drop_last):
    ds = TensorImageDataset(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n))
    per_rank = [list(batches(ds, batch_size=bs, shuffle=True, seed=0, epoch=0, rank=r, world=world,
                             drop_last=drop_last)) for r in range(world)]
    assert all(len(b) == num_batches(n, batch_size=bs, world=world, drop_last=drop_last) for b in per_rank)


def test_batches_errors(numbered):
    kw = dict(batch_size=8, shuffle=False, seed=0, epoch=0)
    with pytest.raises(ValueError, match="rank"):
        batches(numbered, rank=2, world=2, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        batches(numbered, **{**kw, "batch_size": 0})
    with pytest.raises(ValueError, match="skip"):                # raised at the call, not lazily
        batches(numbered, skip=num_batches(N, batch_size=8, world=1, drop_last=True) + 1, **kw)
    with pytest.raises(TypeError, match="seed"):
        batches(numbered, **{**kw, "seed": 1.5})


# ----------------------------------------------------------------------------------- augmentation

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (16, 3, 12, 10), generator=g, dtype=torch.uint8)


def _aug(images, seed, **kw):
    return augment(images, torch.Generator().manual_seed(seed), mean=MEAN, std=STD, **kw)


def test_to_float_and_resize(images):
    x = to_float(images, MEAN, STD)
    ref = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1, 1)) \
        / torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    assert x.dtype == torch.float32 and torch.allclose(x.double(), ref, atol=1e-5)
    assert resize(x, 7).shape == (16, 3, 7, 7)
    sq = x[..., :10, :]
    assert resize(sq, 10) is sq
    with pytest.raises(TypeError, match="images"):
        resize(images, 7)
    with pytest.raises(ValueError, match="images_uint8"):
        to_float(images.float(), MEAN, STD)


def test_augment_deterministic(images):
    rng_state = torch.get_rng_state()
    a, b, c = _aug(images, 7), _aug(images, 7), _aug(images, 8)
    assert torch.equal(torch.get_rng_state(), rng_state)          # the global RNG is untouched
    assert a.dtype == torch.float32 and a.shape == images.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    out = _aug(images, 7, out_size=24)
    assert out.shape == (16, 3, 24, 24) and torch.isfinite(out).all()
    assert not torch.equal(a, to_float(images, MEAN, STD))       # something was cropped


def test_augment_flip_only(images):
    # ratio is the crop's width / height in pixels, so area 1 and ratio 1 is the whole image only
    # when the image is square
    images = images[:, :, 1:11, :]
    x = to_float(images, MEAN, STD)
    out = _aug(images, 3, scale=(1, 1), ratio=(1, 1))
    flipped = 0
    for i in range(len(images)):
        if torch.allclose(out[i], x[i], atol=1e-4):
            continue
        assert torch.allclose(out[i], x[i].flip(-1), atol=1e-4), i
        flipped += 1
    assert 0 < flipped < len(images)
    same = _aug(images, 3, scale=(1, 1), ratio=(1, 1), flip=False)
    assert torch.allclose(same, x, atol=1e-4)


def test_augment_crop_geometry():
    # A horizontal ramp: every crop of it, resampled, stays inside the crop's value range and is
    # non-decreasing along x (or non-increasing when flipped).
    ramp = torch.arange(1, 65, dtype=torch.uint8).view(1, 1, 1, 64).expand(8, 3, 64, 64).contiguous()
    out = augment(ramp, torch.Generator().manual_seed(0), mean=(0, 0, 0), std=(1, 1, 1),
                  out_size=32, scale=(0.1, 0.5))
    assert out.shape == (8, 3, 32, 32)
    d = out[:, 0, 0].diff(dim=-1)
    assert bool(((d >= -1e-6).all(-1) | (d <= 1e-6).all(-1)).all())
    assert float(out.min()) >= 1 / 255 - 1e-6 and float(out.max()) <= 64 / 255 + 1e-6
    span = out[:, 0, 0].amax(-1) - out[:, 0, 0].amin(-1)
    assert bool((span < 60 / 255).all())                         # crops, not the whole ramp


def test_augment_errors(images):
    with pytest.raises(ValueError, match="scale"):
        _aug(images, 0, scale=(0.5, 1.5))
    with pytest.raises(TypeError, match="generator"):
        augment(images, 0, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="mean"):
        augment(images, torch.Generator(), mean=(0.5,), std=STD)
