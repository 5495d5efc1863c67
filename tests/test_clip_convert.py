"""Hugging Face / open_clip checkpoints -> our CLIP tree (clip.convert, read by
clip.weights_io): parity with transformers, exactness, round trips."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import clip_helpers as helpers
import taskvec_jax as tvj
from taskvec_jax import clip


def _torch():
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (pip install 'taskvec_jax[parity]')")
    pytest.importorskip("transformers",
                        reason="transformers is not installed (pip install 'taskvec_jax[parity]')")
    return torch


def _inputs(seed=0, batch=4):
    vocab = helpers.tiny_vocab()
    rng = np.random.default_rng(seed)
    pixels = rng.normal(size=(batch, 3, 30, 30))                     # NCHW, as torch takes
    s, e = vocab[helpers.START], vocab[helpers.END]
    # The last row has no end token: pooling at the arg-max id (legacy configs) and at the
    # first end token (current ones) then differ, and each must match the reference.
    ids = np.array([[s, 5, 6, 7, e, e, e], [s, 9, e, e, e, e, e], [s, 3, 4, 5, 6, 7, e],
                    [5, 300, 7, 8, 9, 10, 11]])
    return pixels, ids[:batch]


def _ours(ckpt, pixels, ids):
    images = jnp.asarray(pixels.transpose(0, 2, 3, 1), ckpt.params["logit_scale"].dtype)
    return (helpers.image_encoder(ckpt.vision)(ckpt.params["vision"], images),
            clip.text_encoder(ckpt.text)(ckpt.params["text"], jnp.asarray(ids)))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """One random tiny ``CLIPModel`` (seed 0) saved as safetensors, shared by this file:
    ``(torch model, its directory)``."""
    _torch()
    directory = tmp_path_factory.mktemp("tiny_hf_clip")
    return helpers.save_tiny_hf_clip(str(directory)), directory


# --------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_hf_parity_float32(tmp_path, tiny_hf, legacy_eos):
    """Converted weights give the reference implementation's embeddings to 1e-5 (float32).

    ``legacy_eos`` writes ``eos_token_id=2`` (configs older than transformers PR #24773),
    which pools at the arg-max id instead of the first end token.
    """
    torch = _torch()
    if legacy_eos:
        model = helpers.save_tiny_hf_clip(str(tmp_path), eos_token_id=2)
        directory = tmp_path
    else:
        model, directory = tiny_hf
    ckpt = clip.load_hf_checkpoint(directory)
    assert ckpt.text.eos_token_id == (None if legacy_eos else helpers.tiny_vocab()[helpers.END])
    pixels, ids = _inputs()
    with torch.no_grad():
        ref_img = model.get_image_features(
            pixel_values=torch.tensor(pixels, dtype=torch.float32)).pooler_output.numpy()
        ref_txt = model.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
    img, txt = _ours(ckpt, pixels.astype(np.float32), ids)
    assert img.dtype == jnp.float32
    np.testing.assert_allclose(img, ref_img, atol=1e-5, rtol=0)
    np.testing.assert_allclose(txt, ref_txt, atol=1e-5, rtol=0)
    assert np.abs(ref_img).max() > 0.1 and np.abs(ref_txt).max() > 0.1   # not trivially zero


def test_hf_parity_float64(tiny_hf):
    """In float64 both implementations agree to rounding (1e-10), so the match is exact math."""
    torch = _torch()
    from transformers import CLIPModel

    _, directory = tiny_hf
    ref = CLIPModel.from_pretrained(directory, attn_implementation="sdpa",
                                    dtype=torch.float64).eval()
    ckpt = clip.load_hf_checkpoint(directory, dtype=jnp.float64)
    pixels, ids = _inputs(seed=1)
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
    img, txt = _ours(ckpt, pixels, ids)
    np.testing.assert_allclose(img, ref.get_image_features(
        pixel_values=torch.tensor(pixels)).pooler_output.detach().numpy(), atol=1e-10, rtol=0)
    np.testing.assert_allclose(txt, ref.get_text_features(
        input_ids=torch.tensor(ids)).pooler_output.detach().numpy(), atol=1e-10, rtol=0)
    # The full model: exp(logit_scale) * cos(image, text).
    logits = jax.jit(clip.CLIP(ckpt.config).apply)(
        {"params": ckpt.params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids))
    np.testing.assert_allclose(logits, out.logits_per_image.numpy(), atol=1e-9, rtol=0)


def test_hf_vision_model_and_image_encoder(tmp_path, tiny_hf):
    """A ``CLIPVisionModel`` file (the published finetuned encoders) converts without
    projection; ``load_image_encoder`` completes it with the pretrained projection."""
    torch = _torch()
    from transformers import CLIPVisionModel

    full, pretrained_dir = tiny_hf
    torch.manual_seed(5)
    vision_only = CLIPVisionModel(helpers.tiny_hf_config().vision_config).eval()
    vision_only.save_pretrained(tmp_path / "finetuned", safe_serialization=True)

    ckpt = clip.load_hf_checkpoint(tmp_path / "finetuned")
    assert ckpt.text is None and ckpt.vision.embed_dim is None
    assert "projection" not in ckpt.params["vision"]
    pixels, _ = _inputs()
    with torch.no_grad():
        ref = vision_only(pixel_values=torch.tensor(pixels, dtype=torch.float32)).pooler_output
    ours = helpers.image_encoder(ckpt.vision)(
        ckpt.params["vision"], jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5, rtol=0)

    pretrained = clip.load_hf_checkpoint(pretrained_dir)
    encoder = clip.load_image_encoder(tmp_path / "finetuned", pretrained)
    tau = tvj.task_vector(encoder, pretrained.params["vision"])
    assert float(jnp.abs(tau["projection"]["kernel"]).max()) == 0.0
    assert float(tvj.tree.norm(tau)) > 0
    # The completed encoder is the finetuned tower followed by the pretrained projection.
    with torch.no_grad():
        ref_emb = full.visual_projection(ref).numpy()
    emb = helpers.image_encoder(pretrained.vision)(
        encoder, jnp.asarray(pixels.transpose(0, 2, 3, 1), jnp.float32))
    np.testing.assert_allclose(emb, ref_emb, atol=1e-5, rtol=0)


def test_sharded_and_bfloat16_checkpoints(tmp_path, tiny_hf):
    """Sharded files (an index json) and bfloat16 tensors (which numpy cannot name) load."""
    torch = _torch()
    model, one_dir = tiny_hf
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    one = clip.load_hf_checkpoint(one_dir)
    sharded = clip.load_hf_checkpoint(tmp_path / "sharded")
    jax.tree.map(np.testing.assert_array_equal, sharded.params, one.params)

    # A bfloat16 copy (the shared float32 model itself stays as it is).
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    ref = state["vision_model.encoder.layers.1.mlp.fc1.weight"].float().numpy().T
    model.save_pretrained(tmp_path / "bf16", state_dict=state, safe_serialization=True)
    bf16 = clip.load_hf_checkpoint(tmp_path / "bf16")
    w = bf16.params["vision"]["layers_1"]["mlp"]["fc1"]["kernel"]
    assert w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(w, np.float32), ref)


def test_open_clip_layout_matches_hf(tiny_hf):
    """The open_clip table (fused in_proj, [width, embed] projections) gives the same tree."""
    _torch()
    model, directory = tiny_hf
    hf = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    oc = {"logit_scale": hf["logit_scale"],
          "visual.proj": hf["visual_projection.weight"].T,
          "text_projection": hf["text_projection.weight"].T,
          "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
          "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
          "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
          "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
          "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
          "attn_mask": np.zeros((16, 16), np.float32)}
    for ours, theirs in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                         ("vision_model.post_layernorm", "visual.ln_post"),
                         ("text_model.final_layer_norm", "ln_final")):
        oc[f"{theirs}.weight"], oc[f"{theirs}.bias"] = hf[f"{ours}.weight"], hf[f"{ours}.bias"]
    for src, dst in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        for i in range(2):
            s, d = f"{src}.encoder.layers.{i}", f"{dst}.resblocks.{i}"
            for kind in ("weight", "bias"):
                oc[f"{d}.attn.in_proj_{kind}"] = np.concatenate(
                    [hf[f"{s}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                oc[f"{d}.attn.out_proj.{kind}"] = hf[f"{s}.self_attn.out_proj.{kind}"]
                oc[f"{d}.mlp.c_fc.{kind}"] = hf[f"{s}.mlp.fc1.{kind}"]
                oc[f"{d}.mlp.c_proj.{kind}"] = hf[f"{s}.mlp.fc2.{kind}"]
                oc[f"{d}.ln_1.{kind}"] = hf[f"{s}.layer_norm1.{kind}"]
                oc[f"{d}.ln_2.{kind}"] = hf[f"{s}.layer_norm2.{kind}"]
    ckpt = clip.load_hf_checkpoint(directory)
    converted = clip.convert_open_clip_state_dict(oc, ckpt.config)
    jax.tree.map(np.testing.assert_array_equal, converted.params, ckpt.params)
    with pytest.raises(ValueError, match="unexpected tensor 'visual.attn_pool.query'"):
        clip.convert_open_clip_state_dict(
            {**oc, "visual.attn_pool.query": np.zeros(3)}, ckpt.config)


# --------------------------------------------------------------------- numpy-only (no torch)


def _numpy_checkpoint(directory, seed):
    state = helpers.hf_layout_state_dict(np.random.default_rng(seed))
    helpers.save_hf_layout(str(directory), state, helpers.hf_layout_config())
    return state


def test_numpy_layout_converts_to_the_model_tree(tmp_path):
    """A file with Hugging Face key names converts into exactly the tree the model inits."""
    state = _numpy_checkpoint(tmp_path, 0)
    ckpt = clip.load_hf_checkpoint(tmp_path)
    model = clip.CLIP(ckpt.config)
    init = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 30, 30, 3)), jnp.zeros((1, 16), jnp.int32))["params"]
    tvj.check_compatible(ckpt.params, jax.tree.map(jnp.zeros_like, init), name="converted",
                         reference_name="init")
    k = ckpt.params["text"]["layers_1"]["attn"]["v_proj"]["kernel"]
    np.testing.assert_array_equal(k, state["text_model.encoder.layers.1.self_attn.v_proj.weight"].T)
    np.testing.assert_array_equal(
        ckpt.params["vision"]["patch_embedding"]["kernel"],
        state["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0))
    ids = jnp.array([[1, 2, 39, 0]])
    out = jax.jit(model.apply)({"params": ckpt.params}, jnp.ones((2, 30, 30, 3)), ids)
    assert out.shape == (2, 1) and bool(jnp.all(jnp.isfinite(out)))


def test_orbax_round_trip(tmp_path):
    """The converted tree saves and restores through orbax bit for bit."""
    _numpy_checkpoint(tmp_path / "hf", 0)
    params = clip.load_hf_checkpoint(tmp_path / "hf").params
    tvj.checkpoint.save(tmp_path / "orbax", params)
    restored = tvj.checkpoint.restore(tmp_path / "orbax", like=params)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(restored),
                                                  jax.tree.leaves(params)))


def test_task_vectors_are_converted_differences(tmp_path):
    """tau = convert(finetuned) - convert(base) is exactly convert(finetuned - base) per leaf:
    the conversion only moves numbers."""
    base = _numpy_checkpoint(tmp_path / "base", 0)
    finetuned = _numpy_checkpoint(tmp_path / "ft", 1)
    tau = tvj.task_vector(clip.load_hf_checkpoint(tmp_path / "ft").params,
                          clip.load_hf_checkpoint(tmp_path / "base").params)
    diff = {k: finetuned[k] - base[k] for k in base}
    expected = clip.convert_hf_state_dict(diff, helpers.hf_layout_config()).params
    assert jax.tree.structure(tau) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, tau, expected)
    # base + tau recovers the finetuned weights up to the two float32 roundings of - and +.
    base_params = clip.load_hf_checkpoint(tmp_path / "base").params
    ft_params = clip.load_hf_checkpoint(tmp_path / "ft").params
    merged = tvj.apply(base_params, tau)
    eps = np.finfo(np.float32).eps
    jax.tree.map(lambda m, f, b: np.testing.assert_allclose(
        m, f, rtol=0, atol=eps * max(np.abs(f).max(), np.abs(b).max())),
        merged, ft_params, base_params)


def test_conversion_errors_name_the_key(tmp_path):
    state = helpers.hf_layout_state_dict(np.random.default_rng(0))
    config = helpers.hf_layout_config()
    missing = dict(state)
    del missing["vision_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match="no tensor 'vision_model.encoder.layers.1.mlp.fc2.bias'"):
        clip.convert_hf_state_dict(missing, config)
    with pytest.raises(ValueError, match="unexpected tensor 'vision_model.encoder.layers.2"):
        clip.convert_hf_state_dict(
            {**state, "vision_model.encoder.layers.2.mlp.fc1.bias": np.zeros(37)}, config)
    bad = {**state, "text_model.encoder.layers.0.mlp.fc1.weight": np.zeros((36, 32), np.float32)}
    with pytest.raises(ValueError, match=r"'text_model.encoder.layers.0.mlp.fc1.weight' converts "
                                         r"to shape \(32, 36\) at 'text/layers_0/mlp/fc1/kernel'"):
        clip.convert_hf_state_dict(bad, config)
    # Buffers that are not parameters are accepted and dropped.
    ok = clip.convert_hf_state_dict(
        {**state, "text_model.embeddings.position_ids": np.arange(16)[None]}, config)
    assert "position_ids" not in str(jax.tree_util.tree_structure(ok.params))
    with pytest.raises(clip.MissingCheckpointError, match="no config.json"):
        clip.load_hf_checkpoint(tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    helpers.save_hf_layout(str(tmp_path / "cfg_only"), {}, config)
    os.remove(tmp_path / "cfg_only" / "model.safetensors")
    with pytest.raises(clip.MissingCheckpointError, match="holds no safetensors"):
        clip.load_hf_checkpoint(tmp_path / "cfg_only")
    with pytest.raises(ValueError, match="not a CLIP model"):
        clip.convert_hf_state_dict(state, {"model_type": "siglip"})
