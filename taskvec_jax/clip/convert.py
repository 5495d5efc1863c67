"""Public CLIP state dicts -> the parameter tree of :mod:`taskvec_jax.clip.model` (pure).

Converts Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``
/ ``CLIPTextModel(WithProjection)`` state dicts (given their parsed ``config.json``) and
open_clip state dicts (given the :class:`CLIPConfig`), as ``{key: numpy array}``. Nothing
here reads a file: :mod:`taskvec_jax.clip.weights_io` reads checkpoint directories and calls
these functions.

The conversion is a fixed table, exact (transposes and slices of the stored arrays, no
arithmetic), so task vectors of converted checkpoints are exactly the converted parameter
differences. Torch ``Linear`` weights ``[out, in]`` become flax ``Dense`` kernels
``[in, out]``; the patch ``Conv2d`` weight ``[width, C, p, p]`` becomes ``[p, p, C, width]``;
LayerNorm ``weight`` becomes ``scale``. The converter insists on a complete match: a
tensor it does not know, a parameter it cannot find, or a shape that differs from the
config, is an error naming the checkpoint key and the tree path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import tree as tree_lib
from taskvec_jax.clip.model import (
    ACTIVATIONS,
    CLIPConfig,
    CLIPTextTransformer,
    CLIPVisionTransformer,
    TextConfig,
    VisionConfig,
)
from taskvec_jax.task_vectors import check_compatible

__all__ = [
    "CLIPCheckpoint", "TableEntry", "complete_image_encoder", "convert_hf_state_dict",
    "convert_open_clip_state_dict", "hf_text_table", "hf_vision_table", "open_clip_table",
    "text_config_from_hf", "vision_config_from_hf",
]

PyTree = Any
Path = tuple[str, ...]

# Buffers some checkpoints store that are not parameters (recomputed by the model).
_IGNORED_SUFFIXES = ("position_ids", "attn_mask")
_OPEN_CLIP_IGNORED = ("input_resolution", "context_length", "vocab_size")


# ----------------------------------------------------------------------------- configs


def _sub_config(hf: Mapping, name: str) -> dict:
    sub = dict(hf.get(name) or {})
    sub.update(hf.get(f"{name}_dict") or {})  # configs written before transformers 4.27
    return sub


def _act(hf: Mapping, tower: str) -> str:
    act = hf.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{tower} config: hidden_act={act!r} is not supported; "
                         f"supported: {sorted(ACTIVATIONS)}")
    return act


def vision_config_from_hf(hf: Mapping, embed_dim: int | None) -> VisionConfig:
    """:class:`VisionConfig` from a Hugging Face ``CLIPVisionConfig`` dict (HF defaults fill
    missing fields); ``embed_dim`` is the projection's output size or ``None``."""
    return VisionConfig(
        image_size=int(hf.get("image_size", 224)), patch_size=int(hf.get("patch_size", 32)),
        width=int(hf.get("hidden_size", 768)), layers=int(hf.get("num_hidden_layers", 12)),
        heads=int(hf.get("num_attention_heads", 12)),
        mlp_dim=int(hf.get("intermediate_size", 3072)), embed_dim=embed_dim,
        channels=int(hf.get("num_channels", 3)), act=_act(hf, "vision"),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)))


def text_config_from_hf(hf: Mapping, embed_dim: int | None) -> TextConfig:
    """:class:`TextConfig` from a Hugging Face ``CLIPTextConfig`` dict.

    ``eos_token_id == 2`` marks configs written before transformers PR #24773; Hugging
    Face pools those at the arg-max token id, which ``eos_token_id=None`` reproduces.
    """
    eos = hf.get("eos_token_id", 49407)
    return TextConfig(
        vocab_size=int(hf.get("vocab_size", 49408)),
        context_length=int(hf.get("max_position_embeddings", 77)),
        width=int(hf.get("hidden_size", 512)), layers=int(hf.get("num_hidden_layers", 12)),
        heads=int(hf.get("num_attention_heads", 8)),
        mlp_dim=int(hf.get("intermediate_size", 2048)), embed_dim=embed_dim,
        act=_act(hf, "text"), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        eos_token_id=None if eos == 2 else int(eos))


