"""CLIP (Radford et al., 2021) for task arithmetic: towers, checkpoint conversion, zero-shot heads.

The benchmark of the task-vector literature (Ilharco et al. 2023; TIES; AdaMerging) merges
finetuned CLIP image towers and classifies with frozen zero-shot heads built from the text
tower. The package, one idea per module:

* :mod:`~taskvec_jax.clip.model`: the flax image and text towers, configs, preprocessing;
* :mod:`~taskvec_jax.clip.convert`: Hugging Face / open_clip state dicts -> our tree (pure);
* :mod:`~taskvec_jax.clip.weights_io`: reading checkpoint directories (safetensors,
  ``config.json``, tokenizer files) -- the only file reader;
* :mod:`~taskvec_jax.clip.prompts`: the 8 tasks, their templates and class names;
* :mod:`~taskvec_jax.clip.zeroshot`: tokenization and the (disk-cached) zero-shot heads.

Typical use::

    from taskvec_jax import clip
    pre = clip.load_hf_checkpoint("weights/b32/pretrained")         # both towers
    dtd = clip.load_image_encoder("weights/b32/DTD", pre)           # finetuned image tower
    head = clip.cached_zeroshot_head("DTD", pre, clip.load_tokenizer("weights/b32/pretrained"),
                                     cache_dir="heads")
    apply = clip.image_classifier(clip.CLIPVisionTransformer(pre.vision), head)
"""

from taskvec_jax.clip import convert, model, prompts, weights_io, zeroshot
from taskvec_jax.clip.convert import (
    CLIPCheckpoint,
    TableEntry,
    complete_image_encoder,
    convert_hf_state_dict,
    convert_open_clip_state_dict,
    hf_text_table,
    hf_vision_table,
    open_clip_table,
    text_config_from_hf,
    vision_config_from_hf,
)
from taskvec_jax.clip.model import (
    ACTIVATIONS,
    CLIP,
    CLIPMLP,
    CONFIGS,
    IMAGE_MEAN,
    IMAGE_STD,
    Attention,
    CLIPConfig,
    CLIPTextTransformer,
    CLIPVisionTransformer,
    ResidualBlock,
    TextConfig,
    VisionConfig,
    attention,
    classification_logits,
    get_config,
    image_classifier,
    normalize,
    preprocess,
    quick_gelu,
)
from taskvec_jax.clip.prompts import CLASSNAMES, TASKS, TEMPLATES, task_prompts
from taskvec_jax.clip.weights_io import (
    HF_WEIGHT_FILES,
    OPEN_CLIP_WEIGHT_FILES,
    MissingCheckpointError,
    download_hint,
    load_hf_checkpoint,
    load_image_encoder,
    load_tokenizer,
    read_hf_config,
    read_safetensors,
)
from taskvec_jax.clip.zeroshot import (
    END_TOKEN,
    START_TOKEN,
    cached_zeroshot_head,
    clip_bpe_tokenizer,
    plain_tokenizer,
    text_encoder,
    tokenize,
    zeroshot_head,
)

__all__ = [
    # modules
    "convert", "model", "prompts", "weights_io", "zeroshot",
    # model
    "ACTIVATIONS", "Attention", "CLIP", "CLIPConfig", "CLIPMLP", "CLIPTextTransformer",
    "CLIPVisionTransformer", "CONFIGS", "IMAGE_MEAN", "IMAGE_STD", "ResidualBlock",
    "TextConfig", "VisionConfig", "attention", "classification_logits", "get_config",
    "image_classifier", "normalize", "preprocess", "quick_gelu",
    # convert
    "CLIPCheckpoint", "TableEntry", "complete_image_encoder", "convert_hf_state_dict",
    "convert_open_clip_state_dict", "hf_text_table", "hf_vision_table", "open_clip_table",
    "text_config_from_hf", "vision_config_from_hf",
    # weights_io
    "HF_WEIGHT_FILES", "MissingCheckpointError", "OPEN_CLIP_WEIGHT_FILES", "download_hint",
    "load_hf_checkpoint", "load_image_encoder", "load_tokenizer", "read_hf_config",
    "read_safetensors",
    # prompts
    "CLASSNAMES", "TASKS", "TEMPLATES", "task_prompts",
    # zeroshot
    "END_TOKEN", "START_TOKEN", "cached_zeroshot_head", "clip_bpe_tokenizer",
    "plain_tokenizer", "text_encoder", "tokenize", "zeroshot_head",
]
