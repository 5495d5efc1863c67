"""Zero-shot classification heads from CLIP's text tower: the frozen heads of task arithmetic.

For a task with classes ``c = 1..C`` and prompt templates ``t = 1..T`` (``"a photo of a
{}."``), the head of Radford et al. (2021), used frozen by Ilharco et al. (2023) and the
merging literature, is::

    e_{c,t} = text_encoder(tokenize(template_t(classname_c)))
    w_c     = normalize(mean_t normalize(e_{c,t}))
    head    = exp(logit_scale) * [w_1; ...; w_C]                      # [C, embed_dim]
    logits  = normalize(image_encoder(x)) @ head.T       (clip.classification_logits)

Prompts are tokenized with the checkpoint's own tokenizer (read by
:func:`taskvec_jax.clip.load_tokenizer` from ``tokenizer.json``, or ``vocab.json`` +
``merges.txt``) by the Hugging Face ``tokenizers`` library: CLIP's
byte-level BPE with ``</w>`` word ends, lower-cased, between ``<|startoftext|>`` and
``<|endoftext|>``. Heads are cached per task on disk, keyed by a fingerprint of the
tokens and the text-tower weights, so a stale head is never reused.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from taskvec_jax import tree as tree_lib
from taskvec_jax import _checks
from taskvec_jax.clip.convert import CLIPCheckpoint
from taskvec_jax.clip.model import CLIPTextTransformer, TextConfig
from taskvec_jax.clip.prompts import task_prompts

__all__ = ["END_TOKEN", "START_TOKEN", "cached_zeroshot_head", "clip_bpe_tokenizer",
           "plain_tokenizer", "text_encoder", "tokenize", "zeroshot_head"]

PyTree = Any

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


# ----------------------------------------------------------------------------- tokenizer


def clip_bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    """A ``tokenizers.Tokenizer`` with CLIP's pipeline over the given vocabulary and merges.

    This is the configuration Hugging Face ``CLIPTokenizer`` builds from ``vocab.json`` and
    ``merges.txt``: NFC, whitespace runs to one space, lower case; split on CLIP's regex
    (contractions, letter runs, single digits, other symbol runs); byte-level alphabet;
    BPE with ``"</w>"`` marking the end of a word.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="</w>",
                        fuse_unk=False, unk_token=END_TOKEN))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                  r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def plain_tokenizer(tokenizer):
    """``tokenizer`` without padding or truncation settings (a ``tokenizer.json`` saved after
    a padded call keeps them), as a copy: the caller's object is not changed."""
    if tokenizer.padding is None and tokenizer.truncation is None:
        return tokenizer
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77, *,
             pad_id: int | None = None) -> np.ndarray:
    """Token ids ``[len(texts), context_length]`` (int32): start, text, end, padding.

    Special tokens are added here (not by the tokenizer's post-processor), so
    ``tokenizer.json`` files with or without one give the same ids.

    Args:
      tokenizer: a ``tokenizers.Tokenizer`` (:func:`taskvec_jax.clip.load_tokenizer`).
      texts: the prompts.
      context_length: the text tower's number of positions.
      pad_id: id after the end token (default: the end token's id, as Hugging Face pads;
        the causal text tower never looks past the end token, so it does not matter).

    Raises:
      ValueError: if a prompt does not fit, naming it, or a special token is missing.
    """
    start, end = tokenizer.token_to_id(START_TOKEN), tokenizer.token_to_id(END_TOKEN)
    if start is None or end is None:
        raise ValueError(f"tokenizer has no {START_TOKEN!r} / {END_TOKEN!r} token; is it a "
                         "CLIP tokenizer?")
    pad = end if pad_id is None else pad_id
    tokenizer = plain_tokenizer(tokenizer)
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    out = np.full((len(texts), context_length), pad, dtype=np.int32)
    for i, (text, enc) in enumerate(zip(texts, encodings)):
        ids = [start, *enc.ids, end]
        if len(ids) > context_length:
            raise ValueError(f"prompt {text!r} is {len(ids)} tokens long, more than "
                             f"context_length={context_length}")
        out[i, :len(ids)] = ids
    return out


# ----------------------------------------------------------------------------- heads


