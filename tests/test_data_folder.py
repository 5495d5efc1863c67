"""Local-folder import: a folder of class sub-folders becomes an array_record dataset."""

import os

import numpy as np
import PIL.Image
import pytest

import jax
from taskvec_jax import data


def _write(path, array, **save_kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path, **save_kwargs)


@pytest.fixture
def png_folder(tmp_path):
    """3 classes x 7 RGB PNGs of 10x12 random pixels, plus a stray non-image file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "flowers"
    truth = {}
    for c in ("daisy", "rose", "tulip"):
        for i in range(7):
            rel = os.path.join(c, f"img_{i}.png")
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            _write(os.fspath(root / rel), pixels)
            truth[rel] = (pixels, c)
    (root / "rose" / "notes.csv").write_text("not an image")
    return root, truth


def _by_filename(split):
    """The loaded split and each row's filename (read from the stored records)."""
    batch = split.load()
    names = [split.records[int(p)]["filename"] for p in split.positions]
    return batch, [n.decode() if isinstance(n, bytes) else n for n in names]


def test_folder_reads_back_the_same_pixels_and_labels(png_folder, tmp_path):
    root, truth = png_folder
    out = data.import_folder(root, "flowers", data_dir=tmp_path / "dd")
    assert out == os.fspath(tmp_path / "dd" / "local_flowers" / "1.0.0")
    assert any(f.startswith("local_flowers-train.array_record") for f in os.listdir(out))
    spec = data.task_spec("flowers", tmp_path / "dd")
    assert spec.class_names == ("daisy", "rose", "tulip") and spec.num_classes == 3
    seen = []
    for split, size in zip(data.SPLITS, (15, 2, 4)):  # test 20%, validation 10% carved
        ts = data.open_split("flowers", split, data_dir=tmp_path / "dd")
        batch, names = _by_filename(ts)
        assert batch["image"].shape == (size, 10, 12, 3) and len(names) == size
        for image, label, name in zip(batch["image"], batch["label"], names):
            pixels, cls = truth[name]
            np.testing.assert_array_equal(np.round(image * 255).astype(np.uint8), pixels)
            assert spec.class_names[label] == cls
        seen += names
    assert sorted(seen) == sorted(truth)  # splits partition the folder, nothing lost
    # The same through the uniform API, resized.
    small = data.load_task("flowers", "train", data_dir=tmp_path / "dd", image_size=8)
    assert small["image"].shape == (15, 8, 8, 3)


def test_train_test_layout_with_grayscale_jpegs_keeps_the_pixels(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "gtsrb"
    files = {}
    for split in ("train", "test"):
        for k in (0, 1, 42):
            for i in range(4 if split == "train" else 2):
                path = os.fspath(root / split / f"{k:05d}" / f"{i}.jpg")
                _write(path, rng.integers(0, 256, (9, 9), dtype=np.uint8), quality=90)
                files[os.path.relpath(path, root)] = (path, k)
    out = data.import_folder(root, "gtsrb", data_dir=tmp_path / "dd")
    # All-JPEG folders are stored as their JPEG bytes (no re-encoding, no PNG bloat).
    import tensorflow_datasets as tfds
    features = tfds.builder_from_directory(out).info.features
    assert features["image"].encoding_format == "jpeg"
    assert features["image"].shape == (None, None, 1)
    train = data.open_split("gtsrb", "train", data_dir=tmp_path / "dd")
    test = data.open_split("gtsrb", "test", data_dir=tmp_path / "dd")
    val = data.open_split("gtsrb", "validation", data_dir=tmp_path / "dd")
    assert (len(train), len(val), len(test)) == (11, 1, 6)  # official test kept
    assert train.num_classes == 43  # integer folder k is GTSRB label k
    for ts in (train, val, test):
        batch, names = _by_filename(ts)
        assert batch["image"].shape[1:] == (9, 9, 1)
        for image, label, name in zip(batch["image"], batch["label"], names):
            path, k = files[name]
            assert label == k
            with PIL.Image.open(path) as im:  # the JPEG's own decoding: bytes were kept
                np.testing.assert_array_equal(np.round(image[..., 0] * 255), np.asarray(im))
    rgb = data.load_task("gtsrb", "test", data_dir=tmp_path / "dd", channels=3)
    assert rgb["image"].shape == (6, 9, 9, 3)


def test_registered_task_maps_folders_onto_its_class_names(tmp_path):
    root = tmp_path / "nwpu"
    for name in ("Baseball Diamond", "airplane", "sea-ice"):
        for i in range(3):
            _write(os.fspath(root / name / f"{i}.png"), np.full((4, 4, 3), i, np.uint8))
    data.import_folder(root, "resisc45", data_dir=tmp_path / "dd")
    spec = data.get_task("resisc45")
    split = data.open_split("resisc45", "train", data_dir=tmp_path / "dd")
    batch, names = _by_filename(split)
    for label, name in zip(batch["label"], names):
        folder = name.split(os.sep)[0]
        expect = {"Baseball Diamond": "baseball_diamond", "airplane": "airplane",
                  "sea-ice": "sea_ice"}[folder]
        assert spec.class_names[label] == expect
    bad = tmp_path / "bad"
    _write(os.fspath(bad / "not_a_scene" / "0.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"class folders \['not_a_scene'\] match none"):
        data.import_folder(bad, "resisc45", data_dir=tmp_path / "dd2")


def test_import_refuses_to_overwrite_unless_asked(png_folder, tmp_path):
    root, _ = png_folder
    data.import_folder(root, "flowers", data_dir=tmp_path / "dd")
    with pytest.raises(FileExistsError, match="already imported"):
        data.import_folder(root, "flowers", data_dir=tmp_path / "dd")
    os.remove(root / "tulip" / "img_0.png")
    data.import_folder(root, "flowers", data_dir=tmp_path / "dd", overwrite=True)
    assert sum(len(data.open_split("flowers", s, data_dir=tmp_path / "dd"))
               for s in data.SPLITS) == 20
    with pytest.raises(ValueError, match="no class sub-folders containing images"):
        os.makedirs(tmp_path / "empty" / "a")
        data.import_folder(tmp_path / "empty", "empty", data_dir=tmp_path / "dd")
    with pytest.raises(KeyError, match="unknown task 'never_imported'"):
        data.open_split("never_imported", data_dir=tmp_path / "dd")


def test_file_backed_batches_are_deterministic_across_threads(png_folder, tmp_path):
    root, _ = png_folder
    data.import_folder(root, "flowers", data_dir=tmp_path / "dd")
    split = data.open_split("flowers", "train", data_dir=tmp_path / "dd")
    key = jax.random.key(11)
    a = list(data.batches(split, 4, key=key, epoch=2, num_threads=0))
    b = list(data.batches(split, 4, key=key, epoch=2, num_threads=3, prefetch=2))
    assert [x["label"].shape[0] for x in a] == [4, 4, 4, 3]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    full = split.load()
    order = data.epoch_order(len(split), key, 2)
    np.testing.assert_array_equal(np.concatenate([x["image"] for x in b]),
                                  full["image"][order])
