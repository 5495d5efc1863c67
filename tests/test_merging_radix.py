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


@pytest.mark.parametrize("bins_log2", [1, 4])
def test_position_cut_by_blocks_matches_the_reference(monkeypatch, bins_log2):
    # Groups of more than 2**POSITION_BINS_LOG2 positions find the earliest tied entries
    # by one histogram of blocks of positions and a scan of one block; with few bins the
    # test tree's groups take that path, with blocks of 512 and 64 positions that views
    # cross, start inside or cover whole (the scalar leaf included).
    monkeypatch.setattr(_select, "POSITION_BINS_LOG2", bins_log2)
    tree = _tree()
    leaves = jax.tree.leaves(tree)
    for scope in ("global", "leaf"):
        for density, outliers in [(0.3, 0.0), (0.5, 0.1), (0.05, 0.0)]:
            masks = _select.band_masks(leaves, density, outliers, scope)
            ref = jax.tree.leaves(ref_mask(tree, density, outliers, scope))
            for m, r in zip(masks, ref):
                np.testing.assert_array_equal(np.asarray(m), r, err_msg=f"{scope} {density}")


def test_position_cut_of_a_large_group_with_many_ties():
    # 2**17 + 3 entries on nine magnitudes: every threshold ties, and the cut is found
    # with the default 2**16 blocks of positions (2 positions each, or 4 in the leaf).
    rng = np.random.default_rng(5)
    tree = {"w": jnp.asarray(rng.integers(-4, 5, size=(256, 384)) * 0.25, jnp.float32),
            "v": jnp.asarray(rng.integers(-4, 5, size=2 ** 17 - 256 * 384 + 3) * 0.25,
                             jnp.float32)}
    leaves = jax.tree.leaves(tree)
    for scope in ("global", "leaf"):
        for density, outliers in [(0.3, 0.0), (0.2, 0.37)]:
            masks = _select.band_masks(leaves, density, outliers, scope)
            ref = jax.tree.leaves(ref_mask(tree, density, outliers, scope))
            for m, r in zip(masks, ref):
                np.testing.assert_array_equal(np.asarray(m), r, err_msg=f"{scope} {density}")
