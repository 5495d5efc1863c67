"""Public CLIP checkpoints -> the parameter tree of :mod:`taskvec_jax.models.clip`.

Reads Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``
/ ``CLIPTextModel(WithProjection)`` directories (``config.json`` plus ``model.safetensors``
or a sharded ``model.safetensors.index.json``) with the numpy API of ``safetensors``: no
torch at run time. open_clip state dicts (a dict of arrays, or an
``open_clip_model.safetensors`` file) convert too, given the :class:`CLIPConfig`.

Downloading is the user's step, on a networked machine, e.g.::

    from huggingface_hub import snapshot_download      # pip install 'taskvec_jax[clip]'
    snapshot_download("openai/clip-vit-base-patch32", local_dir="weights/ViT-B-32/pretrained",
                      allow_patterns=["*.json", "*.safetensors", "*.txt"])

Every loader here takes a local path and never touches the network.

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
import json
import os
import struct
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import tree as tree_lib
from taskvec_jax.models.clip import (
    ACTIVATIONS,
    CLIPConfig,
    CLIPTextTransformer,
    CLIPVisionTransformer,
    TextConfig,
    VisionConfig,
)

PyTree = Any
Path = tuple[str, ...]

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors",)

# Buffers some checkpoints store that are not parameters (recomputed by the model).
_IGNORED_SUFFIXES = ("position_ids", "attn_mask")
_OPEN_CLIP_IGNORED = ("input_resolution", "context_length", "vocab_size")


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint directory or file that should be on disk is not."""


def download_hint(repo_id: str, local_dir: str | os.PathLike) -> str:
    """The command that fetches ``repo_id`` from the Hugging Face Hub into ``local_dir``."""
    return (f"python -c \"from huggingface_hub import snapshot_download; "
            f"snapshot_download('{repo_id}', local_dir='{os.fspath(local_dir)}', "
            f"allow_patterns=['*.json', '*.safetensors', '*.txt'])\"")


# ----------------------------------------------------------------------------- reading


def _weight_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise MissingCheckpointError(f"no checkpoint at {path}")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors",) + OPEN_CLIP_WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return [os.path.join(path, name)]
    raise MissingCheckpointError(
        f"{path} holds no safetensors weights (expected one of "
        f"{HF_WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES}); found {sorted(os.listdir(path))}. "
        "Only safetensors files are read (no pickled torch .bin files).")


def _raw_dtypes() -> dict[str, Any]:
    import ml_dtypes  # a dependency of jax
    return {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
            "F8_E5M2": ml_dtypes.float8_e5m2}


def _read_raw(path: str, key: str) -> np.ndarray:
    """Reads one tensor whose dtype numpy lacks (bfloat16, float8) from the file layout.

    A safetensors file is ``u64 little-endian header size | JSON header | data``; the
    header gives each tensor's dtype, shape and byte range in ``data``.
    """
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(size))[key]
        dtypes = _raw_dtypes()
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor '{key}' has dtype {info['dtype']}, which "
                             "cannot be read")
        start, end = info["data_offsets"]
        f.seek(8 + size + start)
        data = f.read(end - start)
    return np.frombuffer(data, dtype=dtypes[info["dtype"]]).reshape(info["shape"])


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, a sharded checkpoint or a checkpoint directory.

    Uses ``safetensors``' numpy API; bfloat16 / float8 tensors (which numpy cannot name)
    are read from the file's documented layout as ``ml_dtypes`` arrays.

    Raises:
      MissingCheckpointError: if ``path`` is absent or holds no safetensors weights.
    """
    from safetensors import safe_open

    state: dict[str, np.ndarray] = {}
    for file in _weight_files(os.fspath(path)):
        with safe_open(file, framework="np") as f:
            for key in f.keys():
                try:
                    state[key] = f.get_tensor(key)
                except TypeError:
                    state[key] = _read_raw(file, key)
    return state


def read_hf_config(directory: str | os.PathLike) -> dict:
    """The ``config.json`` of a Hugging Face checkpoint directory."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        raise MissingCheckpointError(f"{directory} has no config.json (a Hugging Face "
                                     "checkpoint directory holds config.json and "
                                     "model.safetensors)")
    with open(path) as f:
        return json.load(f)


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


class _Entry(NamedTuple):
    key: str              # checkpoint key
    path: Path            # tree path
    transform: Transform