# ----------------------------------------------------------------------------- tables

Transform = Callable[[np.ndarray], np.ndarray]
_copy: Transform = lambda w: w
_linear: Transform = lambda w: w.T                          # torch Linear [out, in] -> [in, out]
_conv: Transform = lambda w: w.transpose(2, 3, 1, 0)        # [O, I, kh, kw] -> [kh, kw, I, O]


class TableEntry(NamedTuple):
    """One row of a conversion table: ``params[path] = transform(state[key])``."""

    key: str              # checkpoint key
    path: Path            # tree path
    transform: Transform


def _hf_block(src: str, dst: Path) -> list[TableEntry]:
    out = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += [TableEntry(f"{src}.self_attn.{proj}.weight", dst + ("attn", proj, "kernel"),
                       _linear),
                TableEntry(f"{src}.self_attn.{proj}.bias", dst + ("attn", proj, "bias"), _copy)]
    for fc in ("fc1", "fc2"):
        out += [TableEntry(f"{src}.mlp.{fc}.weight", dst + ("mlp", fc, "kernel"), _linear),
                TableEntry(f"{src}.mlp.{fc}.bias", dst + ("mlp", fc, "bias"), _copy)]
    out += _layer_norm(f"{src}.layer_norm1", dst + ("layer_norm1",))
    out += _layer_norm(f"{src}.layer_norm2", dst + ("layer_norm2",))
    return out


def _layer_norm(src: str, dst: Path) -> list[TableEntry]:
    return [TableEntry(f"{src}.weight", dst + ("scale",), _copy),
            TableEntry(f"{src}.bias", dst + ("bias",), _copy)]


def hf_vision_table(config: VisionConfig) -> list[TableEntry]:
    """Hugging Face ``vision_model.*`` / ``visual_projection`` keys -> ``("vision", ...)``."""
    p, v = "vision_model", ("vision",)
    table = [
        TableEntry(f"{p}.embeddings.patch_embedding.weight", v + ("patch_embedding", "kernel"),
               _conv),
        TableEntry(f"{p}.embeddings.class_embedding", v + ("class_embedding",), _copy),
        TableEntry(f"{p}.embeddings.position_embedding.weight", v + ("position_embedding",),
               _copy),
        *_layer_norm(f"{p}.pre_layrnorm", v + ("pre_norm",)),
        *_layer_norm(f"{p}.post_layernorm", v + ("post_norm",)),
    ]
    for i in range(config.layers):
        table += _hf_block(f"{p}.encoder.layers.{i}", v + (f"layers_{i}",))
    if config.embed_dim is not None:
        table.append(TableEntry("visual_projection.weight", v + ("projection", "kernel"),
                            _linear))
    return table


def hf_text_table(config: TextConfig) -> list[TableEntry]:
    """Hugging Face ``text_model.*`` / ``text_projection`` keys -> ``("text", ...)``."""
    p, t = "text_model", ("text",)
    table = [
        TableEntry(f"{p}.embeddings.token_embedding.weight", t + ("token_embedding", "embedding"),
               _copy),
        TableEntry(f"{p}.embeddings.position_embedding.weight", t + ("position_embedding",),
               _copy),
        *_layer_norm(f"{p}.final_layer_norm", t + ("final_norm",)),
    ]
    for i in range(config.layers):
        table += _hf_block(f"{p}.encoder.layers.{i}", t + (f"layers_{i}",))
    if config.embed_dim is not None:
        table.append(TableEntry("text_projection.weight", t + ("projection", "kernel"), _linear))
    return table


