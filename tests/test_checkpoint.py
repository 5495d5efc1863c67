import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import taskvec_jax as tvj
from taskvec_jax import checkpoint
from taskvec_jax.training import resumable
from taskvec_jax.models import MLP, make_loss_fn
from tests.helpers import digits, init, max_abs_diff


def _setup():
    data = digits(90)
    model = MLP((12, 10), "tanh", param_dtype=jnp.float64)
    return make_loss_fn(model), init(model, data), data


def test_params_and_trajectory_roundtrip_exactly(tmp_path):
    loss_fn, params, data = _setup()
    traj = tvj.finetune(loss_fn, params, data, optax.adam(1e-2), 3, keep_epochs="all",
                        record_gradients=True)
    path = checkpoint.save(tmp_path / "traj", traj)
    assert os.path.isabs(path)
    back = checkpoint.restore(path, like=traj)
    assert isinstance(back, tvj.Trajectory)
    assert max_abs_diff(back.params, traj.params) == 0.0
    assert max_abs_diff(back.epoch_gradients, traj.epoch_gradients) == 0.0
    assert jax.tree.structure(back.opt_state) == jax.tree.structure(traj.opt_state)
    np.testing.assert_array_equal(back.epochs, traj.epochs)
    raw = checkpoint.restore(checkpoint.save(tmp_path / "p", params))
    assert max_abs_diff(raw, params) == 0.0


def test_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, params, _ = _setup()
    path = checkpoint.save("relative/ckpt", params)
    assert path == str(tmp_path / "relative" / "ckpt")
    assert max_abs_diff(checkpoint.restore("relative/ckpt", like=params), params) == 0.0


def test_existing_checkpoint_is_never_clobbered(tmp_path):
    _, params, _ = _setup()
    path = checkpoint.save(tmp_path / "ckpt", params)
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        checkpoint.save(path, tvj.tree.scale(2.0, params))
    assert max_abs_diff(checkpoint.restore(path, like=params), params) == 0.0
    checkpoint.save(path, tvj.tree.scale(2.0, params), overwrite=True)
    assert max_abs_diff(checkpoint.restore(path, like=params),
                        tvj.tree.scale(2.0, params)) == 0.0
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging leftovers
    with pytest.raises(ValueError, match="no checkpoint at"):
        checkpoint.restore(tmp_path / "missing")


@pytest.mark.parametrize("mode", ["full", "minibatch"])
def test_interrupted_run_resumes_bit_for_bit(tmp_path, mode):
    loss_fn, params, data = _setup()
    opt = optax.adamw(optax.cosine_decay_schedule(1e-2, 6), weight_decay=1e-2)
    kw = {} if mode == "full" else {"batch_size": 16}
    key = jax.random.key(4)
    straight = tvj.finetune(loss_fn, params, data, opt, 6, key=key, **kw)
    # "interrupted" after epoch 4: the run directory holds epochs 2 and 4 ...
    state, _ = resumable.resumable_finetune(loss_fn, params, data, opt, 4, tmp_path / "run",
                                           save_every=2, key=key, **kw)
    assert state.epoch == 4
    # ... and a fresh call picks up from epoch 4 and finishes
    state, losses = resumable.resumable_finetune(loss_fn, params, data, opt, 6,
                                                 tmp_path / "run", save_every=2, key=key,
                                                 **kw)
    assert state.epoch == 6
    assert max_abs_diff(state.params, straight.final_params) == 0.0
    np.testing.assert_array_equal(losses, straight.losses)
    with pytest.raises(ValueError, match="different PRNG key"):
        resumable.resumable_finetune(loss_fn, params, data, opt, 8, tmp_path / "run",
                                     save_every=2, key=jax.random.key(5), **kw)
    with pytest.raises(ValueError, match="beyond num_epochs=3"):
        resumable.resumable_finetune(loss_fn, params, data, opt, 3, tmp_path / "run",
                                     save_every=2, key=key, **kw)


def test_resume_via_finetune_start_epoch_matches():
    loss_fn, params, data = _setup()
    opt = optax.adam(1e-2)
    key = jax.random.key(0)
    straight = tvj.finetune(loss_fn, params, data, opt, 5, batch_size=20, key=key)
    first = tvj.finetune(loss_fn, params, data, opt, 2, batch_size=20, key=key)
    rest = tvj.finetune(loss_fn, first.final_params, data, opt, 3, batch_size=20, key=key,
                        opt_state=first.opt_state, start_epoch=2, keep_epochs="all")
    np.testing.assert_array_equal(rest.epochs, [2, 3, 4, 5])
    assert max_abs_diff(rest.final_params, straight.final_params) == 0.0
