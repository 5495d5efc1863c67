"""The prompts of the 8 CLIP tasks: counts, label orders against tfds' metadata, and the
one definition of the class names and normalization that taskvec_jax.data uses too."""

import ast
import os
import re

import pytest

from taskvec_jax import clip
from taskvec_jax.clip import prompts


def test_templates_and_classnames_of_the_eight_tasks():
    # The literature's column order (the benchmark's tables follow it).
    assert prompts.TASKS == ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB",
                             "MNIST", "DTD")
    assert clip.TASKS is prompts.TASKS and clip.CLASSNAMES is prompts.CLASSNAMES
    counts = {"Cars": (196, 8), "DTD": (47, 8), "EuroSAT": (10, 3), "GTSRB": (43, 3),
              "MNIST": (10, 1), "RESISC45": (45, 18), "SUN397": (397, 2), "SVHN": (10, 1)}
    assert set(prompts.TASKS) == set(counts)
    for task, (n_classes, n_templates) in counts.items():
        names, templates = prompts.task_prompts(task)
        assert (len(names), len(templates)) == (n_classes, n_templates), task
        assert len(set(names)) == n_classes, task
        assert all(t.count("{}") == 1 for t in templates), task
    with pytest.raises(ValueError, match="unknown task 'ImageNet'"):
        prompts.task_prompts("ImageNet")


def _tfds_file(*parts):
    import tensorflow_datasets
    return os.path.join(os.path.dirname(tensorflow_datasets.__file__), *parts)


def _tfds_list(path, name):
    src = open(_tfds_file(*path)).read()
    return ast.literal_eval(re.search(rf"{name} = (\[.*?\])", src, re.S).group(1))


def test_classnames_follow_tensorflow_datasets_label_order():
    """Index i of each list names tfds label i (read from the metadata tfds ships)."""
    names = prompts.CLASSNAMES
    assert list(names["Cars"]) == _tfds_list(("image_classification", "cars196.py"), "_NAMES")
    resisc = _tfds_list(("datasets", "resisc45", "resisc45_dataset_builder.py"), "_LABELS")
    assert list(names["RESISC45"]) == [n.replace("_", " ") for n in resisc]
    with open(_tfds_file("image_classification", "dtd_key_attributes.txt")) as f:
        assert list(names["DTD"]) == [line.strip() for line in f if line.strip()]
    with open(_tfds_file("image_classification", "sun397_labels.txt")) as f:
        sun = [re.sub(r"^/[a-z]/", "", line.strip()).replace("/", " ").replace("_", " ")
               for line in f if line.strip()]
    assert list(names["SUN397"]) == sun
    eurosat = _tfds_list(("image_classification", "eurosat.py"), "_LABELS")
    assert eurosat[:3] == ["AnnualCrop", "Forest", "HerbaceousVegetation"]
    assert names["EuroSAT"][:3] == ("annual crop land", "forest", "brushland or shrubland")
    assert eurosat[-1] == "SeaLake" and names["EuroSAT"][-1] == "lake or sea"


def test_data_reads_the_same_gtsrb_names_and_clip_normalization():
    """taskvec_jax.data's GTSRB class names and its "clip" normalization are CLIP's."""
    from taskvec_jax import data
    from taskvec_jax.data import registry

    assert tuple(registry.GTSRB_CLASS_NAMES) == prompts.GTSRB
    assert tuple(data.NORMALIZATIONS["clip"]) == (clip.IMAGE_MEAN, clip.IMAGE_STD)
