"""The 8-task CLIP benchmark's weights side, offline: missing weights stop it with the fix;
tiny checkpoints in the published layouts run through task vectors, heads, alpha choice and
the table."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import clip_helpers as helpers
import taskvec_jax as tvj
from experiments import clip_benchmark as bench
from taskvec_jax import clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "clip_vit_b32.py")


def test_missing_weights_stop_with_the_download_commands(tmp_path):
    config = bench.load_config(CONFIG)
    config.weights_dir = str(tmp_path / "weights")
    assert list(config.tasks) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB",
                                  "MNIST", "DTD"]
    with pytest.raises(bench.MissingWeightsError) as err:
        bench.check_weights(config)
    message = str(err.value)
    assert "9 of 9 CLIP checkpoints are missing" in message
    assert "snapshot_download('openai/clip-vit-base-patch32'" in message
    assert "tanganke/clip-vit-base-patch32_stanford-cars" in message
    assert os.path.join(str(tmp_path / "weights"), "DTD") in message
    assert not os.path.exists(tmp_path / "weights")       # nothing is created or fetched


def test_command_line_exits_with_the_missing_weights_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.clip_benchmark", "--weights_dir",
         str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2, proc.stderr
    assert "CLIP checkpoints are missing" in proc.stderr
    assert "huggingface_hub" in proc.stderr


def _tiny_weights(root, tasks):
    """A pretrained CLIPModel directory (with tokenizer files) and, per task, a finetuned
    CLIPVisionModel directory without projection: the layouts of the published weights."""
    vocab = len(helpers.tiny_vocab())
    state = helpers.hf_layout_state_dict(np.random.default_rng(0), vocab=vocab)
    config = helpers.hf_layout_config(vocab=vocab)
    helpers.save_hf_layout(str(root / "pretrained"), state, config)
    helpers.write_tokenizer_files(str(root / "pretrained"))
    rng = np.random.default_rng(1)
    for task in tasks:
        vision = {k: v + 0.05 * rng.normal(size=v.shape).astype(np.float32)
                  for k, v in state.items() if k.startswith("vision_model.")}
        helpers.save_hf_layout(str(root / task), vision,
                               {**config["vision_config"], "model_type": "clip_vision_model"})


def _config(tmp_path, tasks):
    config = bench.load_config(CONFIG)
    config.weights_dir = str(tmp_path / "weights")
    config.head_cache_dir = str(tmp_path / "heads")
    config.tasks = tuple(tasks)
    for task in tasks:
        config.finetuned[task] = {"name": task, "repo_id": f"nobody/{task}"}
    config.prompts = {"A": {"classnames": ["cat", "photo", "of"], "templates": ["a {}."]},
                      "B": {"classnames": ["the", "cat"], "templates": ["a {}.", "the {}!"]}}
    config.methods = ("task_arithmetic",)
    config.alphas = (0.25, 0.5, 1.0)
    config.eval_microbatch_size = 8
    return config


def test_tiny_benchmark_end_to_end(tmp_path):
    tasks = ("A", "B")
    _tiny_weights(tmp_path / "weights", tasks)
    config = _config(tmp_path, tasks)
    dirs = bench.check_weights(config)
    pretrained, finetuned = bench.load_encoders(config, dirs)
    taus = bench.task_vectors(pretrained, finetuned)
    assert float(jnp.abs(taus["A"]["projection"]["kernel"]).max()) == 0.0   # frozen projection
    heads = bench.build_heads(config, pretrained, dirs["pretrained"])
    assert heads["A"].shape == (3, 24) and heads["B"].shape == (2, 24)
    assert len(os.listdir(config.head_cache_dir)) == 2

    rng = np.random.default_rng(2)
    data = {(t, split): {"image": rng.normal(size=(n, 30, 30, 3)).astype(np.float32),
                         "label": rng.integers(0, len(config.prompts[t]["classnames"]), n)}
            for t in tasks for split, n in (("validation", 11), ("test", 13))}
    _, methods = bench.wire_data_and_merging(config)
    results = bench.run_benchmark(config, pretrained, finetuned, heads,
                                  lambda t, s: data[(t, s)], methods)

    # Every accuracy equals an independent full-batch evaluation with the foundation's
    # accuracy() (no host batching, no padding).
    encoder = clip.CLIPVisionTransformer(pretrained.vision)
    base = pretrained.params["vision"]
    # Jitted, with the head an argument: one program per (head, split) shape.
    full_batch_accuracy = jax.jit(lambda params, head, batch: tvj.models.accuracy(
        clip.image_classifier(encoder, head), params, batch))

    def acc(params, t, split):
        d = data[(t, split)]
        return float(full_batch_accuracy(params, heads[t], {"image": jnp.asarray(d["image"]),
                                                            "label": jnp.asarray(d["label"])}))

    merged = lambda a: tvj.apply(base, tvj.tree.add(taus["A"], taus["B"]), a)
    for t in tasks:
        assert results["accuracy"]["zero_shot"][t] == acc(base, t, "test")
        assert results["accuracy"]["finetuned"][t] == acc(finetuned[t], t, "test")
        assert results["normalized"]["finetuned"][t] == 1.0
    curve = {a: np.mean([acc(merged(a), t, "validation") for t in tasks]) for a in config.alphas}
    assert results["validation"]["task_arithmetic"] == pytest.approx(curve, abs=1e-12)
    best = results["alpha"]["task_arithmetic"]
    assert curve[best] == max(curve.values()) and best in config.alphas
    for t in tasks:
        assert results["accuracy"]["task_arithmetic"][t] == acc(merged(best), t, "test")
        assert results["normalized"]["task_arithmetic"][t] == pytest.approx(
            results["accuracy"]["task_arithmetic"][t] / results["accuracy"]["finetuned"][t])

    table = bench.format_tables(results, config.reference.to_dict())
    assert "| Method | A | B | Avg |" in table
    assert f"| task_arithmetic (alpha={best:g}) |" in table
    assert "Normalized accuracy" in table and "AdaMerging" in table


def test_wiring_reads_the_data_registry_and_offers_every_method(tmp_path):
    from taskvec_jax.data import DataNotFoundError
    config = bench.load_config(CONFIG)
    config.data_dir = str(tmp_path / "tfds")
    load_split, methods = bench.wire_data_and_merging(config)
    assert sorted(methods) == sorted(config.methods)
    with pytest.raises(DataNotFoundError, match="sun397"):
        load_split("SUN397", "test")
    config.methods = ("task_arithmetic", "bogus")
    with pytest.raises(ValueError, match="unknown methods"):
        bench.wire_data_and_merging(config)
