"""Clear errors at the public entry points, and the data CLI (issue 13 items 8 and 10).

Each case used to fail deep inside JAX (a broadcast TypeError, a dot_general shape error,
"Gradient only defined for scalar-output functions"); each is now a ValueError that says
what to pass, checked here by its message.
"""

import contextlib
import io
import logging

import jax.numpy as jnp
import pytest

import taskvec_jax as tvj
from taskvec_jax import data, theory
from taskvec_jax.data import __main__ as data_cli

BASE = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
TAU = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}


def test_apply_with_per_task_alpha_says_alpha_must_be_a_scalar():
    with pytest.raises(ValueError, match=r"alpha must be a scalar, got shape \(2,\).*"
                                         r"merging\.task_arithmetic"):
        tvj.apply(BASE, TAU, jnp.array([0.1, 0.2]))
    assert float(tvj.apply(BASE, TAU, jnp.array(0.5))["w"][0, 0]) == 0.5


def test_cosine_across_architectures_names_the_leaf():
    other = {"w": jnp.ones((4, 2)), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match=r"tree_y: leaf 'w' has shape \(4, 2\), tree_x has "
                                         r"\(3, 2\)"):
        tvj.tree.cosine(TAU, other)
    with pytest.raises(ValueError, match="tree_y: tree structure differs.*missing leaf 'b'"):
        tvj.tree.cosine(TAU, {"w": TAU["w"]})
    # dtypes may differ: float32 against float64 is still a cosine (1 for equal values)
    assert float(tvj.tree.cosine(TAU, {k: v.astype(jnp.float64) for k, v in TAU.items()})) \
        == pytest.approx(1.0)


def _per_example_loss(params, batch):
    return (batch["x"] @ params["w"] + params["b"] - batch["y"]).sum(-1) ** 2   # [N]


DATASETS = [{"x": jnp.ones((5, 3)), "y": jnp.zeros((5, 2))}]


@pytest.mark.parametrize("entry", ["second_order_term", "task_arithmetic_gap",
                                   "multitask_gd"])
def test_theory_with_a_per_example_loss_says_scalar_mean(entry):
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar mean loss; on task 0 "
                                         r"it returned shape \(5,\)"):
        getattr(theory, entry)(_per_example_loss, BASE, DATASETS, 0.1, 1.0, 2)


def test_get_task_is_case_insensitive():
    assert data.get_task("MNIST") is data.get_task("mnist")
    assert data.get_task("Embedded/Rotate90").name == "embedded/rotate90"
    assert data.is_registered("EuroSAT")
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        data.get_task("nope")


def test_data_check_lists_every_task_quietly(tmp_path):
    # A version folder without dataset_info.json: tfds logs an absl warning about it.
    (tmp_path / "mnist" / "3.0.1").mkdir(parents=True)
    out, logs = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(logs)
    logging.getLogger("absl").addHandler(handler)
    try:
        with contextlib.redirect_stdout(out):
            assert data_cli.main(["check", "--data_dir", str(tmp_path)]) == 0
    finally:
        logging.getLogger("absl").removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"data_dir: {tmp_path}"
    status = {line.split()[0]: " ".join(line.split()[1:]) for line in lines[1:]}
    assert set(status) == set(data.task_names())          # embedded tasks listed too
    for name in data.embedded.EMBEDDED:
        assert status[name].startswith("ready (embedded: "), status[name]
    assert status["mnist"] == "missing"
    assert logs.getvalue() == ""
