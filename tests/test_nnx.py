"""flax nnx as a first-class model format (issue 13 item 10).

An nnx model is split into ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``;
``params`` (an ``nnx.State``) is the pytree every entry point takes, and ``loss_fn``
rebuilds the model with ``nnx.merge``. Each test checks a number against an independent
computation on the same parameters as plain arrays.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import taskvec_jax as tvj
from taskvec_jax import merging, theory


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l0 = nnx.Linear(3, 4, rngs=rngs, param_dtype=jnp.float64)
        self.l1 = nnx.Linear(4, 2, rngs=rngs, param_dtype=jnp.float64)
        self.drop = nnx.Dropout(0.5, rngs=rngs)      # holds RNG state: count and key

    def __call__(self, x):
        return self.l1(jnp.tanh(self.l0(x)))


@functools.lru_cache(maxsize=None)
def _split():
    return nnx.split(MLP(nnx.Rngs(0)), nnx.Param, ...)


def _loss(params, batch):
    graphdef, _, rest = _split()
    logits = nnx.merge(graphdef, params, rest)(batch["x"])
    return jnp.mean((logits - batch["y"]) ** 2)


def _data(seed, n=6):
    kx, ky = jax.random.split(jax.random.key(seed))
    return {"x": jax.random.normal(kx, (n, 3), jnp.float64),
            "y": jax.random.normal(ky, (n, 2), jnp.float64)}


def _plain(params):
    """The same parameters as a plain nested dict (an independent pytree)."""
    return nnx.to_pure_dict(params)


def _plain_loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["l0"]["kernel"] + p["l0"]["bias"])
    return jnp.mean((h @ p["l1"]["kernel"] + p["l1"]["bias"] - batch["y"]) ** 2)


@pytest.fixture(scope="module")
def finetuned():
    _, params, _ = _split()
    trajs = tvj.finetune_tasks(_loss, params, [_data(1), _data(2)], optax.sgd(0.1), 2)
    return params, [t.final_params for t in trajs]


def test_finetune_nnx_state_equals_plain_dict(finetuned):
    params, (ft0, _) = finetuned
    assert isinstance(ft0, nnx.State)
    plain = tvj.finetune(_plain_loss, _plain(params), _data(1), optax.sgd(0.1), 2)
    np.testing.assert_allclose(ft0["l0"]["kernel"][...],
                               plain.final_params["l0"]["kernel"], rtol=1e-12)


def test_task_vectors_and_merging_on_nnx_state(finetuned):
    params, fts = finetuned
    taus = [tvj.task_vector(ft, params) for ft in fts]
    merged = merging.task_arithmetic(params, taus, alpha=0.5)
    expect = _plain(params)["l1"]["bias"] + 0.5 * sum(
        _plain(ft)["l1"]["bias"] - _plain(params)["l1"]["bias"] for ft in fts)
    np.testing.assert_allclose(merged["l1"]["bias"][...], expect, rtol=1e-12)
    assert isinstance(merged, nnx.State)
    cos = tvj.tree.cosine(taus[0], taus[1])
    a, b = (tvj.tree.ravel(_plain(t))[0] for t in taus)
    np.testing.assert_allclose(cos, a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                               rtol=1e-12)


def test_theory_on_nnx_state():
    _, params, _ = _split()
    # Theorem 1 at k = 1 is an identity (TA == one multitask GD step); k = 2 is not.
    gap = theory.task_arithmetic_gap(_loss, params, [_data(1), _data(2)], 1e-1, 0.5, 2)
    assert float(gap.gap_norms[0]) < 1e-15 < 1e-8 < float(gap.gap_norms[1])
    w, b = theory.mlp_weight_norms(params)
    p = _plain(params)
    np.testing.assert_allclose(w, [np.linalg.norm(p[f"l{i}"]["kernel"], 2) for i in (0, 1)],
                               rtol=1e-12)
    np.testing.assert_allclose(b, [np.linalg.norm(p[f"l{i}"]["bias"]) for i in (0, 1)],
                               rtol=1e-12)


def test_mlp_weight_norms_reads_an_nnx_list_and_names_unordered_layers():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

    _, params, _ = nnx.split(Stack(nnx.Rngs(0)), nnx.Param, ...)
    w, _ = theory.mlp_weight_norms(params)
    np.testing.assert_allclose(w[1], np.linalg.norm(params["layers"][1]["kernel"][...], 2),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="layer order.*'head' has no index"):
        theory.mlp_weight_norms({"l0": {"kernel": jnp.ones((2, 2))},
                                 "head": {"kernel": jnp.ones((2, 2))}})


def test_whole_nnx_state_error_says_how_to_split():
    state = nnx.split(MLP(nnx.Rngs(0)))[1]      # Params AND the dropout's RNG state
    with pytest.raises(ValueError, match=r"drop/rngs/count/value' has dtype uint32.*"
                                         r"nnx\.split\(model, nnx\.Param, \.\.\.\)"):
        tvj.finetune(_loss, state, _data(1), optax.sgd(0.1), 1)
    with pytest.raises(ValueError, match=r"nnx\.split\(model, nnx\.Param"):
        theory.second_order_term(_loss, state, [_data(1)], 1e-2, 1.0, 2)
