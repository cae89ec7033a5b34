"""The main job on the tiny config: stages run in order and are skipped when done."""

import os

import pytest

from experiments import run, stdlib


def test_tiny_run_prepares_and_reruns_as_a_no_op(tmp_path, capsys):
  config = stdlib.get_config("tiny")
  ran = run.run_all(config, str(tmp_path), only=["prepare"])
  assert ran == ["prepare"]
  assert os.path.isfile(tmp_path / "tokenizer.json")
  assert os.path.isfile(tmp_path / "data" / "tokens" / "train" / "tokens.npy")
  capsys.readouterr()
  run.run_all(config, str(tmp_path), only=["prepare"])
  assert "nothing to do" in capsys.readouterr().out


def test_unknown_stage_is_refused(tmp_path):
  with pytest.raises(run.cli.UserError, match="Unknown stage"):
    run.run_all(stdlib.get_config("tiny"), str(tmp_path), only=["teach"])


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="Unknown variant"):
    stdlib.get_config("huge")
