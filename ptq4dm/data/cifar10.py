"""CIFAR-10 as one uint8 tensor, read from the layouts researchers actually have on disk.

Formats (``data.format``):
  ``jpeg_tar``      ``cifar10-{train,test}.tar.xz`` holding ``{split}/<class>/NNNN.jpg`` (the project's JPEG copy)
  ``python``        the standard ``cifar-10-batches-py`` pickles (``data_batch_1..5``, ``test_batch``)
  ``image_folder``  ``{root}/{split}/<class>/*.{png,jpg,jpeg}``
  ``auto``          the first of the above that is present

Decoding is done once; the decoded array is cached as ``.npy`` next to nothing the user owns (``cache_dir``).
The python batches are pickles, which can run code when loaded: they are read by an unpickler that builds only
the builtin and NumPy types the format holds and refuses everything else.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ptq4dm.utils.io import atomic_save_npy, default_cache_dir

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
FORMATS = ("auto", "jpeg_tar", "python", "image_folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataNotFoundError(FileNotFoundError):
    """Raised when a data set is missing or malformed; the message says what was looked for where."""


class ImageTensorDataset(Dataset):
    """uint8 images (N, 3, H, W) with integer labels; items are single uint8 images (torch-fidelity's input form)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...], name: str):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.classes, self.name = images, labels, classes, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


@dataclass(frozen=True)
class _Layout:
    format: str
    path: Path  # the archive, batch file or folder the split is read from
    what: str  # human description for error messages


def _layouts(root: Path, split: str) -> list[_Layout]:
    batches = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    first_batch = "data_batch_1" if split == "train" else "test_batch"
    return [
        _Layout("jpeg_tar", root / f"cifar10-{split}.tar.xz", f"cifar10-{split}.tar.xz (JPEG copy)"),
        _Layout("python", batches / first_batch, f"cifar-10-batches-py/{first_batch} (python batches)"),
        _Layout("image_folder", root / split, f"{split}/<class>/*.png|jpg (image folder)"),
    ]


def find_layout(root: Path, split: str, fmt: str) -> _Layout:
    """The first layout present for ``split`` under ``root``; raises DataNotFoundError naming what was looked for."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r} is not one of {FORMATS}")
    candidates = [lay for lay in _layouts(root, split) if fmt in ("auto", lay.format)]
    for lay in candidates:
        if lay.path.exists():
            return lay
    looked = "; ".join(f"{lay.path} [{lay.what}]" for lay in candidates)
    raise DataNotFoundError(
        f"CIFAR-10 {split!r} split not found (data.root={str(root)!r}, data.format={fmt!r}). Looked for: {looked}. "
        "Point data.root at a folder holding one of these layouts."
    )


def layout_key(layout: _Layout) -> str:
    """Identifies the data a layout holds without reading it: path, size and modification time of its files."""
    paths = [layout.path] if layout.path.is_file() else sorted(p for p in layout.path.rglob("*") if p.is_file())
    if layout.format == "python":  # every batch of the split, not only the first
        paths = sorted(p for p in layout.path.parent.iterdir() if p.is_file())
    h = hashlib.sha1()
    for p in paths:
        stat = p.stat()
        h.update(f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def data_fingerprint(root: str | Path, split: str = "train", format: str = "auto") -> str | None:
    """``<format>:<layout key>`` of the data a job would read, or None when there is none."""
    try:
        layout = find_layout(Path(root).expanduser(), split, format)
    except DataNotFoundError:
        return None
    return f"{layout.format}:{layout_key(layout)}"


def _verify_checksum(archive: Path) -> None:
    sums = archive.parent / "SHA256SUMS"
    if not sums.exists():
        return
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == archive.name:
            digest = hashlib.sha256(archive.read_bytes()).hexdigest()
            if digest != parts[0]:
                raise DataNotFoundError(f"{archive} is corrupt: sha256 {digest} does not match SHA256SUMS ({parts[0]})")
            return


def _decode(data: bytes | Path) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _read_jpeg_tar(archive: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    _verify_checksum(archive)
    images, labels = [], []
    try:
        with tarfile.open(archive, "r:xz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if len(parts) < 3 or parts[-3] != split or parts[-2] not in CIFAR10_CLASSES:
                    continue
                images.append(_decode(tar.extractfile(member).read()))
                labels.append((CIFAR10_CLASSES.index(parts[-2]), member.name))
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataNotFoundError(f"{archive} is not a readable .tar.xz archive: {err}") from err
    if not images:
        raise DataNotFoundError(f"{archive} holds no images under {split}/<class>/ (classes {CIFAR10_CLASSES})")
    order = sorted(range(len(labels)), key=lambda i: labels[i][1])  # archive order is not guaranteed; names are
    return np.stack([images[i] for i in order]), np.array([labels[i][0] for i in order], dtype=np.int64)


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds (dicts, lists, bytes, numbers, NumPy arrays); any other global a
    pickle names (``os.system``, ``builtins.eval``, a class of some module) is refused before it is called."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR-10 batch holds only arrays, lists, bytes "
                                         "and numbers, and loading this would run other code")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """One ``cifar-10-batches-py`` pickle, read without running any code it may carry."""
    with open(path, "rb") as f:
        batch = _BatchUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict):
        raise ValueError(f"expected a dict with b'data' and b'labels', got {type(batch).__name__}")
    return batch


def _read_python(first_batch: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = first_batch.parent / name
        try:
            batch = read_batch(path)
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        except (OSError, KeyError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as err:
            raise DataNotFoundError(f"CIFAR-10 python batch {path} is missing, malformed or unsafe: {err}") from err
    return np.concatenate(images), np.concatenate(labels)


def _read_image_folder(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(f, c) for c in classes for f in sorted((folder / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataNotFoundError(f"image folder {folder} holds no <class>/*.png|jpg files")
    images = [_decode(f) for f, _ in files]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DataNotFoundError(f"image folder {folder} mixes image sizes {sorted(shapes)}; resize them first")
    label_of = {c: (CIFAR10_CLASSES.index(c) if c in CIFAR10_CLASSES else i) for i, c in enumerate(classes)}
    return np.stack(images), np.array([label_of[c] for _, c in files], dtype=np.int64)


_READERS = {"jpeg_tar": _read_jpeg_tar, "python": _read_python, "image_folder": _read_image_folder}


def load_cifar10(root: str | Path, split: str = "train", format: str = "auto", cache_dir: str | Path | None = None,
                 limit: int | None = None) -> ImageTensorDataset:
    """Load a CIFAR-10 split as uint8 (N, 3, 32, 32); decoded arrays are cached in ``cache_dir``."""
    if split not in SPLITS:
        raise ValueError(f"data split={split!r} is not one of {SPLITS}")
    root = Path(root).expanduser()
    layout = find_layout(root, split, format)
    key = layout_key(layout)
    cache = Path(cache_dir or default_cache_dir() / "data") / f"cifar10-{split}-{layout.format}-{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            images, labels = z["images"], z["labels"]
    else:
        images, labels = _READERS[layout.format](layout.path, split)
        atomic_save_npy(cache, images=images, labels=labels)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    name = f"cifar10-{split}-{layout.format}"
    return ImageTensorDataset(tensor, torch.from_numpy(labels), CIFAR10_CLASSES, name)
