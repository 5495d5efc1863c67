"""The tensorflow-datasets tasks, read through array_record data sources without TF.

TensorFlow is not installed in the test environment, so every read here goes through
``as_data_source`` (``tfds.load`` would fail).
"""

import os
import socket
import time

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

import jax
from taskvec_jax import data

TFDS_TASKS = data.task_names("tfds")
N = 40
# (train, validation, test) sizes when every tfds split holds N examples, by the split
# rules of the registry: validation = round(10% of train) where carved; eurosat carves
# 10% test + 10% validation, resisc45 20% + 20%; dtd and sun397 have all three splits.
EXPECTED_SIZES = {
    "mnist": (36, 4, 40), "svhn": (36, 4, 40), "cifar100": (36, 4, 40),
    "eurosat": (32, 4, 4), "dtd": (40, 40, 40), "sun397": (40, 40, 40),
    "resisc45": (24, 8, 8), "cars": (36, 4, 40), "gtsrb_vdd": (36, 4, 40),
}


def _independent_crop(image, size):
    """Cover-resize with Pillow and center-crop: what 'crop' resizing promises."""
    h, w = image.shape[:2]
    s = max(size / h, size / w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    pil = PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    big = np.asarray(pil.resize((nw, nh), PIL.Image.BILINEAR))
    if big.ndim == 2:
        big = np.repeat(big[..., None], 3, axis=-1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return big[top:top + size, left:left + size].astype(np.float32) / 255


def test_registry_names_the_papers_tasks():
    names = set(data.task_names())
    for task, tfds_name, classes in [
            ("mnist", "mnist", 10), ("svhn", "svhn_cropped", 10),
            ("cifar100", "cifar100", 100), ("eurosat", "eurosat/rgb", 10),
            ("dtd", "dtd", 47), ("sun397", "sun397/tfds", 397),
            ("resisc45", "resisc45", 45), ("cars", "cars196", 196),
            ("gtsrb_vdd", "visual_domain_decathlon/gtsrb", 43)]:
        assert task in names
        spec = data.get_task(task)
        assert spec.tfds_name == tfds_name and spec.num_classes == classes
        assert data.get_task(tfds_name) is spec  # tfds names are aliases
        # Class names come from tfds' own builder code, offline.
        assert len(spec.class_names) == classes
    gtsrb = data.get_task("gtsrb")
    assert gtsrb.source == "folder" and len(gtsrb.class_names) == 43
    assert data.get_task("cars").class_names[0] == "AM General Hummer SUV 2000"
    assert data.readable_class_names(data.get_task("sun397").class_names)[:2] == (
        "abbey", "airplane cabin")
    assert data.readable_class_names(["AnnualCrop", "baseball_diamond"]) == (
        "annual crop", "baseball diamond")
    with pytest.raises(KeyError, match="unknown task 'imagenet'"):
        data.get_task("imagenet")


@pytest.mark.parametrize("task", TFDS_TASKS)
def test_every_tfds_task_loads_through_the_data_source_path(task):
    spec = data.get_task(task)
    with tfds.testing.mock_data(num_examples=N):
        out = {s: data.load_task(task, s, image_size=24, channels=3, download=True)
               for s in data.SPLITS}
        sizes = tuple(out[s]["label"].shape[0] for s in data.SPLITS)
        assert sizes == EXPECTED_SIZES[task]
        for s, batch in out.items():
            assert batch["image"].shape == (batch["label"].shape[0], 24, 24, 3)
            assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
            assert batch["label"].min() >= 0 and batch["label"].max() < spec.num_classes
        # Resizing parity: the loaded test images equal an independent Pillow resize of
        # the raw decoded records they come from.
        split = data.open_split(task, "test", image_size=24, channels=3, download=True)
        raw = tfds.data_source(spec.tfds_name, split=(spec.splits.test or "train"))
        for k in (0, len(split) - 1):
            example = raw[int(split.positions[k])]
            np.testing.assert_allclose(out["test"]["image"][k],
                                       _independent_crop(example["image"], 24), atol=1e-7)
            assert out["test"]["label"][k] == int(example["label"])
        # Carved splits partition the source split.
        carved = [s for s in ("validation", "test") if getattr(spec.splits, s) is None]
        if carved:
            parts = [data.open_split(task, s, download=True).positions
                     for s in ["train"] + carved]
            np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(N))


def test_native_resolution_and_variable_sizes():
    with tfds.testing.mock_data(num_examples=8):
        mnist = data.load_task("mnist", "test", download=True)
        assert mnist["image"].shape == (8, 28, 28, 1)
        gray3 = data.load_task("mnist", "test", channels=3, download=True)
        np.testing.assert_array_equal(gray3["image"], np.repeat(mnist["image"], 3, -1))
        with pytest.raises(ValueError, match=r"dtd\[test\]: images have different shapes"):
            data.load_task("dtd", "test", download=True)
        squashed = data.load_task("dtd", "test", image_size=(12, 20), resize_mode="squash",
                                  download=True)
        assert squashed["image"].shape == (8, 12, 20, 3)


def test_threaded_batches_equal_sequential_batches():
    with tfds.testing.mock_data(num_examples=50):
        split = data.open_split("svhn", "train", image_size=16, download=True)
        key = jax.random.key(3)
        seq = list(data.batches(split, 8, key=key, epoch=1, num_threads=0))
        par = list(data.batches(split, 8, key=key, epoch=1, num_threads=4, prefetch=3))
        assert len(seq) == len(par) == 6
        for a, b in zip(seq, par):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
        order = data.epoch_order(len(split), key, 1)
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in par]),
                                      split.load()["label"][order])


