"""resumable_finetune refuses to resume another run (issue 13 item 7, fingerprint).

One run of one epoch is written once (module fixture); every mismatched resume must be
refused by its message, before any training, and the matching one must extend the run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taskvec_jax.training import resumable

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "b": jnp.zeros(2)}
DATA = {"x": jnp.arange(24.0).reshape(8, 3) / 24, "y": jnp.ones((8, 2))}


def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)


def _run(directory, num_epochs=1, *, loss=loss_fn, data=DATA, optimizer=None, **kw):
    return resumable.resumable_finetune(loss, PARAMS, data, optimizer or optax.sgd(0.1),
                                        num_epochs, directory, **kw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fingerprint") / "run"
    state, _ = _run(directory)
    assert state.epoch == 1
    return directory


@pytest.mark.parametrize("change, message", [
    (dict(data={"x": DATA["x"] + 1.0, "y": DATA["y"]}),
     r"the data changed \(same shapes, different contents\)"),
    (dict(data={"x": DATA["x"][:4], "y": DATA["y"][:4]}),
     r"the data changed \(leaf shapes/dtypes differ\)"),
    (dict(optimizer=optax.adam(0.1)),
     r"the optimizer changed \(its state has a different structure\)"),
    (dict(optimizer=optax.sgd(0.2)), r"the optimizer changed \(different hyperparameters\)"),
    (dict(loss=lambda p, b: 2.0 * loss_fn(p, b)), r"the loss function changed \(loss_fn -> "),
    (dict(batch_size=4, key=None), r"the configuration changed \(batch_size: None -> 4\)"),
])
def test_mismatched_resume_is_refused_naming_what_changed(run_dir, change, message):
    with pytest.raises(ValueError, match="holds another run's checkpoint: " + message):
        _run(run_dir, 2, **change)


def test_same_run_with_a_new_optimizer_object_resumes(run_dir):
    """A fresh optax.sgd(0.1) (another object, same hyperparameters) is the same run."""
    straight, _ = resumable.resumable_finetune(loss_fn, PARAMS, DATA, optax.sgd(0.1), 2,
                                               run_dir.parent / "straight")
    state, losses = _run(run_dir, 2, optimizer=optax.sgd(0.1))
    assert state.epoch == 2 and len(losses) == 2
    np.testing.assert_array_equal(state.params["w"], straight.params["w"])


def test_fingerprint_sees_captured_numbers():
    def make(scale):
        return lambda p, b: scale * loss_fn(p, b)

    fp = [resumable.run_fingerprint(make(s), PARAMS, DATA, optax.sgd(0.1))["loss"]
          for s in (1.0, 1.0, 2.0)]
    assert fp[0] == fp[1] != fp[2]
    sched = [resumable.run_fingerprint(loss_fn, PARAMS, DATA, optax.adam(
        optax.cosine_decay_schedule(1e-2, n)))["optimizer"] for n in (6, 6, 7)]
    assert sched[0] == sched[1] != sched[2]
    assert jax.tree.leaves(fp)   # non-empty
