"""A JSON description of a pytree's containers, to restore it without a template (private).

orbax restores a tree without a target as plain dicts and lists: an optax state
``(ScaleByAdamState(count, mu, nu), EmptyState())`` comes back as
``[{"count": ..., "mu": ..., "nu": ...}, None]``, which ``optimizer.update`` cannot use.
``describe`` records, next to the arrays, what every container was (dict with its keys,
list, tuple, NamedTuple by importable class name and fields, ``None``), and ``rebuild``
puts orbax's plain restore back into those containers. Containers it cannot name (flax
struct dataclasses, ``nnx.State``, equinox modules, any custom pytree node) are recorded
as unsupported, and ``rebuild`` then says to pass ``like=``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import jax

__all__ = ["UnsupportedTree", "check", "describe", "rebuild"]


class UnsupportedTree(ValueError):
    """The description cannot be rebuilt without a template (the message says why)."""


def _type_name(t: type) -> str:
    return f"{t.__module__}:{t.__qualname__}"


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def describe(tree: Any) -> dict:
    """The JSON-serializable description of ``tree``'s containers."""
    if tree is None:
        return {"t": "none"}
    if type(tree) is dict:
        keys = list(tree)
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
            return {"t": "unsupported", "type": "dict with non-str/int keys"}
        return {"t": "dict", "keys": [[type(k).__name__, k] for k in keys],
                "children": [describe(tree[k]) for k in keys]}
    if _is_namedtuple(tree):
        return {"t": "namedtuple", "type": _type_name(type(tree)),
                "fields": list(type(tree)._fields),
                "children": [describe(c) for c in tree]}
    if type(tree) in (list, tuple):
        return {"t": type(tree).__name__, "children": [describe(c) for c in tree]}
    if jax.tree_util.all_leaves([tree]):
        return {"t": "leaf"}
    return {"t": "unsupported", "type": _type_name(type(tree))}


def _find_class(name: str) -> type:
    module_name, qualname = name.split(":", 1)
    module = sys.modules.get(module_name)
    if module is None:
        module = importlib.import_module(module_name)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _child(raw: Any, key: Any, index: int) -> Any:
    if isinstance(raw, dict):
        for k in (key, str(key), str(index)):
            if k in raw:
                return raw[k]
    elif isinstance(raw, (list, tuple)) and index < len(raw):
        return raw[index]
    return None  # orbax drops empty containers; rebuild() checks what may be absent


def _namedtuple_class(spec: dict, at: str) -> type:
    try:
        cls = _find_class(spec["type"])
    except (ImportError, AttributeError, ValueError) as e:
        raise UnsupportedTree(f"the NamedTuple {spec['type']} at {at} cannot be "
                              f"imported here ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, tuple)
            and list(getattr(cls, "_fields", ())) == spec["fields"]):
        raise UnsupportedTree(f"{spec['type']} at {at} is no longer a NamedTuple with "
                              f"fields {spec['fields']}")
    return cls


def check(spec: dict | None, where: str = "") -> None:
    """Raises :class:`UnsupportedTree` unless :func:`rebuild` can rebuild ``spec``."""
    if not isinstance(spec, dict) or "t" not in spec:
        raise UnsupportedTree("no description of its containers was saved")
    at = where or "the root"
    if spec["t"] == "unsupported":
        raise UnsupportedTree(f"the tree holds a {spec['type']} at {at}, which cannot be "
                              "rebuilt from its description")
    if spec["t"] == "namedtuple":
        _namedtuple_class(spec, at)
    labels = ([k for _, k in spec["keys"]] if spec["t"] == "dict"
              else spec.get("fields") or range(len(spec.get("children", ()))))
    for label, child in zip(labels, spec.get("children", ())):
        check(child, f"{where}/{label}")


def rebuild(spec: dict, raw: Any, where: str = "") -> Any:
    """``raw`` (orbax's restore without a target) back in the containers of ``spec``.

    Raises:
      UnsupportedTree: a container cannot be rebuilt (an unsupported pytree node, a
        NamedTuple class that cannot be imported or whose fields changed); the message
        names the tree path.
    """
    kind = spec["t"]
    at = where or "the root"
    if kind == "none":
        return None
    if kind == "leaf":
        if raw is None:
            raise UnsupportedTree(f"the stored arrays have no leaf at {at}")
        return raw
    if kind == "unsupported":
        raise UnsupportedTree(f"the tree holds a {spec['type']} at {at}, which cannot be "
                              "rebuilt from its description")
    children = spec["children"]
    if kind == "dict":
        keys = [int(k) if t == "int" else k for t, k in spec["keys"]]
        return {k: rebuild(c, _child(raw, k, i), f"{where}/{k}")
                for i, (k, c) in enumerate(zip(keys, children))}
    if kind in ("list", "tuple"):
        out = [rebuild(c, _child(raw, i, i), f"{where}/{i}")
               for i, c in enumerate(children)]
        return out if kind == "list" else tuple(out)
    if kind == "namedtuple":
        cls = _namedtuple_class(spec, at)
        fields = spec["fields"]
        return cls(*[rebuild(c, _child(raw, f, i), f"{where}/{f}")
                     for i, (f, c) in enumerate(zip(fields, children))])
    raise UnsupportedTree(f"unknown container kind {kind!r} at {at}")
