"""Theorem 2 of "On Task Vectors and Gradients" (arXiv 2508.16082): the feed-forward bound.

Theorem 2 bounds ``||C_k||`` (:func:`taskvec_jax.theory.second_order_term`) for
feed-forward networks: :func:`feedforward_bound` gives explicit ``G_max >= ||grad L_t||``
and ``H_max >= ||H_t||_2`` from the layers' spectral norms, the input norm and the
activation's derivative bounds (:data:`ACTIVATION_CONSTANTS`), then

    ||C_k|| <= |alpha| * T * rho * k (k - 1) / 2 * H_max * G_max,
    rho = |1 - alpha| + |alpha| (T - 1)     (so ||r_t|| <= rho * G_max),

next to the form stated in the paper's summary, ``T ((k - 2 + 2) / 2) |alpha T + 1| H_max
G_max``. docs/theory.md derives every step and reports where the stated form fails.
Everything here is closed-form arithmetic on norms: jittable and vmappable.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

__all__ = [
    "ACTIVATION_CONSTANTS", "ActivationConstants", "FeedforwardBound", "feedforward_bound",
    "paper_second_order_bound", "second_order_bound",
]


class ActivationConstants(NamedTuple):
    """What the Theorem-2 bound needs to know about an activation ``phi``.

    Attributes:
      a1: ``sup |phi'|``.
      a2: ``sup |phi''|`` (where ``phi`` is twice differentiable; 0 for ReLU, whose
        Hessian exists and has no ``phi''`` term off a measure-zero set of kinks).
      phi0: ``|phi(0)|``; with ``a1`` it gives ``|phi(u)| <= phi0 + a1 |u|``.
      sup: ``sup |phi|`` (``inf`` if unbounded).
    """

    a1: float
    a2: float
    phi0: float
    sup: float


ACTIVATION_CONSTANTS: dict[str, ActivationConstants] = {
    # phi' = 1[u > 0]; phi'' = 0 off u = 0.
    "relu": ActivationConstants(1.0, 0.0, 0.0, math.inf),
    # phi' = 1 - tanh^2 <= 1; |phi''| = 2 |tanh| (1 - tanh^2), largest at tanh^2 = 1/3.
    "tanh": ActivationConstants(1.0, 4.0 / (3.0 * math.sqrt(3.0)), 0.0, 1.0),
    # phi' = sigmoid < 1; phi'' = s (1 - s) <= 1/4; phi(0) = log 2.
    "softplus": ActivationConstants(1.0, 0.25, math.log(2.0), math.inf),
    # phi' = s (1 - s) <= 1/4; |phi''| = s (1 - s) |1 - 2 s|, largest 1 / (6 sqrt 3).
    "sigmoid": ActivationConstants(0.25, 1.0 / (6.0 * math.sqrt(3.0)), 0.5, 1.0),
    "identity": ActivationConstants(1.0, 0.0, 0.0, math.inf),
}

# (Gamma, Lambda) of the loss on the network output f: ||d ell / d f|| <= Gamma and
# ||d^2 ell / d f^2||_2 <= Lambda. Cross-entropy: d ell/df = softmax(f) - y with y a
# probability vector, ||.|| <= sqrt 2; d^2 ell/df^2 = diag(p) - p p^T, norm <= 1/2.
# Squared loss 0.5 ||f - y||^2: d ell/df = f - y (bounded via ||f||), Hessian I.
_LOSSES = ("cross_entropy", "mse")


class FeedforwardBound(NamedTuple):
    """Theorem 2's constants for one network, loss and merge (see :func:`feedforward_bound`).

    Attributes:
      jacobian_norm: ``J_max >= ||d f / d theta||_2`` for every input.
      grad_norm: ``G_max >= ||grad L_t(theta)||``.
      hessian_norm: ``H_max >= ||H_t(theta)||_2``.
      residual_norm: ``rho * G_max >= ||r_t(theta)||``.
      second_order: the project's bound on ``||C_k||``.
      paper_form: the paper summary's stated form
        ``T ((h + 2) / 2) |alpha T + 1| H_max G_max``, ``h = k - 2``.
    """

    jacobian_norm: jax.Array
    grad_norm: jax.Array
    hessian_norm: jax.Array
    residual_norm: jax.Array
    second_order: jax.Array
    paper_form: jax.Array


def second_order_bound(grad_norm, hessian_norm, num_tasks: int, alpha, num_epochs):
    """``|alpha| T rho k (k - 1) / 2 * H_max * G_max`` with ``rho = |1 - alpha| + |alpha| (T - 1)``.

    Valid for any model: if ``||grad L_t|| <= G_max`` and ``||H_t||_2 <= H_max`` at the
    points where ``C_k`` evaluates them, then ``||r_t|| <= rho G_max`` (since
    ``r_t = (1 - alpha) g_t - alpha sum_{s != t} g_s``), the inner sum of ``C_k`` has norm
    at most ``e rho G_max``, and summing ``e = 1..k-1`` over ``T`` tasks gives the bound.
    Holds for both ``hessian_at`` choices.
    """
    alpha = jnp.asarray(alpha)
    rho = jnp.abs(1.0 - alpha) + jnp.abs(alpha) * (num_tasks - 1)
    k = jnp.asarray(num_epochs)
    return jnp.abs(alpha) * num_tasks * rho * k * (k - 1) / 2 * hessian_norm * grad_norm


def paper_second_order_bound(grad_norm, hessian_norm, num_tasks: int, alpha, num_epochs):
    """The paper summary's stated form ``T ((h + 2) / 2) |alpha T + 1| H_max G_max``, ``h = k - 2``."""
    h = jnp.asarray(num_epochs) - 2
    return num_tasks * (h + 2) / 2 * jnp.abs(jnp.asarray(alpha) * num_tasks + 1) \
        * hessian_norm * grad_norm


