"""Reading CLIP checkpoint directories: safetensors weights, ``config.json``, tokenizer files.

The only module of :mod:`taskvec_jax.clip` that reads files (apart from the zero-shot head
cache). Reads Hugging Face ``CLIPModel`` / ``CLIPVisionModel`` /
``CLIPVisionModelWithProjection`` / ``CLIPTextModel(WithProjection)`` directories
(``config.json`` plus ``model.safetensors`` or a sharded ``model.safetensors.index.json``)
with the numpy API of ``safetensors``: no torch at run time. open_clip state dicts (an
``open_clip_model.safetensors`` file, read by :func:`read_safetensors`) convert with
:func:`taskvec_jax.clip.convert_open_clip_state_dict`, given the :class:`CLIPConfig`.

Downloading is the user's step, on a networked machine, e.g.::

    from huggingface_hub import snapshot_download      # pip install 'taskvec_jax[clip]'
    snapshot_download("openai/clip-vit-base-patch32", local_dir="weights/ViT-B-32/pretrained",
                      allow_patterns=["*.json", "*.safetensors", "*.txt"])

Every loader here takes a local path and never touches the network.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from taskvec_jax.clip.convert import CLIPCheckpoint, complete_image_encoder, convert_hf_state_dict
from taskvec_jax.clip.zeroshot import clip_bpe_tokenizer, plain_tokenizer

__all__ = ["HF_WEIGHT_FILES", "MissingCheckpointError", "OPEN_CLIP_WEIGHT_FILES",
           "download_hint", "load_hf_checkpoint", "load_image_encoder", "load_tokenizer",
           "read_hf_config", "read_safetensors"]

PyTree = Any

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors",)


class MissingCheckpointError(FileNotFoundError):
    """A checkpoint directory or file that should be on disk is not."""


def download_hint(repo_id: str, local_dir: str | os.PathLike) -> str:
    """The command that fetches ``repo_id`` from the Hugging Face Hub into ``local_dir``."""
    return (f"python -c \"from huggingface_hub import snapshot_download; "
            f"snapshot_download('{repo_id}', local_dir='{os.fspath(local_dir)}', "
            f"allow_patterns=['*.json', '*.safetensors', '*.txt'])\"")


# ----------------------------------------------------------------------------- weights


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


# ----------------------------------------------------------------------------- checkpoints


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


def load_image_encoder(directory: str | os.PathLike, pretrained: CLIPCheckpoint, *,
                       dtype: Any = None) -> PyTree:
    """The image tower of a finetuned checkpoint directory, completed and checked against
    ``pretrained`` by :func:`taskvec_jax.clip.complete_image_encoder`.

    The published finetuned encoders (e.g. ``tanganke/clip-vit-base-patch32_<task>``) are
    ``CLIPVisionModel`` directories without ``visual_projection``; the pretrained, frozen
    projection completes them, so ``task_vector(encoder, pretrained.params["vision"])`` is
    zero on the projection.

    Raises:
      MissingCheckpointError: if the directory or its files are absent.
      ValueError: if the tower's architecture differs from the pretrained one.
    """
    ckpt = load_hf_checkpoint(directory, dtype=dtype)
    return complete_image_encoder(ckpt, pretrained, source=os.fspath(directory))


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer of a CLIP checkpoint directory, as a ``tokenizers.Tokenizer``.

    Reads ``tokenizer.json`` when present; otherwise ``vocab.json`` + ``merges.txt``
    through :func:`taskvec_jax.clip.clip_bpe_tokenizer`.

    Raises:
      FileNotFoundError: naming the files looked for.
    """
    from tokenizers import Tokenizer

    directory = os.fspath(directory)
    path = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(path):
        return plain_tokenizer(Tokenizer.from_file(path))
    vocab_path = os.path.join(directory, "vocab.json")
    merges_path = os.path.join(directory, "merges.txt")
    if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
        raise FileNotFoundError(f"{directory} has no tokenizer.json, nor vocab.json and "
                                "merges.txt; download the checkpoint's tokenizer files too")
    with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    merges = [tuple(line.split(" ")) for line in lines
              if line and not line.startswith("#version")]
    return clip_bpe_tokenizer(vocab, merges)
