"""Prompt tokenization with the checkpoint's tokenizer files, zero-shot heads and their cache."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from tests import clip_helpers as helpers
from taskvec_jax import clip
from taskvec_jax.clip import zeroshot


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    helpers.write_tokenizer_files(str(directory))
    return directory


def test_tokenize_with_a_tiny_clip_vocabulary(tokenizer_dir):
    """Byte-level BPE with ``</w>`` word ends, lower case, whitespace collapsed, specials."""
    vocab = helpers.tiny_vocab()
    tok = clip.load_tokenizer(tokenizer_dir)
    ids = zeroshot.tokenize(tok, ["A  photo of a CAT.", "the cats"], context_length=12)
    v = lambda *ts: [vocab[t] for t in ts]
    s, e = vocab[helpers.START], vocab[helpers.END]
    first = [s, *v("a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ".</w>"), e]
    # "cats": the merge "ca t</w>" needs t at the end of a word, so it does not apply.
    second = [s, *v("the</w>", "ca", "t", "s</w>"), e]
    np.testing.assert_array_equal(ids[0], first + [e] * (12 - len(first)))
    np.testing.assert_array_equal(ids[1], second + [e] * (12 - len(second)))
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(zeroshot.tokenize(tok, ["the cats"], 8, pad_id=0)[0],
                                  second + [0] * (8 - len(second)))
    with pytest.raises(ValueError, match="prompt 'a photo of a cat.' is 8 tokens long, more "
                                         "than context_length=7"):
        zeroshot.tokenize(tok, ["a photo of a cat."], context_length=7)


def test_tokenizer_json_and_vocab_files_agree(tokenizer_dir, tmp_path):
    """A ``tokenizer.json`` is preferred when present and gives the same ids."""
    tok = clip.load_tokenizer(tokenizer_dir)
    os.makedirs(tmp_path / "json")
    tok.save(str(tmp_path / "json" / "tokenizer.json"))
    again = clip.load_tokenizer(tmp_path / "json")
    texts = ['a photo of the number: "7".', "I love my  Cat!"]
    np.testing.assert_array_equal(zeroshot.tokenize(again, texts, 32),
                                  zeroshot.tokenize(tok, texts, 32))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json, nor vocab.json"):
        clip.load_tokenizer(tmp_path / "empty_dir_that_is_missing")


def test_tokenizer_matches_transformers(tokenizer_dir, tmp_path):
    """Our ids equal Hugging Face ``CLIPTokenizer``'s, from vocab/merges and from its own
    saved ``tokenizer.json`` (which carries a post-processor that we do not rely on)."""
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'taskvec_jax[parity]')")
    ref = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["A  photo of a CAT.", "the cats", 'a photo of the number: "3".', "phot-o of it's"]
    expected = ref(texts, padding="max_length", max_length=32)["input_ids"]
    ours = zeroshot.tokenize(clip.load_tokenizer(tokenizer_dir), texts, 32)
    np.testing.assert_array_equal(ours, np.array(expected))
    ref.save_pretrained(str(tmp_path / "saved"))
    assert os.path.isfile(tmp_path / "saved" / "tokenizer.json")
    np.testing.assert_array_equal(
        zeroshot.tokenize(clip.load_tokenizer(tmp_path / "saved"), texts, 32), ours)


def test_zeroshot_head_formula(tokenizer_dir):
    """head_c = exp(s) * normalize(mean_t normalize(e_{c,t})), checked against numpy with a
    deterministic fake text encoder; batching does not change the result."""
    tok = clip.load_tokenizer(tokenizer_dir)
    table = np.random.default_rng(0).normal(size=(len(helpers.tiny_vocab()), 6))

    shapes = []

    def encode(ids):   # sum of per-token vectors up to the end token (a stand-in tower)
        ids = np.asarray(ids)
        shapes.append(ids.shape)
        end = helpers.tiny_vocab()[helpers.END]
        keep = np.cumsum(ids == end, axis=1) == 0
        return jnp.asarray((table[ids] * keep[..., None]).sum(1))

    classes, templates = ["cat", "the photo", "of"], ["a {}.", "i love my {}!"]
    head = zeroshot.zeroshot_head(encode, tok, classes, templates, logit_scale=np.log(50.0),
                                  context_length=16, chunk_size=4)
    # 6 prompts in chunks of 4: the last chunk is padded, so every call has one shape.
    assert shapes == [(4, 16), (4, 16)]
    expected = []
    for c in classes:
        e = np.stack([np.asarray(encode(zeroshot.tokenize(tok, [t.format(c)], 16)))[0]
                      for t in templates])
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        w = e.mean(0)
        expected.append(50.0 * w / np.linalg.norm(w))
    np.testing.assert_allclose(head, np.stack(expected), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(head, axis=1), 50.0, rtol=1e-12)
    again = zeroshot.zeroshot_head(encode, tok, classes, templates, logit_scale=np.log(50.0),
                                   context_length=16, chunk_size=100)
    np.testing.assert_allclose(again, head, rtol=1e-12)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        zeroshot.zeroshot_head(encode, tok, classes, templates, logit_scale=0.0, chunk_size=0)


def test_zeroshot_head_matches_transformers(tmp_path, tokenizer_dir):
    """The head from our converted text tower equals the one built with the reference model
    and tokenizer (Ilharco et al.'s build_classification_head, in transformers)."""
    torch = pytest.importorskip("torch", reason="torch is not installed (taskvec_jax[parity])")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    model = helpers.save_tiny_hf_clip(str(tmp_path / "model"))
    ref_tok = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    classes, templates = ["cat", "photo"], ["a {}.", "the {}!", "a photo of a {}."]
    with torch.no_grad():
        rows = []
        for c in classes:
            ids = ref_tok([t.format(c) for t in templates], padding="max_length",
                          max_length=16, return_tensors="pt")["input_ids"]
            e = model.get_text_features(input_ids=ids).pooler_output
            e = e / e.norm(dim=-1, keepdim=True)
            w = e.mean(0)
            rows.append(w / w.norm())
        ref = (torch.stack(rows) * model.logit_scale.exp()).numpy()
    ckpt = clip.load_hf_checkpoint(tmp_path / "model")
    head = zeroshot.cached_zeroshot_head("toy", ckpt, clip.load_tokenizer(tokenizer_dir),
                                         classnames=classes, templates=templates)
    np.testing.assert_allclose(head, ref, atol=1e-5, rtol=0)


def test_heads_are_cached_per_task_and_weights(tmp_path, tokenizer_dir, monkeypatch):
    """The second call reads the cache; other weights or prompts make another file."""
    state = helpers.hf_layout_state_dict(np.random.default_rng(0), vocab=len(helpers.tiny_vocab()))
    config = helpers.hf_layout_config(vocab=len(helpers.tiny_vocab()))
    ckpt = clip.convert_hf_state_dict(state, config)
    tok = clip.load_tokenizer(tokenizer_dir)
    kw = dict(cache_dir=tmp_path / "heads", classnames=["cat", "of"], templates=["a {}."])
    head = zeroshot.cached_zeroshot_head("toy", ckpt, tok, **kw)
    files = os.listdir(tmp_path / "heads")
    assert len(files) == 1 and files[0].startswith("head_toy_")

    def fail(*args, **kwargs):
        raise AssertionError("the cached head should have been read")

    with monkeypatch.context() as m:
        m.setattr(zeroshot, "zeroshot_head", fail)
        np.testing.assert_array_equal(zeroshot.cached_zeroshot_head("toy", ckpt, tok, **kw), head)
    other = clip.convert_hf_state_dict({**state, "logit_scale": np.float32(3.0)}, config)
    head2 = zeroshot.cached_zeroshot_head("toy", other, tok, **kw)
    np.testing.assert_allclose(head2, head * np.exp(3.0 - 2.6592), rtol=1e-5)
    zeroshot.cached_zeroshot_head("toy", ckpt, tok, **{**kw, "templates": ["the {}."]})
    assert len(os.listdir(tmp_path / "heads")) == 3
    vision_only = clip.CLIPCheckpoint(ckpt.vision, None, {"vision": ckpt.params["vision"]})
    with pytest.raises(ValueError, match="need a checkpoint with the text tower"):
        zeroshot.cached_zeroshot_head("toy", vision_only, tok, **kw)