def feedforward_bound(weight_norms: Sequence | jax.Array, input_norm, *,
                      activation: str | ActivationConstants, num_tasks: int, alpha,
                      num_epochs, loss: str = "cross_entropy",
                      bias_norms: Sequence | jax.Array | None = None,
                      widths: Sequence[int] | None = None,
                      label_norm=1.0) -> FeedforwardBound:
    """Theorem 2: explicit ``G_max``, ``H_max`` and the bound on ``||C_k||`` for an MLP.

    The network is ``h_0 = x``, ``z_l = W_l h_{l-1} + b_l``, ``h_l = phi(z_l)`` for
    ``l < L``, output ``f = z_L``, loss ``ell(f, y)`` averaged over examples. Assumed, at
    every parameter point considered: ``||W_l||_2 <= w_l``, ``||b_l|| <= beta_l``,
    ``||x|| <= B_x`` for every input, ``|phi'| <= a1``, ``|phi''| <= a2`` (docs/theory.md,
    "Theorem 2", derives every line):

    * activations: ``||h_l|| <= min(a1 ||z_l|| + sqrt(n_l) |phi(0)|, sqrt(n_l) sup|phi|)``,
      ``||z_l|| <= w_l ||h_{l-1}|| + beta_l``;
    * first derivative along a unit direction: ``S_1 = hh_0``,
      ``S_l^2 = hh_{l-1}^2 + (a1 w_l S_{l-1})^2`` with ``hh_l^2 = ||h_l||^2 + 1`` (biases);
      ``J_max = S_L``;
    * second derivative: ``Q = 2 a1 sqrt(sum_{l>=2} P_l^2 S_{l-1}^2)
      + a2 sum_{l>=2} P_l w_l S_{l-1}^2`` with ``P_l = prod_{i>l} a1 w_i``;
    * loss: ``||d ell/df|| <= Gamma``, ``||d^2 ell/df^2|| <= Lambda`` (cross-entropy:
      ``sqrt 2, 1/2``; squared: ``||f|| + ||y||, 1``);
    * ``G_max = Gamma J_max``, ``H_max = Lambda J_max^2 + Gamma Q``;
    * ``||C_k|| <= |alpha| T rho k (k - 1) / 2 H_max G_max`` (:func:`second_order_bound`).

    Jittable and vmappable in the norms, ``alpha`` and ``num_epochs``.

    Args:
      weight_norms: ``[L]`` bounds ``w_l`` on the layers' spectral norms (e.g. the
        maximum over the trajectory from :func:`mlp_weight_norms`).
      input_norm: ``B_x``, a bound on every input's Euclidean norm.
      activation: a name in :data:`ACTIVATION_CONSTANTS` or an
        :class:`ActivationConstants`.
      num_tasks: ``T``.
      alpha: the merge coefficient.
      num_epochs: ``k``.
      loss: ``"cross_entropy"`` or ``"mse"`` (``0.5 ||f - y||^2``).
      bias_norms: ``[L]`` bounds ``beta_l``, or ``None`` for a network without biases.
      widths: hidden widths ``n_1..n_{L-1}``; needed when ``phi(0) != 0`` and used to
        cap ``||h_l||`` for bounded activations.
      label_norm: bound on ``||y||`` (squared loss only; 1 for one-hot labels).

    Returns:
      A :class:`FeedforwardBound`.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATION_CONSTANTS:
            raise ValueError(f"no Theorem-2 constants for activation {activation!r}; "
                             f"choose one of {sorted(ACTIVATION_CONSTANTS)} or pass "
                             "ActivationConstants(a1, a2, phi0, sup)")
        act = ACTIVATION_CONSTANTS[activation]
    else:
        act = ActivationConstants(*activation)
    if loss not in _LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {_LOSSES}")
    w = [jnp.asarray(x) for x in (weight_norms if not hasattr(weight_norms, "shape")
                                  else [weight_norms[..., i]
                                        for i in range(weight_norms.shape[-1])])]
    depth = len(w)
    if depth == 0:
        raise ValueError("weight_norms is empty: the network needs at least one layer")
    if bias_norms is None:
        b = [jnp.zeros_like(w[0])] * depth
    else:
        b = [jnp.asarray(x) for x in (bias_norms if not hasattr(bias_norms, "shape")
                                      else [bias_norms[..., i]
                                            for i in range(bias_norms.shape[-1])])]
        if len(b) != depth:
            raise ValueError(f"bias_norms has {len(b)} layers, weight_norms has {depth}")
    if widths is not None and len(widths) != depth - 1:
        raise ValueError(f"widths must list the {depth - 1} hidden widths, got "
                         f"{len(widths)}")
    if widths is None and act.phi0 != 0 and depth > 1:
        raise ValueError(f"activation has phi(0) = {act.phi0} != 0: pass the hidden "
                         "widths so that ||phi(z)|| can be bounded")
    with_bias = bias_norms is not None

    # ||h_l|| for l = 0..L-1.
    h = [jnp.asarray(input_norm)]
    for l in range(1, depth):
        z = w[l - 1] * h[-1] + b[l - 1]
        hl = act.a1 * z
        if widths is not None:
            root_n = math.sqrt(widths[l - 1])
            hl = hl + root_n * act.phi0
            if math.isfinite(act.sup):
                hl = jnp.minimum(hl, root_n * act.sup)
        h.append(hl)
    hh = [jnp.sqrt(x ** 2 + 1.0) if with_bias else x for x in h]

    # S_l bounds ||d z_l / d theta . v|| over unit v; S[l-1] is S_l.
    s = [hh[0]]
    for l in range(2, depth + 1):
        s.append(jnp.sqrt(hh[l - 1] ** 2 + (act.a1 * w[l - 1] * s[-1]) ** 2))
    jac = s[-1]

    # Q bounds ||d^2 z_L / d theta^2 [v, v]||; P_l = prod_{i=l+1}^{L} a1 w_i.
    def p(l):
        out = jnp.ones_like(w[0])
        for i in range(l + 1, depth + 1):
            out = out * act.a1 * w[i - 1]
        return out

    cross = sum((p(l) * s[l - 2]) ** 2 for l in range(2, depth + 1)) \
        if depth > 1 else jnp.zeros_like(w[0])
    curv = sum(p(l) * w[l - 1] * s[l - 2] ** 2 for l in range(2, depth + 1)) \
        if depth > 1 else jnp.zeros_like(w[0])
    q = 2.0 * act.a1 * jnp.sqrt(cross) + act.a2 * curv

    if loss == "cross_entropy":
        gamma, lam = math.sqrt(2.0), 0.5
    else:
        gamma = w[-1] * h[-1] + b[-1] + label_norm
        lam = 1.0
    g_max = gamma * jac
    h_max = lam * jac ** 2 + gamma * q
    alpha_arr = jnp.asarray(alpha)
    rho = jnp.abs(1.0 - alpha_arr) + jnp.abs(alpha_arr) * (num_tasks - 1)
    return FeedforwardBound(
        jacobian_norm=jac, grad_norm=g_max, hessian_norm=h_max,
        residual_norm=rho * g_max,
        second_order=second_order_bound(g_max, h_max, num_tasks, alpha, num_epochs),
        paper_form=paper_second_order_bound(g_max, h_max, num_tasks, alpha, num_epochs))
