"""Tiny CLIP checkpoints and tokenizers that the CLIP tests build offline (no download)."""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from taskvec_jax.clip import END_TOKEN as END
from taskvec_jax.clip import START_TOKEN as START

# Merges of the tiny vocabulary: enough to form "photo", "of", "cat", "the" as words.
MERGES = [("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("o", "f</w>"),
          ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>")]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character map (the byte-level BPE alphabet)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout at toy size: bytes, bytes + ``</w>``, merges, specials."""
    base = [bytes_to_unicode()[b] for b in range(256)]
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in MERGES] + [START, END]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer_files(directory: str) -> dict[str, int]:
    """Writes ``vocab.json`` and ``merges.txt`` (CLIP's format) and returns the vocab."""
    os.makedirs(directory, exist_ok=True)
    vocab = tiny_vocab()
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return vocab


def tiny_hf_config(*, eos_token_id: int | None = None, projection_dim: int = 24,
                   hidden_act: str = "quick_gelu"):
    """A tiny transformers ``CLIPConfig`` whose text vocabulary is :func:`tiny_vocab`."""
    from transformers import CLIPConfig

    vocab = tiny_vocab()
    eos = vocab[END] if eos_token_id is None else eos_token_id
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                eos_token_id=eos, bos_token_id=vocab[START], pad_token_id=vocab[END],
                hidden_act=hidden_act)
    vision = dict(image_size=30, patch_size=6, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, hidden_act=hidden_act)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def save_tiny_hf_clip(directory: str, seed: int = 0, **config_kwargs):
    """Creates a random tiny ``CLIPModel`` and saves it as safetensors; returns the model."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(tiny_hf_config(**config_kwargs)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_layout_state_dict(rng: np.random.Generator, *, width=32, mlp=37, layers=2,
                         patch=6, image=30, vocab=40, context=16, embed=24) -> dict:
    """A random state dict with Hugging Face ``CLIPModel`` key names, built with numpy only.

    Lets the converter, orbax and task-vector tests run where torch is not installed.
    """
    f32 = lambda *shape: rng.normal(size=shape).astype(np.float32) * 0.1
    state = {"logit_scale": np.asarray(2.6592, np.float32),
             "visual_projection.weight": f32(embed, width),
             "text_projection.weight": f32(embed, width)}
    towers = {"vision_model": {"embeddings.patch_embedding.weight": f32(width, 3, patch, patch),
                               "embeddings.class_embedding": f32(width),
                               "embeddings.position_embedding.weight":
                                   f32((image // patch) ** 2 + 1, width),
                               "pre_layrnorm.weight": f32(width),
                               "pre_layrnorm.bias": f32(width),
                               "post_layernorm.weight": f32(width),
                               "post_layernorm.bias": f32(width)},
              "text_model": {"embeddings.token_embedding.weight": f32(vocab, width),
                             "embeddings.position_embedding.weight": f32(context, width),
                             "final_layer_norm.weight": f32(width),
                             "final_layer_norm.bias": f32(width)}}
    for prefix, keys in towers.items():
        state.update({f"{prefix}.{k}": v for k, v in keys.items()})
        for i in range(layers):
            p = f"{prefix}.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                state[f"{p}.self_attn.{proj}.weight"] = f32(width, width)
                state[f"{p}.self_attn.{proj}.bias"] = f32(width)
            state[f"{p}.mlp.fc1.weight"], state[f"{p}.mlp.fc1.bias"] = f32(mlp, width), f32(mlp)
            state[f"{p}.mlp.fc2.weight"], state[f"{p}.mlp.fc2.bias"] = f32(width, mlp), f32(width)
            for ln in ("layer_norm1", "layer_norm2"):
                state[f"{p}.{ln}.weight"], state[f"{p}.{ln}.bias"] = f32(width), f32(width)
    return state


def hf_layout_config(*, width=32, mlp=37, layers=2, patch=6, image=30, vocab=40,
                     context=16, embed=24) -> dict:
    """The ``config.json`` dict matching :func:`hf_layout_state_dict`."""
    common = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                  num_attention_heads=4, hidden_act="quick_gelu")
    return {"model_type": "clip", "projection_dim": embed,
            "vision_config": dict(common, image_size=image, patch_size=patch),
            "text_config": dict(common, vocab_size=vocab, max_position_embeddings=context,
                                eos_token_id=vocab - 1)}


def save_hf_layout(directory: str, state: dict, config: dict) -> str:
    """Writes ``config.json`` + ``model.safetensors`` with the numpy API of safetensors."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


@functools.lru_cache(maxsize=None)
def image_encoder(config):
    """``encode(vision_params, images) -> embeddings``, jitted once per ``VisionConfig``
    (the image-tower twin of :func:`taskvec_jax.clip.text_encoder`): tests that apply
    towers of one configuration share its compiled programs."""
    import jax

    from taskvec_jax import clip

    tower = clip.CLIPVisionTransformer(config)
    return jax.jit(lambda params, images: tower.apply({"params": params}, images))