def _open_clip_block(src: str, dst: Path, width: int) -> list[TableEntry]:
    out = []
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(j * width, (j + 1) * width)
        out += [TableEntry(f"{src}.attn.in_proj_weight", dst + ("attn", proj, "kernel"),
                       lambda w, rows=rows: w[rows].T),
                TableEntry(f"{src}.attn.in_proj_bias", dst + ("attn", proj, "bias"),
                       lambda b, rows=rows: b[rows])]
    out += [TableEntry(f"{src}.attn.out_proj.weight", dst + ("attn", "out_proj", "kernel"),
                   _linear),
            TableEntry(f"{src}.attn.out_proj.bias", dst + ("attn", "out_proj", "bias"), _copy)]
    for theirs, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
        out += [TableEntry(f"{src}.mlp.{theirs}.weight", dst + ("mlp", ours, "kernel"), _linear),
                TableEntry(f"{src}.mlp.{theirs}.bias", dst + ("mlp", ours, "bias"), _copy)]
    out += _layer_norm(f"{src}.ln_1", dst + ("layer_norm1",))
    out += _layer_norm(f"{src}.ln_2", dst + ("layer_norm2",))
    return out


def open_clip_table(config: CLIPConfig) -> list[TableEntry]:
    """open_clip ``CLIP`` state-dict keys -> our tree (``visual.proj`` and
    ``text_projection`` are stored ``[width, embed_dim]`` already, so they are copied)."""
    vc, tc = config.vision, config.text
    v, t = ("vision",), ("text",)
    table = [
        TableEntry("visual.conv1.weight", v + ("patch_embedding", "kernel"), _conv),
        TableEntry("visual.class_embedding", v + ("class_embedding",), _copy),
        TableEntry("visual.positional_embedding", v + ("position_embedding",), _copy),
        *_layer_norm("visual.ln_pre", v + ("pre_norm",)),
        *_layer_norm("visual.ln_post", v + ("post_norm",)),
        TableEntry("token_embedding.weight", t + ("token_embedding", "embedding"), _copy),
        TableEntry("positional_embedding", t + ("position_embedding",), _copy),
        *_layer_norm("ln_final", t + ("final_norm",)),
        TableEntry("logit_scale", ("logit_scale",), _copy),
    ]
    if vc.embed_dim is not None:
        table.append(TableEntry("visual.proj", v + ("projection", "kernel"), _copy))
    if tc.embed_dim is not None:
        table.append(TableEntry("text_projection", t + ("projection", "kernel"), _copy))
    for i in range(vc.layers):
        table += _open_clip_block(f"visual.transformer.resblocks.{i}",
                                  v + (f"layers_{i}",), vc.width)
    for i in range(tc.layers):
        table += _open_clip_block(f"transformer.resblocks.{i}", t + (f"layers_{i}",),
                                  tc.width)
    return table


# ----------------------------------------------------------------------------- converting


def _abstract_params(vision: VisionConfig | None, text: TextConfig | None,
                     logit_scale: bool) -> dict[str, Any]:
    """Expected ``{path: shape}`` of the tree for these towers (no computation)."""
    expected: dict[str, Any] = {}
    key = jax.random.key(0)
    if vision is not None:
        images = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size,
                                       vision.channels), jnp.float32)
        shapes = jax.eval_shape(CLIPVisionTransformer(vision).init, key, images)["params"]
        expected["vision"] = shapes
    if text is not None:
        tokens = jax.ShapeDtypeStruct((1, text.context_length), jnp.int32)
        expected["text"] = jax.eval_shape(CLIPTextTransformer(text).init, key,
                                          tokens)["params"]
    if logit_scale:
        expected["logit_scale"] = jax.ShapeDtypeStruct((), jnp.float32)
    return {path: leaf.shape for path, leaf in tree_lib.leaves_with_paths(expected)}


