import shutil

import numpy as np
import pytest
import torch

from ptq4dm.data import CIFAR10_CLASSES, DataNotFoundError, load_cifar10


def test_jpeg_copy_test_split(shared_cifar10, tmp_path):
    ds = load_cifar10(shared_cifar10, "test", cache_dir=tmp_path)
    assert ds.images.shape == (10000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.name == "cifar10-test-jpeg_tar"
    assert 60 < ds.images.float().mean() < 180  # real photographs, not an all-black decode
    # The decoded array is cached and gives the same tensor the second time.
    assert list(tmp_path.glob("cifar10-test-jpeg_tar-*.npz"))
    again = load_cifar10(shared_cifar10, "test", cache_dir=tmp_path)
    assert torch.equal(again.images, ds.images)


def test_image_folder_layout(image_folder_root, tmp_path):
    ds = load_cifar10(image_folder_root, "train", "auto", cache_dir=tmp_path)
    assert ds.images.shape == (40, 3, 32, 32) and ds.name == "cifar10-train-image_folder"
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert ds[0].dtype == torch.uint8 and ds[0].shape == (3, 32, 32)


def test_python_batches_layout(python_batches_root, tmp_path):
    train = load_cifar10(python_batches_root, "train", "python", cache_dir=tmp_path)
    test = load_cifar10(python_batches_root, "test", "auto", cache_dir=tmp_path)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (6, 3, 32, 32)
    assert train.labels[:6].tolist() == [0] * 6 and train.labels[-6:].tolist() == [4] * 6


def test_missing_data_names_what_and_where(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_cifar10(tmp_path / "nowhere", "train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "data.root" in msg
    for expected in ("cifar10-train.tar.xz", "data_batch_1", "image folder"):
        assert expected in msg


def test_format_forced_to_missing_layout(image_folder_root):
    with pytest.raises(DataNotFoundError, match="data.format='jpeg_tar'"):
        load_cifar10(image_folder_root, "train", "jpeg_tar")


def test_unknown_format_and_split(image_folder_root):
    with pytest.raises(ValueError, match="data.format='zip'"):
        load_cifar10(image_folder_root, "train", "zip")
    with pytest.raises(ValueError, match="split='val'"):
        load_cifar10(image_folder_root, "val")


def test_corrupt_archive_is_reported(tmp_path):
    (tmp_path / "cifar10-test.tar.xz").write_bytes(b"not an archive")
    with pytest.raises(DataNotFoundError, match="not a readable .tar.xz"):
        load_cifar10(tmp_path, "test", cache_dir=tmp_path / "cache")


def test_checksum_mismatch_is_reported(shared_cifar10, tmp_path):
    shutil.copy(shared_cifar10 / "cifar10-test.tar.xz", tmp_path)
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  cifar10-test.tar.xz\n")
    with pytest.raises(DataNotFoundError, match="corrupt"):
        load_cifar10(tmp_path, "test", cache_dir=tmp_path / "cache")


def test_limit(image_folder_root, tmp_path):
    ds = load_cifar10(image_folder_root, "test", limit=5, cache_dir=tmp_path)
    assert len(ds) == 5 and isinstance(ds.images.numpy(), np.ndarray)
    assert ds.classes == CIFAR10_CLASSES
