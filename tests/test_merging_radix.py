"""The radix select of merging._select on every path CPU runs do not take by default.

On CPU the row scope ranks by bit bisection (measured faster there) and the test models
fit in one histogram block; here the radix select is forced for rows and the blocks are
made tiny, so the per-row histograms, the blocked ``fori_loop``, its remainder and the
position pass over ties are all compared with the stable-argsort reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taskvec_jax.merging import _select
from tests.merging_refs import ref_mask


def _tree():
    rng = np.random.default_rng(3)
    ties = np.where(rng.random((13, 37)) < 0.5, 1.0, rng.uniform(1.5, 3.0, (13, 37)))
    return {"a": jnp.asarray(ties * rng.choice([-1.0, 1.0], (13, 37)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=101), jnp.float32),
            "c": jnp.asarray(rng.integers(-3, 4, size=(5, 2, 9)).astype(np.float64)),
            "s": jnp.asarray(0.5, jnp.float32)}


@pytest.mark.parametrize("chunk", [7, 2 ** 18])
def test_radix_select_matches_the_reference_on_every_path(monkeypatch, chunk):
    monkeypatch.setattr(_select, "_bisect_rows", lambda: False)
    monkeypatch.setattr(_select, "CHUNK", chunk)
    tree = _tree()
    leaves, treedef = jax.tree.flatten(tree)
    for scope in _select.SCOPES:
        for density, outliers in [(0.3, 0.0), (0.5, 0.1), (0.05, 0.0)]:
            masks = _select.band_masks(leaves, density, outliers, scope)   # eager: no cache
            ref = jax.tree.leaves(ref_mask(tree, density, outliers, scope))
            for m, r in zip(masks, ref):
                np.testing.assert_array_equal(np.asarray(m), r, err_msg=f"{scope} {density}")


def test_digit_widths_cover_the_bits_and_bound_the_histogram():
    assert _select._digit_widths(31, 1) == [15, 16]          # global float32: 2 passes
    assert _select._digit_widths(63, 1) == [15, 16, 16, 16]
    for groups in (1, 768, 3072, 10 ** 6):
        widths = _select._digit_widths(31, groups)
        assert sum(widths) == 31 and all(1 <= w <= 16 for w in widths)
        assert groups * 2 ** max(widths) <= max(2 ** 17, groups * 8)
