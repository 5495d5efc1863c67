"""The standard 8-task merging benchmark with CLIP ViT-B/32 (Ilharco et al. 2023).

Run (on a machine with the weights and the datasets, e.g. a Colab TPU/GPU)::

    python -m experiments.clip_benchmark --config experiments/configs/clip_vit_b32.py \
        --weights_dir /content/weights/clip-vit-base-patch32

Weights: the pretrained ``openai/clip-vit-base-patch32`` (a full ``CLIPModel``, whose text
tower builds the zero-shot heads) and the eight finetuned image encoders that FusionBench
publishes (``tanganke/clip-vit-base-patch32_<task>``, ``CLIPVisionModel`` files; Tang et
al., "FusionBench", 2024). Without them the run stops at once and prints, for every missing
directory, the ``huggingface_hub`` command that fetches it on a networked machine.
"""

import ml_collections

# The 8 tasks, in the column order of the literature's tables (Yang et al. 2024,
# AdaMerging, Table 2; TIES).
from taskvec_jax.clip import TASKS

# FusionBench's Hub names for the finetuned ViT-B/32 encoders: the task name lower-cased,
# except Cars ("stanford-cars").
FINETUNED_REPOS = {task: "tanganke/clip-vit-base-patch32_"
                   + {"Cars": "stanford-cars"}.get(task, task.lower()) for task in TASKS}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "ViT-B-32"
    c.weights_dir = "weights/clip-vit-base-patch32"   # <weights_dir>/<name> per checkpoint
    c.pretrained = ml_collections.ConfigDict(
        {"name": "pretrained", "repo_id": "openai/clip-vit-base-patch32"})
    c.tasks = TASKS
    c.finetuned = ml_collections.ConfigDict(
        {task: {"name": task, "repo_id": repo} for task, repo in FINETUNED_REPOS.items()})
    # Optional {task: {"classnames": [...], "templates": [...]}} overriding taskvec_jax.clip's.
    c.prompts = ml_collections.ConfigDict()
    c.head_cache_dir = "results/clip_vit_b32/heads"
    c.results_dir = "results/clip_vit_b32"

    # Merging: every method is evaluated at the alpha (scaling coefficient) that maximizes
    # the average validation accuracy over the tasks (Ilharco et al. 2023, Sec. 3).
    c.methods = ("task_arithmetic", "ties", "dare", "breadcrumbs")
    c.alphas = tuple(round(0.05 * i, 2) for i in range(1, 21))      # 0.05, 0.10, ..., 1.00
    c.validation_split = "validation"
    c.test_split = "test"
    c.eval_microbatch_size = 256   # examples per evaluation call (memory only)

    # The numbers this run is compared with: average absolute test accuracy (%) over the 8
    # tasks, ViT-B/32, as collected by Yang et al. (ICLR 2024, "AdaMerging", Table 2) from
    # Ilharco et al. (2023, task arithmetic) and Yadav et al. (2023, TIES-Merging). Papers
    # differ by a few tenths (zero-shot is quoted as 48.0-48.3): compare to about 1 point.
    c.reference = ml_collections.ConfigDict({
        "source": "Yang et al. 2024 (AdaMerging), Table 2, ViT-B/32, mean over the 8 tasks",
        "zero_shot": 48.0, "finetuned": 90.5, "task_arithmetic": 69.1, "ties": 72.4,
    })
    return c