def _hf_block(src: str, dst: Path) -> list[_Entry]:
    out = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += [_Entry(f"{src}.self_attn.{proj}.weight", dst + ("attn", proj, "kernel"),
                       _linear),
                _Entry(f"{src}.self_attn.{proj}.bias", dst + ("attn", proj, "bias"), _copy)]
    for fc in ("fc1", "fc2"):
        out += [_Entry(f"{src}.mlp.{fc}.weight", dst + ("mlp", fc, "kernel"), _linear),
                _Entry(f"{src}.mlp.{fc}.bias", dst + ("mlp", fc, "bias"), _copy)]
    out += _layer_norm(f"{src}.layer_norm1", dst + ("layer_norm1",))
    out += _layer_norm(f"{src}.layer_norm2", dst + ("layer_norm2",))
    return out


def _layer_norm(src: str, dst: Path) -> list[_Entry]:
    return [_Entry(f"{src}.weight", dst + ("scale",), _copy),
            _Entry(f"{src}.bias", dst + ("bias",), _copy)]


def hf_vision_table(config: VisionConfig) -> list[_Entry]:
    """Hugging Face ``vision_model.*`` / ``visual_projection`` keys -> ``("vision", ...)``."""
    p, v = "vision_model", ("vision",)
    table = [
        _Entry(f"{p}.embeddings.patch_embedding.weight", v + ("patch_embedding", "kernel"),
               _conv),
        _Entry(f"{p}.embeddings.class_embedding", v + ("class_embedding",), _copy),
        _Entry(f"{p}.embeddings.position_embedding.weight", v + ("position_embedding",),
               _copy),
        *_layer_norm(f"{p}.pre_layrnorm", v + ("pre_norm",)),
        *_layer_norm(f"{p}.post_layernorm", v + ("post_norm",)),
    ]
    for i in range(config.layers):
        table += _hf_block(f"{p}.encoder.layers.{i}", v + (f"layers_{i}",))
    if config.embed_dim is not None:
        table.append(_Entry("visual_projection.weight", v + ("projection", "kernel"),
                            _linear))
    return table


def hf_text_table(config: TextConfig) -> list[_Entry]:
    """Hugging Face ``text_model.*`` / ``text_projection`` keys -> ``("text", ...)``."""
    p, t = "text_model", ("text",)
    table = [
        _Entry(f"{p}.embeddings.token_embedding.weight", t + ("token_embedding", "embedding"),
               _copy),
        _Entry(f"{p}.embeddings.position_embedding.weight", t + ("position_embedding",),
               _copy),
        *_layer_norm(f"{p}.final_layer_norm", t + ("final_norm",)),
    ]
    for i in range(config.layers):
        table += _hf_block(f"{p}.encoder.layers.{i}", t + (f"layers_{i}",))
    if config.embed_dim is not None:
        table.append(_Entry("text_projection.weight", t + ("projection", "kernel"), _linear))
    return table


def _open_clip_block(src: str, dst: Path, width: int) -> list[_Entry]:
    out = []
    for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = slice(j * width, (j + 1) * width)
        out += [_Entry(f"{src}.attn.in_proj_weight", dst + ("attn", proj, "kernel"),
                       lambda w, rows=rows: w[rows].T),
                _Entry(f"{src}.attn.in_proj_bias", dst + ("attn", proj, "bias"),
                       lambda b, rows=rows: b[rows])]
    out += [_Entry(f"{src}.attn.out_proj.weight", dst + ("attn", "out_proj", "kernel"),
                   _linear),
            _Entry(f"{src}.attn.out_proj.bias", dst + ("attn", "out_proj", "bias"), _copy)]
    for theirs, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
        out += [_Entry(f"{src}.mlp.{theirs}.weight", dst + ("mlp", ours, "kernel"), _linear),
                _Entry(f"{src}.mlp.{theirs}.bias", dst + ("mlp", ours, "bias"), _copy)]
    out += _layer_norm(f"{src}.ln_1", dst + ("layer_norm1",))
    out += _layer_norm(f"{src}.ln_2", dst + ("layer_norm2",))
    return out


