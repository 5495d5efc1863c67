"""The 8-task CLIP merging benchmark: weights -> task vectors -> merges -> the literature table.

    python -m experiments.clip_benchmark --config experiments/configs/clip_vit_b32.py \
        --weights_dir /path/to/weights

Steps, in order, each a function that a notebook can call on its own:

1. :func:`check_weights` -- every checkpoint directory exists, or stop at once with
   :class:`MissingWeightsError`, which lists the ``huggingface_hub`` command for each
   missing one (nothing is downloaded here; the loaders only read local paths);
2. :func:`load_encoders` -- convert the pretrained CLIP and the finetuned image encoders;
3. :func:`task_vectors` -- ``tau_t = theta_t - theta_0`` on the image tower;
4. :func:`build_heads` -- zero-shot heads from the pretrained text tower, cached per task;
5. :func:`run_benchmark` -- zero-shot, finetuned and every merging method with its alpha
   chosen on validation; :func:`format_tables` writes absolute and normalized accuracy
   (``acc_merged(t) / acc_finetuned(t)``, Ilharco et al. 2023) in the literature's layout.

Data loading and the merging methods come from ``taskvec_jax.data`` and
``taskvec_jax.merging``; :func:`wire_data_and_merging` connects them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import taskvec_jax as tvj
from taskvec_jax import clip

PyTree = Any
# (task, split) -> {"image", "label"} arrays, or an iterable of such batches.
LoadSplit = Callable[[str, str], Any]
MergeFn = Callable[[PyTree, Sequence[PyTree], float], PyTree]  # (base, taus, alpha) -> params


class MissingWeightsError(FileNotFoundError):
    """Checkpoints the benchmark needs are not on disk."""


def load_config(path: str):
    """``get_config()`` of a config file given by path."""
    spec = importlib.util.spec_from_file_location("clip_benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def checkpoint_dirs(config) -> dict[str, str]:
    """``{"pretrained": dir, task: dir, ...}`` under ``config.weights_dir`` (absolute)."""
    root = os.path.abspath(config.weights_dir)
    dirs = {"pretrained": os.path.join(root, config.pretrained.name)}
    for task in config.tasks:
        dirs[task] = os.path.join(root, config.finetuned[task].name)
    return dirs


def check_weights(config) -> dict[str, str]:
    """Returns :func:`checkpoint_dirs` if each holds ``config.json`` and safetensors weights.

    Raises:
      MissingWeightsError: listing every missing directory with the command that fetches
        it (run on a networked machine, then copy the directories here).
    """
    dirs = checkpoint_dirs(config)
    missing = []
    for name, path in dirs.items():
        weights = any(os.path.isfile(os.path.join(path, f))
                      for f in clip.HF_WEIGHT_FILES)
        if not (os.path.isfile(os.path.join(path, "config.json")) and weights):
            repo = (config.pretrained if name == "pretrained" else config.finetuned[name]).repo_id
            missing.append(f"  {name}: {path}\n    {clip.download_hint(repo, path)}")
    if missing:
        raise MissingWeightsError(
            f"{len(missing)} of {len(dirs)} CLIP checkpoints are missing under "
            f"{os.path.abspath(config.weights_dir)} (each directory needs config.json and "
            "model.safetensors). Fetch them on a networked machine with huggingface_hub "
            "(pip install 'taskvec_jax[clip]'), then pass --weights_dir:\n"
            + "\n".join(missing))
    return dirs


def load_encoders(config, dirs: Mapping[str, str] | None = None
                  ) -> tuple[clip.CLIPCheckpoint, dict[str, PyTree]]:
    """The converted pretrained CLIP and ``{task: finetuned image-tower params}``."""
    dirs = check_weights(config) if dirs is None else dirs
    pretrained = clip.load_hf_checkpoint(dirs["pretrained"])
    finetuned = {task: clip.load_image_encoder(dirs[task], pretrained)
                 for task in config.tasks}
    return pretrained, finetuned


def task_vectors(pretrained: clip.CLIPCheckpoint,
                 finetuned: Mapping[str, PyTree]) -> dict[str, PyTree]:
    """``{task: theta_task - theta_pretrained}`` on the image tower."""
    base = pretrained.params["vision"]
    return {task: tvj.task_vector(params, base) for task, params in finetuned.items()}


def build_heads(config, pretrained: clip.CLIPCheckpoint,
                pretrained_dir: str) -> dict[str, jax.Array]:
    """Zero-shot heads ``{task: [classes, embed_dim]}``, cached in ``config.head_cache_dir``."""
    tokenizer = clip.load_tokenizer(pretrained_dir)
    heads = {}
    for task in config.tasks:
        prompts = config.prompts.get(task, None) if "prompts" in config else None
        heads[task] = clip.cached_zeroshot_head(
            task, pretrained, tokenizer, cache_dir=config.head_cache_dir,
            classnames=None if prompts is None else list(prompts["classnames"]),
            templates=None if prompts is None else list(prompts["templates"]))
    return heads


# Registry names (taskvec_jax.data) of the literature's task names: the names lower-cased.
DATA_NAMES = {task: task.lower() for task in clip.TASKS}


class _Split:
    """A re-iterable of preprocessed host batches of one split (never all in memory)."""

    def __init__(self, split, batch_size: int):
        self.split, self.batch_size = split, batch_size

    def __iter__(self):
        from taskvec_jax import data
        return iter(data.batches(self.split, self.batch_size))


def wire_data_and_merging(config) -> tuple[LoadSplit, dict[str, MergeFn]]:
    """``load_split(task, split)`` over :mod:`taskvec_jax.data` and the merging methods.

    Images are preprocessed as CLIP's evaluation transform (resize the short side, center
    crop to the model's resolution, CLIP's mean/std); labels follow tensorflow-datasets'
    order, which is the order of :data:`taskvec_jax.clip.CLASSNAMES` (tested). A task
    whose data is not prepared raises :class:`taskvec_jax.data.DataNotFoundError` naming
    the task, the data directory and how to provide it.
    """
    from taskvec_jax import data, merging

    image_size = int(config.get("image_size", 224))
    data_dir = config.get("data_dir", None)

    def load_split(task: str, split: str):
        opened = data.open_split(DATA_NAMES.get(task, task), split, image_size=image_size,
                                 channels=3, normalization="clip", resize_mode="crop",
                                 data_dir=data_dir)
        return _Split(opened, config.eval_microbatch_size)

    key = jax.random.key(int(config.get("seed", 0)))
    density = float(config.get("ties_density", 0.2))
    drop = float(config.get("dare_drop_rate", 0.5))
    table = {
        "task_arithmetic": lambda base, taus, a: merging.task_arithmetic(base, taus, alpha=a),
        "ties": lambda base, taus, a: merging.ties(base, taus, density=density, alpha=a),
        "dare": lambda base, taus, a: merging.task_arithmetic(
            base, [merging.dare(t, drop_rate=drop, key=jax.random.fold_in(key, i))
                   for i, t in enumerate(taus)], alpha=a),
        "breadcrumbs": lambda base, taus, a: merging.breadcrumbs(base, taus, alpha=a),
    }
    unknown = set(config.methods) - set(table)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {sorted(table)}")
    return load_split, {name: table[name] for name in config.methods}


def _batches(data, batch_size: int):
    """Yields ``{"image", "label"}`` host batches from a dict of arrays or an iterable."""
    if isinstance(data, Mapping):
        n = len(data["label"])
        for i in range(0, n, batch_size):
            yield {k: np.asarray(data[k][i:i + batch_size]) for k in ("image", "label")}
    else:
        yield from data


def make_scorer(encoder: clip.CLIPVisionTransformer, microbatch_size: int):
    """``score(params, head, data) -> accuracy`` over host batches of ``microbatch_size``.

    One jitted step per (head, batch) shape: the last, short batch is padded and masked,
    so a split compiles once, and a split never has to fit on the device at once.
    """

    @jax.jit
    def correct(params, head, images, labels, valid):
        logits = clip.classification_logits(encoder.apply({"params": params}, images), head)
        hits = (jnp.argmax(logits, axis=-1) == labels) & (jnp.arange(labels.shape[0]) < valid)
        return jnp.sum(hits)

    def score(params, head, data) -> float:
        total = count = 0
        for batch in _batches(data, microbatch_size):
            images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
            n = len(labels)
            if n < microbatch_size:
                pad = microbatch_size - n
                images = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                                          images.dtype)])
                labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
            total += int(correct(params, head, images, labels, n))
            count += n
        if count == 0:
            raise ValueError("empty evaluation split")
        return total / count

    return score


def run_benchmark(config, pretrained: clip.CLIPCheckpoint,
                  finetuned: Mapping[str, PyTree], heads: Mapping[str, jax.Array],
                  load_split: LoadSplit, methods: Mapping[str, MergeFn]) -> dict:
    """Test accuracy of zero-shot, finetuned and merged encoders; alpha picked on validation.

    For each method, ``alpha* = argmax_alpha mean_t acc_val(t, merge(alpha))`` over
    ``config.alphas``; the merged encoder at ``alpha*`` is then scored on the test splits.

    Returns:
      ``{"accuracy": {row: {task: acc}}, "normalized": {row: {task: acc / finetuned}},
      "alpha": {method: alpha*}, "validation": {method: {alpha: mean val acc}}}``.
    """
    tasks = list(config.tasks)
    encoder = clip.CLIPVisionTransformer(pretrained.vision)
    base = pretrained.params["vision"]
    taus = [tvj.task_vector(finetuned[t], base) for t in tasks]
    val = {t: load_split(t, config.validation_split) for t in tasks}
    test = {t: load_split(t, config.test_split) for t in tasks}
    scorer = make_scorer(encoder, config.eval_microbatch_size)
    score = lambda params, t, split: scorer(params, heads[t], split[t])
    acc = {"zero_shot": {t: score(base, t, test) for t in tasks},
           "finetuned": {t: score(finetuned[t], t, test) for t in tasks}}
    alphas, curves = {}, {}
    for name in config.methods:
        curve = {}
        for alpha in config.alphas:
            merged = methods[name](base, taus, float(alpha))
            curve[float(alpha)] = float(np.mean([score(merged, t, val) for t in tasks]))
        best = max(curve, key=curve.get)          # first of equal maxima: the smallest alpha
        alphas[name], curves[name] = best, curve
        merged = methods[name](base, taus, best)
        acc[name] = {t: score(merged, t, test) for t in tasks}
    normalized = {row: {t: a[t] / acc["finetuned"][t] for t in tasks} for row, a in acc.items()}
    return {"tasks": tasks, "accuracy": acc, "normalized": normalized, "alpha": alphas,
            "validation": curves}


def format_tables(results: Mapping, reference: Mapping | None = None) -> str:
    """Markdown: absolute and normalized accuracy (%), one row per method, tasks + Avg."""
    tasks = results["tasks"]
    names = {"zero_shot": "Pretrained (zero-shot)", "finetuned": "Individual (finetuned)"}
    lines = []
    for title, key in (("Absolute accuracy (%)", "accuracy"),
                       ("Normalized accuracy (%): merged / finetuned", "normalized")):
        lines += [f"### {title}", "", "| Method | " + " | ".join(tasks) + " | Avg |",
                  "|---" * (len(tasks) + 2) + "|"]
        for row, values in results[key].items():
            label = names.get(row, row)
            if row in results["alpha"]:
                label += f" (alpha={results['alpha'][row]:g})"
            cells = [100 * values[t] for t in tasks]
            lines.append(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells)
                         + f" | {np.mean(cells):.1f} |")
        lines.append("")
    if reference:
        lines += [f"Reference averages ({reference['source']}): "
                  + ", ".join(f"{k} {v}" for k, v in reference.items() if k != "source"), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "configs",
                                                         "clip_vit_b32.py"))
    parser.add_argument("--weights_dir", default=None)
    parser.add_argument("--results_dir", default=None)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.weights_dir:
        config.weights_dir = args.weights_dir
    if args.results_dir:
        config.results_dir = args.results_dir
    dirs = check_weights(config)                     # fails fast, before any heavy work
    pretrained, finetuned = load_encoders(config, dirs)
    heads = build_heads(config, pretrained, dirs["pretrained"])
    load_split, methods = wire_data_and_merging(config)
    results = run_benchmark(config, pretrained, finetuned, heads, load_split, methods)
    os.makedirs(config.results_dir, exist_ok=True)
    with open(os.path.join(config.results_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    report = format_tables(results, config.reference.to_dict() if "reference" in config else None)
    with open(os.path.join(config.results_dir, "report.md"), "w") as f:
        f.write(f"# CLIP {config.model}: 8-task merging benchmark\n\n{report}")
    print(report)
    return results


if __name__ == "__main__":
    from taskvec_jax.data import DataNotFoundError
    try:
        main()
    except (MissingWeightsError, DataNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
