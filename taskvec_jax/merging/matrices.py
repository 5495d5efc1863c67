"""Which leaves the matrix merges (Iso-C, Iso-CTS, TSV-M) treat as matrices, and how.

The subspace merges act on a layer's weight as a matrix (its SVD); every other leaf is
merged by the mean of the task vectors, as in the reference code. Which leaves are
matrices, and how an N-D leaf is folded into one, is decided by a function of the leaf's
path and array, ``is_matrix(path, x)``, whose answer is:

* ``None`` or ``False``: not a matrix (merged by the mean);
* ``True``: a 2-D leaf used as it is (an error for other ranks);
* an int ``s`` with ``1 <= s < x.ndim``: the leaf is viewed as the matrix
  ``x.reshape(prod(shape[:s]), prod(shape[s:]))``: the leading ``s`` axes index rows, the
  rest columns, and the merged matrix is reshaped back.

:func:`default_is_matrix` (the default of every matrix merge):

* every 2-D leaf is a matrix: Dense kernels ``[in, out]``, and also embedding tables
  ``[vocab, width]`` and positional embeddings, as FusionBench does with every 2-D
  tensor of a state dict;
* flax ``MultiHeadDotProductAttention`` projections stored in 3-D are matrices: a
  ``query``/``key``/``value`` kernel ``[in, heads, head_dim]`` is the matrix
  ``[in, heads * head_dim]`` (split 1) and an ``out`` kernel ``[heads, head_dim, out]``
  is ``[heads * head_dim, out]`` (split 2): exactly the transposes of PyTorch's 2-D
  ``q_proj``/``out_proj`` weights;
* convolution kernels (4-D), biases, norms and scalars are not matrices: they are
  averaged, as the reference code averages PyTorch's 4-D conv weights. To merge a flax
  conv kernel ``[h, w, in, out]`` as the matrix ``[h * w * in, out]`` pass e.g.
  ``is_matrix=lambda path, x: 3 if x.ndim == 4 else default_is_matrix(path, x)``.

Orientation. Layouts differ between frameworks (PyTorch stores a linear layer as
``[out, in]``, flax as ``[in, out]``; a conv weight's axes are permuted), but Iso-C and
TSV-M are equivariant under transposition and under permutations of rows and columns
(they depend on the matrix only through its SVD), so a PyTorch checkpoint converted to
flax merges to the converted merge. Iso-CTS is not symmetric (it projects the common
subspace out of one side): it follows the flax convention, columns = outputs, which is
the PyTorch reference applied to the ``[out, in]`` weight (see :func:`~taskvec_jax.
merging.subspace.iso_cts`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

__all__ = ["MatrixRule", "as_matrix", "default_is_matrix", "matrix_split", "two_dim_is_matrix"]

MatrixRule = Callable[[str, Any], "int | bool | None"]

_ATTENTION_IN = ("query", "key", "value")


def default_is_matrix(path: str, x: Any) -> int | None:
    """The default rule: 2-D leaves, and flax's 3-D attention projections (see module).

    Args:
      path: the leaf's path, ``'params/block0/attn/query/kernel'``.
      x: the leaf (an array).

    Returns:
      The number of leading axes that index rows, or ``None`` for "not a matrix".
    """
    ndim = len(getattr(x, "shape", ()))
    if ndim == 2:
        return 1
    if ndim == 3:
        parts = path.split("/")
        if len(parts) >= 2 and parts[-1] == "kernel":
            if parts[-2] in _ATTENTION_IN:
                return 1
            if parts[-2] == "out":
                return 2
    return None


def two_dim_is_matrix(path: str, x: Any) -> int | None:
    """FusionBench's own rule: exactly the 2-D leaves are matrices."""
    del path
    return 1 if len(getattr(x, "shape", ())) == 2 else None


def matrix_split(is_matrix: MatrixRule, path: str, x: Any) -> int | None:
    """Evaluates and checks ``is_matrix(path, x)``: the row/column split, or ``None``.

    Raises:
      ValueError: naming the leaf path and shape when the answer is not ``None``/a bool/
        an int in ``[1, ndim)``, or ``True`` for a leaf that is not 2-D.
    """
    shape = tuple(getattr(x, "shape", ()))
    answer = is_matrix(path, x)
    if answer is None or answer is False:
        return None
    if answer is True:
        if len(shape) != 2:
            raise ValueError(f"is_matrix returned True for leaf '{path}' of shape {shape}; "
                             "True means a 2-D matrix: return the number of leading axes "
                             "that index rows instead")
        return 1
    if isinstance(answer, bool) or not isinstance(answer, int) or not \
            1 <= answer < len(shape):
        raise ValueError(f"is_matrix returned {answer!r} for leaf '{path}' of shape "
                         f"{shape}; expected None, a bool, or an int in [1, {len(shape)})")
    if math.prod(shape) == 0:
        return None
    return answer


def as_matrix(x: jax.Array, split: int) -> jax.Array:
    """``x`` viewed as ``[prod(shape[:split]), prod(shape[split:])]``."""
    return x.reshape(math.prod(x.shape[:split]), -1)