def open_clip_table(config: CLIPConfig) -> list[_Entry]:
    """open_clip ``CLIP`` state-dict keys -> our tree (``visual.proj`` and
    ``text_projection`` are stored ``[width, embed_dim]`` already, so they are copied)."""
    vc, tc = config.vision, config.text
    v, t = ("vision",), ("text",)
    table = [
        _Entry("visual.conv1.weight", v + ("patch_embedding", "kernel"), _conv),
        _Entry("visual.class_embedding", v + ("class_embedding",), _copy),
        _Entry("visual.positional_embedding", v + ("position_embedding",), _copy),
        *_layer_norm("visual.ln_pre", v + ("pre_norm",)),
        *_layer_norm("visual.ln_post", v + ("post_norm",)),
        _Entry("token_embedding.weight", t + ("token_embedding", "embedding"), _copy),
        _Entry("positional_embedding", t + ("position_embedding",), _copy),
        *_layer_norm("ln_final", t + ("final_norm",)),
        _Entry("logit_scale", ("logit_scale",), _copy),
    ]
    if vc.embed_dim is not None:
        table.append(_Entry("visual.proj", v + ("projection", "kernel"), _copy))
    if tc.embed_dim is not None:
        table.append(_Entry("text_projection", t + ("projection", "kernel"), _copy))
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


def _convert(state: Mapping[str, Any], table: list[_Entry], expected: dict[str, tuple],
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
        table.append(_Entry("logit_scale", ("logit_scale",), _copy))
    expected = _abstract_params(vision, text, has_scale)
    params = _convert(state, table, expected, source=source, dtype=dtype,
                      ignore=lambda k: k.endswith(_IGNORED_SUFFIXES))
    return CLIPCheckpoint(vision, text, params)


def load_hf_checkpoint(directory: str | os.PathLike, *, dtype: Any = None
                       ) -> CLIPCheckpoint:
    """Loads and converts a local Hugging Face CLIP checkpoint directory.

    Args:
      directory: holds ``config.json`` and ``model.safetensors`` (or a sharded index), as
        written by ``save_pretrained`` or fetched with ``huggingface_hub``.
      dtype: cast every leaf to this dtype (default: the stored dtype).

    Raises:
      MissingCheckpointError: if the directory or its files are absent.
      ValueError: on any mismatch between the weights and the config.
    """
    directory = os.fspath(directory)
    hf_config = read_hf_config(directory)
    return convert_hf_state_dict(read_safetensors(directory), hf_config, dtype=dtype,
                                 source=directory)


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


def load_image_encoder(directory: str | os.PathLike, pretrained: CLIPCheckpoint, *,
                       dtype: Any = None) -> PyTree:
    """The image tower of a finetuned checkpoint, completed and checked against ``pretrained``.

    The finetuned encoders of the task-arithmetic literature are published as Hugging Face
    ``CLIPVisionModel`` directories (e.g. ``tanganke/clip-vit-base-patch32_<task>``, used
    by FusionBench) without ``visual_projection``: the projection stays the pretrained
    one, frozen. It is taken from ``pretrained`` here, so the returned tree has the
    structure of ``pretrained.params["vision"]`` and ``task_vector(encoder,
    pretrained.params["vision"])`` is zero on the projection.

    Raises:
      MissingCheckpointError: if the directory or its files are absent.
      ValueError: if the tower's architecture differs from the pretrained one.
    """
    if pretrained.vision is None:
        raise ValueError("pretrained checkpoint has no vision tower")
    ckpt = load_hf_checkpoint(directory, dtype=dtype)
    if ckpt.vision is None:
        raise ValueError(f"{directory}: checkpoint holds no vision tower")
    vision = dict(ckpt.params["vision"])
    theirs = ckpt.vision
    if theirs.embed_dim is None and pretrained.vision.embed_dim is not None:
        like = vision["class_embedding"].dtype
        vision["projection"] = jax.tree.map(lambda x: jnp.asarray(x, like),
                                            pretrained.params["vision"]["projection"])
        theirs = dataclasses.replace(theirs, embed_dim=pretrained.vision.embed_dim)
    if theirs != pretrained.vision:
        raise ValueError(f"{directory}: vision config {theirs} differs from the pretrained "
                         f"one {pretrained.vision}")
    from taskvec_jax.task_vectors import check_compatible
    check_compatible(vision, pretrained.params["vision"], name=os.fspath(directory),
                     reference_name="pretrained vision tower")
    return vision