@pytest.fixture
def no_network(monkeypatch):
    """Fails any socket use, and records it (in case something swallows the error)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network use in a test that must stay offline")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return calls


@pytest.mark.parametrize("task", [t for t in data.task_names()
                                  if data.get_task(t).source != "embedded"])
def test_missing_data_fails_fast_with_both_remedies(task, tmp_path, no_network,
                                                    monkeypatch):
    prepared = []
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: prepared.append(self.name))
    start = time.perf_counter()
    with pytest.raises(data.DataNotFoundError) as err:
        data.load_task(task, "train", data_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, elapsed
    message = str(err.value)
    assert f"task {task!r}" in message
    assert str(tmp_path) in message
    assert os.path.join(str(tmp_path), f"local_{task}") in message
    if data.get_task(task).tfds_name:
        assert f"download {task}" in message and "download=True" in message
    assert "on a machine with network" in message
    assert "import_folder(PATH" in message and "local folder" in message
    assert "Nothing was downloaded" in message
    assert no_network == [] and prepared == []
    assert isinstance(err.value, FileNotFoundError)


def test_download_happens_only_when_asked(tmp_path, monkeypatch):
    calls = []

    def fake_prepare(self, *args, **kwargs):
        calls.append((self.name, kwargs.get("file_format")))
        raise RuntimeError("stop here")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_prepare)
    with pytest.raises(data.DataNotFoundError):
        data.open_split("eurosat", data_dir=tmp_path)
    assert calls == []
    with pytest.raises(RuntimeError, match="stop here"):
        data.open_split("eurosat", data_dir=tmp_path, download=True)
    assert calls == [("eurosat", "array_record")]


# ----------------------------------------------------------------- a real array_record set

class TaskvecTestTinyShapes(tfds.core.GeneratorBasedBuilder):
    """50 real examples: example i is a 6x5 image filled with value 3 * i, label i % 5."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=5),
            "id": tfds.features.Scalar(dtype=np.int64),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(50):
            image = PIL.Image.fromarray(np.full((6, 5, 3), 3 * i, np.uint8))
            yield i, {"image": image, "label": i % 5, "id": i}


@pytest.fixture
def tiny_shapes_task():
    # Registered for this test only.
    yield
    if data.is_registered("tiny_shapes"):
        data.unregister_task("tiny_shapes")


def test_prepared_array_record_dataset_is_found_and_carved(tmp_path, no_network,
                                                         tiny_shapes_task):
    spec = data.register_task(data.TaskSpec(
        "tiny_shapes", "tfds", 5, tfds_name="taskvec_test_tiny_shapes",
        splits=data.SplitPlan(test=None, validation_fraction=0.2, max_validation=None,
                              test_fraction=0.2)), overwrite=True)
    with pytest.raises(data.DataNotFoundError, match="tiny_shapes"):
        data.open_split("tiny_shapes", data_dir=tmp_path)
    data.find_prepared(spec, tmp_path, download=True)  # a local generator: no network
    assert os.path.isdir(tmp_path / "taskvec_test_tiny_shapes" / "1.0.0")
    seen = []
    for split, size in zip(data.SPLITS, (30, 10, 10)):
        ts = data.open_split("tiny_shapes", split, data_dir=tmp_path)
        batch = ts.load()
        assert batch["image"].shape == (size, 6, 5, 3)
        ids = np.array([int(ts.records[int(p)]["id"]) for p in ts.positions])
        # The pixels and labels read back are those the generator wrote for each id.
        np.testing.assert_array_equal(np.round(batch["image"][:, 0, 0, 0] * 255), 3 * ids)
        np.testing.assert_array_equal(batch["label"], ids % 5)
        seen.append(ids)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(50))
    again = data.open_split("tiny_shapes", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(again.positions, data.open_split(
        "tiny_shapes", "test", data_dir=tmp_path).positions)
    assert no_network == []
    data.unregister_task("tiny_shapes")
    assert not data.is_registered("tiny_shapes")
    with pytest.raises(KeyError, match="unknown task 'tiny_shapes'"):
        data.unregister_task("tiny_shapes")


def test_stable_permutation_is_splitmix64_order():
    """An independent pure-Python splitmix64: split carving is fixed forever."""
    mask = (1 << 64) - 1
    golden = 0x9E3779B97F4A7C15

    def mix(i, seed):
        z = (i + seed * golden + golden) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    for n, seed in [(1000, 0), (37, 5)]:
        expect = sorted(range(n), key=lambda i: (mix(i, seed), i))
        np.testing.assert_array_equal(data.stable_permutation(n, seed), expect)
    plan = data.SplitPlan(test=None, validation_fraction=0.1, max_validation=3,
                          test_fraction=0.25)
    parts = data.carve(40, plan)
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [27, 3, 10]
    with pytest.raises(ValueError, match="too few"):
        data.carve(2, plan, task="t")