def _set(tree: dict, path: Path, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _convert(state: Mapping[str, Any], table: list[TableEntry], expected: dict[str, tuple],
             *, ignore: Callable[[str], bool], source: str, dtype: Any) -> dict:
    missing = [e.key for e in table if e.key not in state]
    if missing:
        raise ValueError(f"{source}: checkpoint has no tensor '{missing[0]}'"
                         + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1
                            else "")
                         + "; is the config (layers, projection) the checkpoint's?")
    used = {e.key for e in table}
    unexpected = sorted(k for k in state if k not in used and not ignore(k))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor '{unexpected[0]}'"
                         + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1
                            else "")
                         + " that the config does not account for")
    params: dict = {}
    for entry in table:
        value = np.asarray(entry.transform(np.asarray(state[entry.key])))
        name = "/".join(entry.path)
        want = expected.get(name)
        if want is None:
            raise ValueError(f"{source}: table maps '{entry.key}' to unknown leaf '{name}'")
        if value.shape != tuple(want):
            raise ValueError(f"{source}: tensor '{entry.key}' converts to shape "
                             f"{value.shape} at '{name}', the config expects {tuple(want)}")
        _set(params, entry.path, jnp.asarray(value, dtype=dtype))
    got = {path for path, _ in tree_lib.leaves_with_paths(params)}
    absent = sorted(set(expected) - got)
    if absent:
        raise ValueError(f"{source}: no checkpoint tensor fills leaf '{absent[0]}'")
    return params


class CLIPCheckpoint(NamedTuple):
    """A converted checkpoint: the configs of the towers it holds and its parameters.

    ``params`` has a ``"vision"`` and/or ``"text"`` subtree and, for full CLIP models,
    ``"logit_scale"``. ``vision.embed_dim`` is ``None`` when the checkpoint has no
    ``visual_projection`` (a Hugging Face ``CLIPVisionModel``).
    """

    vision: VisionConfig | None
    text: TextConfig | None
    params: dict

    @property
    def config(self) -> CLIPConfig:
        """The :class:`CLIPConfig` of a checkpoint that holds both towers."""
        if self.vision is None or self.text is None:
            raise ValueError("this checkpoint holds only the "
                             f"{'vision' if self.text is None else 'text'} tower")
        return CLIPConfig(self.vision, self.text)


def convert_hf_state_dict(state: Mapping[str, Any], hf_config: Mapping, *,
                          dtype: Any = None, source: str = "checkpoint") -> CLIPCheckpoint:
    """Converts a Hugging Face CLIP state dict (numpy arrays) into our tree.

    Args:
      state: ``{key: array}`` as in the checkpoint (torch tensors must be ``.numpy()``-ed).
      hf_config: the parsed ``config.json`` (``model_type`` ``"clip"``,
        ``"clip_vision_model"`` or ``"clip_text_model"``).
      dtype: cast every leaf to this dtype (default: keep the stored dtype).
      source: how the checkpoint is named in error messages.

    Returns:
      A :class:`CLIPCheckpoint` with the towers the state dict holds.

    Raises:
      ValueError: naming the checkpoint key and tree path of any mismatch.
    """
    model_type = hf_config.get("model_type", "clip")
    # transformers >= 5 saves CLIPVisionModel / CLIPTextModel without the tower prefix
    # that 4.x wrote (and that the published checkpoints carry); accept both.
    prefix = {"clip_vision_model": "vision_model.", "clip_text_model": "text_model."}.get(
        model_type)
    if prefix and not any(k.startswith(prefix) for k in state):
        state = {k if k.endswith("_projection.weight") else prefix + k: v
                 for k, v in state.items()}
    has_vision = any(k.startswith("vision_model.") for k in state)
    has_text = any(k.startswith("text_model.") for k in state)
    if model_type == "clip":
        vision_hf, text_hf = _sub_config(hf_config, "vision_config"), _sub_config(
            hf_config, "text_config")
    elif model_type == "clip_vision_model":
        vision_hf, text_hf = dict(hf_config), None
    elif model_type == "clip_text_model":
        vision_hf, text_hf = None, dict(hf_config)
    else:
        raise ValueError(f"{source}: model_type {model_type!r} is not a CLIP model")
    if not (has_vision or has_text):
        raise ValueError(f"{source}: no 'vision_model.*' or 'text_model.*' tensors; is this "
                         "a Hugging Face CLIP checkpoint?")
    if (has_vision and vision_hf is None) or (has_text and text_hf is None):
        raise ValueError(f"{source}: holds {'vision' if has_vision else 'text'} tensors "
                         f"that model_type {model_type!r} does not describe")

    def embed_dim(key):
        return int(state[key].shape[0]) if key in state else None

    vision = (vision_config_from_hf(vision_hf, embed_dim("visual_projection.weight"))
              if has_vision else None)
    text = (text_config_from_hf(text_hf, embed_dim("text_projection.weight"))
            if has_text else None)
    table = (hf_vision_table(vision) if vision else []) + (hf_text_table(text) if text else [])
    has_scale = "logit_scale" in state
    if has_scale:
        table.append(TableEntry("logit_scale", ("logit_scale",), _copy))
    expected = _abstract_params(vision, text, has_scale)
    params = _convert(state, table, expected, source=source, dtype=dtype,
                      ignore=lambda k: k.endswith(_IGNORED_SUFFIXES))
    return CLIPCheckpoint(vision, text, params)


