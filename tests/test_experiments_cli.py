"""The shared command line of the experiments (experiments/cli.py): configs, overrides,
--quick, errors, and the JSON writer."""

import json
import math

import numpy as np
import pytest

from experiments import cli

REPRODUCE = cli.config_path("reproduce")
THEOREM = cli.config_path("theorem")


def test_quick_overrides_and_workdir():
    args = cli.parse(["--quick", "--workdir", "/tmp/w", "--config.finetune.minibatch_epochs=3",
                      "--config.model.widths=(5, 4)", "--config.data.max_train_examples=10"],
                     default_config=REPRODUCE)
    assert args.config.name == "quick" and args.workdir == "/tmp/w"
    assert args.config.finetune.minibatch_epochs == 3
    assert tuple(args.config.model.widths) == (5, 4)
    assert args.config.data.max_train_examples == 10     # a placeholder(int) entry
    explicit = cli.parse([f"--config={REPRODUCE}:quick"], default_config=THEOREM)
    assert explicit.config.to_dict() == cli.parse(["--quick"], default_config=REPRODUCE
                                                  ).config.to_dict()
    assert cli.parse([], default_config=REPRODUCE).config.name == "default"
    assert cli.parse([f"--config={REPRODUCE}:vision8"], default_config=THEOREM
                     ).config.data.suite == "vision8"
    theorem = cli.parse(["--quick"], default_config=THEOREM, default_workdir="results/t")
    assert theorem.config.examples_per_task == 80 and theorem.workdir == "results/t"


@pytest.mark.parametrize("argv, message", [
    (["--config.finetune.nope=1"], "no entry"),
    (["--bogus"], "bogus"),
    (["--config=/no/such/config.py"], "/no/such/config.py"),
    (["--quick", f"--config={REPRODUCE}:vision8"], "give one of them"),
    (["--config.finetune.minibatch_epochs=many"], "minibatch_epochs"),
    (["stray"], "positional"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.parse(argv, default_config=REPRODUCE)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_json_writer_converts_arrays_and_refuses_non_finite(tmp_path):
    obj = {"a": np.arange(3), "b": {1: np.float32(0.5), "c": (np.int64(2), True)}}
    out = cli.write_json(str(tmp_path / "r.json"), obj)
    assert out == {"a": [0, 1, 2], "b": {"1": 0.5, "c": [2, True]}}
    assert json.loads((tmp_path / "r.json").read_text()) == out
    with pytest.raises(ValueError, match=r"results\['b'\]\['x'\]\[1\]"):
        cli.jsonable({"b": {"x": [1.0, np.nan]}})
    kept = cli.write_json(str(tmp_path / "n.json"), {"x": np.inf}, allow_nan=True)
    assert math.isinf(json.loads((tmp_path / "n.json").read_text())["x"]) and \
        math.isinf(kept["x"])