def zeroshot_head(encode_text: Callable[[jax.Array], jax.Array], tokenizer,
                  classnames: Sequence[str], templates: Sequence[str], *,
                  logit_scale: float | jax.Array, context_length: int = 77,
                  chunk_size: int = 256) -> jax.Array:
    """``exp(logit_scale) * normalize(mean_t normalize(encode_text(prompt_{c,t})))``.

    The ``C * T`` prompts are encoded ``chunk_size`` at a time (memory only: the head does
    not depend on it). Every call has the same shape, ``[min(chunk_size, C * T), L]``: the
    last chunk is padded with copies of its first prompt, whose rows are dropped, so a
    jitted ``encode_text`` compiles once per task.

    Args:
      encode_text: ``token ids [N, L] -> embeddings [N, D]`` (e.g. the text tower applied
        with its parameters, jitted); rows must be independent, as in CLIP's text tower.
      tokenizer: a ``tokenizers.Tokenizer``.
      classnames: one name per class, in label order.
      templates: format strings with one ``{}`` for the class name.
      logit_scale: the checkpoint's ``logit_scale`` (a log; the head is scaled by its exp).
      context_length: the text tower's positions.
      chunk_size: prompts encoded per call.

    Returns:
      The head ``[len(classnames), D]``.

    Raises:
      ValueError: if ``classnames`` or ``templates`` is empty, or ``chunk_size`` is not a
        positive integer.
    """
    if not classnames or not templates:
        raise ValueError("zeroshot_head needs at least one class name and one template")
    chunk_size = _checks.positive_int(chunk_size, "chunk_size")
    prompts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenize(tokenizer, prompts, context_length)
    size = min(chunk_size, len(tokens))
    chunks = []
    for i in range(0, len(tokens), size):
        chunk = tokens[i:i + size]
        n = len(chunk)
        if n < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - n, axis=0)])
        chunks.append(np.asarray(encode_text(jnp.asarray(chunk)))[:n])
    emb = jnp.asarray(np.concatenate(chunks)).reshape(len(classnames), len(templates), -1)
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    w = emb.mean(axis=1)
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    return jnp.exp(jnp.asarray(logit_scale, w.dtype)) * w


@functools.lru_cache(maxsize=16)
def text_encoder(config: TextConfig) -> Callable[[PyTree, jax.Array], jax.Array]:
    """``encode(text_params, token_ids [N, L]) -> embeddings [N, embed_dim]``, jitted.

    One function per :class:`TextConfig` (cached), with the parameters an argument rather
    than a closure constant: heads for every task and every checkpoint of one architecture
    share its compiled programs.
    """
    model = CLIPTextTransformer(config)
    return jax.jit(lambda params, ids: model.apply({"params": params}, ids))


def _fingerprint(tokens: np.ndarray, params: PyTree) -> str:
    h = hashlib.sha256(np.ascontiguousarray(tokens).tobytes())
    for path, leaf in tree_lib.leaves_with_paths(params):
        arr = np.asarray(leaf)
        h.update(f"{path}:{arr.dtype}:{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def cached_zeroshot_head(task: str, checkpoint: CLIPCheckpoint, tokenizer, *,
                         cache_dir: str | os.PathLike | None = None,
                         classnames: Sequence[str] | None = None,
                         templates: Sequence[str] | None = None,
                         chunk_size: int = 256) -> jax.Array:
    """The zero-shot head of ``task`` from a converted CLIP checkpoint, cached on disk.

    The cache file is ``{cache_dir}/head_{task}_{fingerprint}.npy``, where the fingerprint
    hashes the prompt tokens and every text-tower weight (and ``logit_scale``): another
    checkpoint, tokenizer or prompt set gets another file.

    Args:
      task: a name from :data:`taskvec_jax.clip.TASKS` (or any name, with ``classnames``
        and ``templates``).
      checkpoint: a :class:`taskvec_jax.clip.CLIPCheckpoint` with the text tower and
        ``logit_scale`` (a full ``CLIPModel``).
      tokenizer: the checkpoint's ``tokenizers.Tokenizer``.
      cache_dir: where heads are kept (``None``: no cache).
      classnames, templates: override :func:`taskvec_jax.clip.task_prompts`.
      chunk_size: prompts encoded per call (memory only).

    Raises:
      ValueError: if the checkpoint has no text tower or ``logit_scale``, or ``task`` is
        unknown and ``classnames`` / ``templates`` are not given.
    """
    if checkpoint.text is None or "logit_scale" not in checkpoint.params:
        raise ValueError("zero-shot heads need a checkpoint with the text tower and "
                         "logit_scale (a full CLIPModel, e.g. openai/clip-vit-base-patch32)")
    if classnames is None or templates is None:
        names, temps = task_prompts(task)
        classnames = names if classnames is None else classnames
        templates = temps if templates is None else templates
    text_params = checkpoint.params["text"]
    logit_scale = checkpoint.params["logit_scale"]
    path = None
    if cache_dir is not None:
        tokens = tokenize(tokenizer, [t.format(c) for c in classnames for t in templates],
                          checkpoint.text.context_length)
        key = _fingerprint(tokens, {"text": text_params, "logit_scale": logit_scale})
        path = os.path.join(os.path.abspath(os.fspath(cache_dir)), f"head_{task}_{key}.npy")
        if os.path.isfile(path):
            return jnp.asarray(np.load(path))
    encode = text_encoder(checkpoint.text)
    head = zeroshot_head(lambda ids: encode(text_params, ids), tokenizer, classnames,
                         templates, logit_scale=logit_scale,
                         context_length=checkpoint.text.context_length,
                         chunk_size=chunk_size)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}.npy"
        np.save(tmp, np.asarray(head))
        os.replace(tmp, path)
    return head
