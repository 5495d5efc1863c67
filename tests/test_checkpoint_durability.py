"""Checkpoints survive corruption, a full disk and old layouts; restore needs no template.

Tiny numpy trees (no compilation): each test runs in a fraction of a second. The tests that
kill real processes are in tests/test_checkpoint_faults.py.
"""

import errno
import json
import os
import subprocess
import warnings

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import taskvec_jax as tvj
from taskvec_jax import _durable, checkpoint
from taskvec_jax.training import resumable


def _tree(i: int) -> dict:
    rng = np.random.default_rng(i)
    params = {"w": rng.normal(size=(6, 5)), "b": rng.normal(size=(5,)).astype(np.float32)}
    return {"params": params, "step": np.asarray(i, np.int64)}


def _assert_same(a, b):
    """Bit-for-bit equality of two trees, structure and container types included."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _versions(path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.startswith("version-"))


def _largest_array_file(version_dir) -> str:
    files = [os.path.join(d, f)
             for d, _, fs in os.walk(os.path.join(version_dir, "ocdbt.process_0")) for f in fs]
    return max((f for f in files if "/d/" in f), key=os.path.getsize)


# ---------------------------------------------------------------------------- layout


def test_save_writes_versions_and_keeps_max_to_keep(tmp_path):
    path = tmp_path / "ck"
    for i in range(4):
        checkpoint.save(path, _tree(i), overwrite=True)
    assert _versions(path) == ["version-3", "version-4"]
    assert sorted(os.listdir(path)) == [".lock", "version-3", "version-4"]  # no leftovers
    _assert_same(checkpoint.restore(path), _tree(3))
    checkpoint.save(path, _tree(9), overwrite=True, max_to_keep=None)
    checkpoint.save(path, _tree(10), overwrite=True, max_to_keep=None)
    assert _versions(path) == ["version-3", "version-4", "version-5", "version-6"]
    with pytest.raises(ValueError, match="max_to_keep must be a positive integer, got 0"):
        checkpoint.save(path, _tree(0), overwrite=True, max_to_keep=0)


def test_tilde_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", os.fspath(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    written = checkpoint.save("~/ck", _tree(1))
    assert written == os.fspath(tmp_path / "home" / "ck")
    assert not os.path.exists(tmp_path / "~")
    _assert_same(checkpoint.restore("~/ck"), _tree(1))
    assert checkpoint.exists("~/ck") and not checkpoint.exists("~/nothing")


def test_metadata_is_stored_with_the_arrays(tmp_path):
    path = checkpoint.save(tmp_path / "ck", _tree(1), metadata={"epoch": 3, "loss": [0.5]})
    tree, meta = checkpoint.restore(path, return_metadata=True)
    _assert_same(tree, _tree(1))
    assert meta == {"epoch": 3, "loss": [0.5]}
    with pytest.raises(ValueError, match="metadata for checkpoint .* must be JSON-serial"):
        checkpoint.save(tmp_path / "bad", _tree(1), metadata={"a": object()})
    assert not os.path.exists(tmp_path / "bad")


def test_leftovers_of_an_interrupted_save_are_never_read_and_cleaned(tmp_path):
    path = tmp_path / "ck"
    os.makedirs(path / ".staging-deadbeef" / "d")
    (path / ".staging-deadbeef" / "_METADATA").write_text("{}")
    (path / ".trash-version-1-0000").mkdir()
    with pytest.raises(ValueError, match=r"no checkpoint at .*ck \(only the leftovers of an "
                                         "interrupted save, which are never read\\)"):
        checkpoint.restore(path)
    assert not checkpoint.exists(path)
    checkpoint.save(path, _tree(2))  # leftovers only: not "already exists"
    assert sorted(os.listdir(path)) == [".lock", "version-1"]
    _assert_same(checkpoint.restore(path), _tree(2))


def test_old_layout_still_restores_and_is_replaced_whole(tmp_path):
    """A plain orbax directory at ``path`` (what save wrote before versions)."""
    path = os.fspath(tmp_path / "old")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, _tree(1))
        ckptr.wait_until_finished()
    assert checkpoint.exists(path)
    _assert_same(checkpoint.restore(path, like=_tree(1)), _tree(1))
    _assert_same(checkpoint.restore(path), _tree(1))  # plain dicts: nothing to rebuild
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        checkpoint.save(path, _tree(2))
    checkpoint.save(path, _tree(2), overwrite=True)
    assert sorted(os.listdir(path)) == [".lock", "version-1"]  # old files superseded
    _assert_same(checkpoint.restore(path), _tree(2))


# ---------------------------------------------------------------------------- no `like`


def test_restore_without_like_gives_back_usable_optimizer_state(tmp_path):
    params = _tree(0)["params"]
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2))
    grads = _tree(1)["params"]
    state = optimizer.init(params)
    _, state = optimizer.update(grads, state, params)
    traj = tvj.Trajectory(params=jax.tree.map(lambda x: np.stack([x, x]), params),
                          epochs=np.arange(2), losses=np.ones(1), epoch_gradients=None,
                          opt_state=state)
    tree = {"opt_state": state, "traj": traj, "pair": (np.ones(2), [np.zeros(1), None]),
            "ints": {3: np.asarray(1.5), 1: np.asarray(2)}}
    back = checkpoint.restore(checkpoint.save(tmp_path / "ck", tree))
    _assert_same(back, tree)  # NamedTuples, tuples, int keys and None come back as saved
    assert isinstance(back["traj"], tvj.Trajectory)
    np.testing.assert_array_equal(back["traj"].final_params["w"], params["w"])
    updates, new = optimizer.update(grads, back["opt_state"], params)  # usable as is
    updates0, new0 = optimizer.update(grads, state, params)
    _assert_same((updates, new), (updates0, new0))


@jax.tree_util.register_pytree_node_class
class Box:
    """A custom pytree node: restore cannot name it without a template."""

    def __init__(self, value):
        self.value = value

    def tree_flatten(self):
        return (self.value,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def test_restore_without_like_says_what_to_pass_for_other_nodes(tmp_path):
    tree = {"a": Box(np.arange(3.0)), "b": np.ones(2)}
    path = checkpoint.save(tmp_path / "ck", tree)
    with pytest.raises(ValueError, match=r"cannot be restored without `like`: the tree holds a "
                                         r"tests.test_checkpoint_durability:Box at /a, .* Pass "
                                         r"like= a tree of the saved structure"):
        checkpoint.restore(path)
    back = checkpoint.restore(path, like=tree)
    assert isinstance(back["a"], Box)
    np.testing.assert_array_equal(back["a"].value, np.arange(3.0))


def test_a_namedtuple_that_changed_fields_says_to_pass_like(tmp_path):
    state = optax.ScaleByAdamState(count=np.zeros((), np.int32), mu={"w": np.ones(2)},
                                   nu={"w": np.ones(2)})
    path = checkpoint.save(tmp_path / "ck", state)
    manifest_path = os.path.join(path, "version-1", _durable.MANIFEST_NAME)
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    manifest["structure"]["fields"] = ["count", "mu", "nu", "extra"]
    # a checksum-consistent rewrite: only the manifest changes (as if the class changed)
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh)
    with pytest.raises(ValueError, match=r"optax.*ScaleByAdamState at the root is no longer a "
                                         r"NamedTuple with fields .*\. Pass like="):
        checkpoint.restore(path)
    _assert_same(checkpoint.restore(path, like=state), state)


# ---------------------------------------------------------------------------- corruption


def _truncate(version_dir):
    f = _largest_array_file(version_dir)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    return os.path.relpath(f, version_dir), rf"is {size // 2} bytes, {size} were written " \
                                            r"\(cut short\)"


def _delete(version_dir):
    f = _largest_array_file(version_dir)
    os.remove(f)
    return os.path.relpath(f, version_dir), "is missing"


def _garble_metadata(version_dir):
    f = os.path.join(version_dir, "_METADATA")
    size = os.path.getsize(f)
    with open(f, "wb") as fh:
        fh.write(b"#" * size)
    return "_METADATA", "does not match its checksum"


def _garble_manifest(version_dir):
    with open(os.path.join(version_dir, _durable.MANIFEST_NAME), "w") as fh:
        fh.write('{"format": 1, "files": {"_MET')
    return "", f"its manifest {_durable.MANIFEST_NAME} is garbled"


@pytest.mark.parametrize("damage", [_truncate, _delete, _garble_metadata, _garble_manifest])
def test_damaged_newest_version_falls_back_to_the_previous_one(tmp_path, damage):
    path = os.fspath(tmp_path / "ck")
    checkpoint.save(path, _tree(1))
    checkpoint.save(path, _tree(2), overwrite=True)
    rel, what = damage(os.path.join(path, "version-2"))
    with pytest.warns(RuntimeWarning, match=rf"checkpoint {path}: the newest version is "
                                            rf"damaged \(version-2: .*{what}.*\); restored the "
                                            "previous complete version version-1 instead"):
        back = checkpoint.restore(path, like=_tree(1))
    _assert_same(back, _tree(1))
    with pytest.warns(RuntimeWarning, match=rel.replace(".", r"\.")):
        checkpoint.restore(path)
    # the previous version damaged too: a clear error naming both
    _truncate(os.path.join(path, "version-1"))
    with pytest.raises(ValueError, match=rf"checkpoint {path} is corrupt, no complete version "
                                         rf"is left: version-2: .*{what}.*; version-1: file "
                                         r".* \(cut short\)"):
        checkpoint.restore(path)
    # a later save succeeds and is what restore reads
    checkpoint.save(path, _tree(3), overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_same(checkpoint.restore(path), _tree(3))


def test_damaged_old_layout_checkpoint_names_the_path(tmp_path):
    path = os.fspath(tmp_path / "old")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, _tree(1))
        ckptr.wait_until_finished()
    with open(os.path.join(path, "_METADATA"), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match=rf"checkpoint {path} cannot be restored: a file may be "
                                         "missing, cut short or garbled"):
        checkpoint.restore(path)


def test_wrong_like_is_not_mistaken_for_corruption(tmp_path):
    path = checkpoint.save(tmp_path / "ck", _tree(1))
    checkpoint.save(path, _tree(2), overwrite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to version-1
        with pytest.raises(ValueError, match=r"ck \(version-2\) cannot be restored: it does not "
                                             r"match `like`"):
            checkpoint.restore(path, like={"other": np.zeros(3)})


# ---------------------------------------------------------------------------- full disk


def _mount_tmpfs(directory, size: str) -> bool:
    os.makedirs(directory)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                 os.fspath(directory)], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _big(i: int) -> dict:
    # random, so that compression cannot shrink it below the disk's size
    rng = np.random.default_rng(i)
    return {"params": {"w": rng.normal(size=200_000)}, "step": np.asarray(i)}


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, "1m")
    try:
        path = os.fspath(disk / "ck")
        checkpoint.save(path, _tree(1))
        if not mounted:  # no permission to mount: make orbax's write fail as a full disk
            def full(self, directory, *args, **kwargs):
                raise ValueError(f'RESOURCE_EXHAUSTED: Error writing in {directory}: No space '
                                 "left on device [os_error_code='28']")
            monkeypatch.setattr(ocp.StandardCheckpointer, "save", full)
        print(f"full disk simulated by {'a 1 MiB tmpfs' if mounted else 'monkeypatching'}")
        with pytest.raises(OSError, match=rf"no space left on device while writing {path}: the "
                                          "save did not complete and its partial files were "
                                          "removed; the previous complete version there is "
                                          "intact") as info:
            checkpoint.save(path, _big(2), overwrite=True)  # 1.6 MB of float64
        assert info.value.errno == errno.ENOSPC
        assert sorted(os.listdir(path)) == [".lock", "version-1"]  # partial files removed
        _assert_same(checkpoint.restore(path), _tree(1))
        monkeypatch.undo()
        checkpoint.save(path, _tree(3), overwrite=True)  # fits: a later save succeeds
        _assert_same(checkpoint.restore(path), _tree(3))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", os.fspath(disk)], capture_output=True, timeout=10)


def test_a_held_lock_refuses_a_second_writer(tmp_path):
    path = checkpoint.save(tmp_path / "ck", _tree(1))
    with _durable.exclusive_lock(os.path.join(path, ".lock"), "test"):
        with pytest.raises(BlockingIOError, match=rf"checkpoint {path} is being written by "
                                                  "another process right now"):
            checkpoint.save(path, _tree(2), overwrite=True)
    _assert_same(checkpoint.restore(path), _tree(1))
    checkpoint.save(path, _tree(2), overwrite=True)  # the lock is released with its holder
    _assert_same(checkpoint.restore(path), _tree(2))


def test_resumable_finetune_refuses_a_run_directory_of_the_earlier_layout(tmp_path):
    directory = os.fspath(tmp_path / "run")
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                               item_names=("state", "log")) as manager:
        manager.save(2, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": {"w": np.ones(2)}}),
            log=ocp.args.JsonSave({"losses": [1.0, 0.5], "key": None})))
        manager.wait_until_finished()
    with pytest.raises(ValueError, match=r"holds a run saved by an earlier taskvec_jax \(orbax "
                                         r"CheckpointManager steps \['2'\]\)"):
        resumable.resumable_finetune(lambda p, b: 0.0, {"w": np.ones(2)}, {"x": np.ones(3)},
                                      optax.sgd(0.1), 4, directory)
    assert sorted(os.listdir(directory)) == ["2"]  # untouched
