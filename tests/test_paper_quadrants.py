"""The main job's suite, embedded_quadrants (taskvec_jax/data/embedded.py), against an
independent construction from the raw MNIST digits."""

import numpy as np
import pytest

from taskvec_jax import data
from taskvec_jax.data import embedded

VIEWS = {  # task -> (quadrant, view of the pooled 14x14 digit, label of the digit)
    "embedded/q0_rotate180": (0, lambda v: np.rot90(v, 2), lambda y: y),
    "embedded/q0_parity": (0, np.fliplr, lambda y: y % 2),
    "embedded/q1_rotate90": (1, lambda v: np.rot90(v, 1), lambda y: y),
    "embedded/q1_high_low": (1, np.flipud, lambda y: int(y >= 5)),
    "embedded/q2_invert": (2, lambda v: 255 - v, lambda y: y),
    "embedded/q2_mod3": (2, np.transpose, lambda y: y % 3),
    "embedded/q3_permute": (3, lambda v: v.reshape(-1)[data.stable_permutation(196, 1)]
                            .reshape(14, 14), lambda y: y),
    "embedded/q3_reversed": (3, lambda v: np.rot90(v, -1), lambda y: 9 - y),
}


def _pool(image):
    s = image.astype(np.int64)
    return ((s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4
            ).astype(np.uint8)


def _frame(quadrant, content):
    out = np.zeros((28, 28), np.uint8)
    r, c = 14 * (quadrant // 2), 14 * (quadrant % 2)
    out[r:r + 14, c:c + 14] = content
    return out


def test_the_suite_is_registered_with_its_source():
    suite = data.SUITES["embedded_quadrants"]
    assert suite.tasks == tuple(VIEWS) == embedded.QUADRANTS_TASKS
    assert suite.source == "embedded/source_quadrants"
    # the embedded suite itself is unchanged
    assert "embedded/q0_parity" not in data.SUITES["embedded"].tasks


@pytest.mark.parametrize("task", list(VIEWS))
def test_each_task_is_its_view_of_the_pooled_digit_in_its_quadrant(task):
    quadrant, view, label = VIEWS[task]
    images, labels = embedded.mnist5k()
    x, y = embedded.task_arrays(task, "test")
    index = embedded.split_indices(task, "test")
    # the same task-pool digits as the embedded suite's tasks
    np.testing.assert_array_equal(index, embedded.split_indices("embedded/rotate90", "test"))
    for i in (0, 1, 17, len(index) - 1):
        want = _frame(quadrant, view(_pool(images[index[i]])))
        np.testing.assert_array_equal(x[i, :, :, 0], want)
        assert y[i] == label(labels[index[i]])
    assert x.shape == (1000, 28, 28, 1) and x.dtype == np.uint8
    # nothing outside the quadrant
    mask = _frame(quadrant, np.ones((14, 14), np.uint8)).astype(bool)
    assert not np.any(x[:, ~mask, 0]) and np.any(x[:, mask, 0])


def test_the_source_puts_example_i_in_quadrant_i_mod_4():
    images, labels = embedded.mnist5k()
    x, y = embedded.task_arrays("embedded/source_quadrants", "train")
    index = embedded.split_indices("embedded/source", "train")
    np.testing.assert_array_equal(index, embedded.split_indices("embedded/source_quadrants",
                                                                "train"))
    for i in range(8):
        np.testing.assert_array_equal(x[i, :, :, 0], _frame(i % 4, _pool(images[index[i]])))
    np.testing.assert_array_equal(y, labels[index])
