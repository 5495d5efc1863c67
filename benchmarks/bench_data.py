"""Is reading the bottleneck? Batch-iterator examples/s against finetuning-step examples/s.

    python benchmarks/bench_data.py            # ~1 minute on 2 CPU cores
    python benchmarks/bench_data.py --quick

Two settings, each printing the iterator's rate, the training step's rate and their ratio
(> 1: the iterator outruns training, so reading is not the bottleneck):

1. the embedded suite (in memory) feeding the default small MLP (784-128-10), minibatches
   of 128 -- the main job's CPU setting;
2. a file-backed array_record dataset, as the real tasks are read: 2,000 real digit images
   (the embedded suite's, upscaled to 64x64 RGB JPEGs, like EuroSAT tiles) imported with
   :func:`taskvec_jax.data.import_folder`, decoded, resized to 32x32 and normalized by the
   threaded iterator, feeding the default ViT (patch 4, width 64, depth 2) at 32x32,
   minibatches of 128.

A training step is one jitted ``value_and_grad`` + SGD update, timed after compilation.
Rates are medians of repeated runs; the machine is shared, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import PIL.Image  # noqa: E402

import taskvec_jax as tvj  # noqa: E402
from taskvec_jax import data  # noqa: E402


def iterator_rate(split, batch_size, *, epochs, num_threads=None) -> float:
    rates = []
    key = jax.random.key(0)
    for e in range(epochs):
        start = time.perf_counter()
        n = 0
        for batch in data.batches(split, batch_size, key=key, epoch=e,
                                  num_threads=num_threads):
            n += batch["label"].shape[0]
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def step_rate(model, batch, *, steps) -> float:
    params = model.init(jax.random.key(0), jnp.asarray(batch["image"][:1]))["params"]
    loss_fn = tvj.models.make_loss_fn(model)
    opt = optax.sgd(0.01)
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grad = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grad, state, params)
        return optax.apply_updates(params, updates), state, loss

    batch = jax.device_put(batch)
    params, state, loss = step(params, state, batch)  # compile
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, state, loss = step(params, state, batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    return batch["label"].shape[0] / statistics.median(times)


def make_jpeg_folder(root: str, n: int) -> None:
    images, labels = data.embedded.mnist5k()
    tint = np.array([[1.0, 0.6, 0.3], [0.3, 1.0, 0.6], [0.6, 0.3, 1.0]])
    for i in range(n):
        rgb = (images[i][..., None] * tint[i % 3]).astype(np.uint8)
        big = PIL.Image.fromarray(rgb).resize((64, 64), PIL.Image.BILINEAR)
        folder = os.path.join(root, str(int(labels[i])))
        os.makedirs(folder, exist_ok=True)
        big.save(os.path.join(folder, f"{i}.jpg"), quality=90)


def report(name, it_rate, st_rate):
    print(f"{name}\n  batch iterator : {it_rate:12,.0f} examples/s\n"
          f"  training step  : {st_rate:12,.0f} examples/s\n"
          f"  iterator / step: {it_rate / st_rate:12.1f}x", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args(argv)
    b = args.batch_size
    epochs, steps, n_files = (2, 10, 500) if args.quick else (5, 30, 2000)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPUs, batch {b}", flush=True)

    split = data.open_split("embedded/rotate90", "train")
    mlp = tvj.models.MLP(features=(128, split.num_classes))
    report(f"1. embedded/rotate90 in memory ({len(split)} examples, 28x28x1) -> "
           "MLP 784-128-10",
           iterator_rate(split, b, epochs=epochs), step_rate(mlp, split.read(range(b)),
                                                             steps=steps))

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "jpegs")
        make_jpeg_folder(folder, n_files)
        start = time.perf_counter()
        data.import_folder(folder, "bench_jpegs", data_dir=os.path.join(tmp, "dd"))
        print(f"   (import_folder of {n_files} JPEGs: "
              f"{time.perf_counter() - start:.1f} s)", flush=True)
        split = data.open_split("bench_jpegs", "train", data_dir=os.path.join(tmp, "dd"),
                                image_size=32)
        vit = tvj.models.ViT(num_classes=split.num_classes)
        st = step_rate(vit, split.read(range(b)), steps=steps)
        for threads in (0, data.default_num_threads()):
            report(f"2. array_record JPEG 64x64 -> 32x32 ({len(split)} examples, "
                   f"{threads} decode threads) -> ViT patch 4, width 64, depth 2",
                   iterator_rate(split, b, epochs=epochs, num_threads=threads), st)


if __name__ == "__main__":
    main()