def convert_open_clip_state_dict(state: Mapping[str, Any], config: CLIPConfig, *,
                                 dtype: Any = None, source: str = "open_clip state dict"
                                 ) -> CLIPCheckpoint:
    """Converts an open_clip ``CLIP`` state dict (numpy arrays) with the given config.

    open_clip files carry no architecture description, so ``config`` must be the model's
    (``act="quick_gelu"`` for the OpenAI weights, ``"gelu"`` for open_clip's own
    non-``-quickgelu`` models). The fused ``in_proj_weight [3W, W]`` is split into
    ``q/k/v``. Models with attention pooling or other extras are rejected by name.
    """
    expected = _abstract_params(config.vision, config.text, True)
    params = _convert(state, open_clip_table(config), expected, source=source, dtype=dtype,
                      ignore=lambda k: k.endswith(_IGNORED_SUFFIXES) or k in _OPEN_CLIP_IGNORED)
    return CLIPCheckpoint(config.vision, config.text, params)


def complete_image_encoder(finetuned: CLIPCheckpoint, pretrained: CLIPCheckpoint, *,
                           source: str = "finetuned checkpoint") -> PyTree:
    """The image tower of a finetuned checkpoint, completed and checked against ``pretrained``.

    The finetuned encoders of the task-arithmetic literature are published as Hugging Face
    ``CLIPVisionModel`` directories (e.g. ``tanganke/clip-vit-base-patch32_<task>``, used
    by FusionBench) without ``visual_projection``: the projection stays the pretrained
    one, frozen. It is taken from ``pretrained`` here, so the returned tree has the
    structure of ``pretrained.params["vision"]`` and ``task_vector(encoder,
    pretrained.params["vision"])`` is zero on the projection.

    Args:
      finetuned: the converted finetuned checkpoint (its vision tower is used).
      pretrained: the converted pretrained checkpoint.
      source: how the finetuned checkpoint is named in error messages.

    Raises:
      ValueError: if either has no vision tower, or the tower's architecture differs from
        the pretrained one (naming the leaf path).
    """
    if pretrained.vision is None:
        raise ValueError("pretrained checkpoint has no vision tower")
    if finetuned.vision is None:
        raise ValueError(f"{source}: checkpoint holds no vision tower")
    vision = dict(finetuned.params["vision"])
    theirs = finetuned.vision
    if theirs.embed_dim is None and pretrained.vision.embed_dim is not None:
        like = vision["class_embedding"].dtype
        vision["projection"] = jax.tree.map(lambda x: jnp.asarray(x, like),
                                            pretrained.params["vision"]["projection"])
        theirs = dataclasses.replace(theirs, embed_dim=pretrained.vision.embed_dim)
    if theirs != pretrained.vision:
        raise ValueError(f"{source}: vision config {theirs} differs from the pretrained "
                         f"one {pretrained.vision}")
    check_compatible(vision, pretrained.params["vision"], name=source,
                     reference_name="pretrained vision tower")
    return vision
