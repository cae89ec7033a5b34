"""Every failure a user can act on is one line, exit status 1."""

import errno
import glob
import os
import subprocess
import sys

import pytest

import procs
from conftest import copy_workdir
from distill.core import checkpoint as ckpt
from distill.core import cli, layout
from experiments import stdlib
from teacher import cache_logits, cache_shards, hf, load_teacher

BAD_FLAGS = [  # (argv, what the one line says)
    (
        ["--config=experiments/stdlib.py:tiny", "--config.data.seq_lenn=3"],
        "the config has no key 'seq_lenn'; did you mean 'seq_len'?",
    ),
    (
        ["--config=experiments/stdlib.py:tiny", "--config.data.files=x"],
        "the config has no key 'files' (--config.data.files)",
    ),
    (["--config=experiments/nope.py"], "experiments/nope.py: no such file"),
    (
        ["--config=experiments/stdlib.py:huge"],
        "Unknown variant 'huge' of experiments/stdlib.py",
    ),
    (
        ["--config=experiments/stdlib.py:tiny", "--config.data.seq_len=abc"],
        "--config.data.seq_len=abc: invalid literal for int()",
    ),
    (
        ["--config=experiments/stdlib.py:tiny", "--bogus=1"],
        "Unknown command line flag 'bogus'",
    ),
]

# Parses each argv as a binary does; one process for all (each fails before
# it defines a flag the next one needs).
SCRIPT = """
import contextlib, io, sys
from distill.core import cli
for line in sys.stdin.read().split("\\n\\n"):
  argv = ["binary"] + line.split("\\n")
  sys.argv = list(argv)
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    try:
      cli._parse_flags(list(argv))
      code = 0
    except SystemExit as e:
      code = e.code
  print(code, err.getvalue().strip().replace("\\n", "|"))
"""


def test_bad_configs_and_flags_are_one_line():
  result = subprocess.run(
      [sys.executable, "-c", SCRIPT],
      input="\n\n".join("\n".join(argv) for argv, _ in BAD_FLAGS),
      cwd=procs.REPO,
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [l for l in result.stdout.splitlines() if l[:2] in ("0 ", "1 ")]
  assert len(lines) == len(BAD_FLAGS)
  for line, (argv, said) in zip(lines, BAD_FLAGS):
    code, message = line.split(" ", 1)
    assert code == "1", (argv, message)
    assert message.startswith("error: ") and "|" not in message, message
    assert said in message, (said, message)


def test_a_stage_error_is_one_line_and_verbose_shows_the_traceback(tmp_path):
  workdir = tmp_path / "new" / "w"  # not made: the stage refuses first
  args = ["--config=experiments/stdlib.py:tiny", f"--workdir={workdir}"]
  result = procs.binary("teacher.cache_logits", *args)
  assert result.returncode == 1
  errors = [l for l in result.stderr.splitlines() if l and l[0] not in "WI"]
  assert errors == [
      f"error: No trained teacher in {workdir}/teacher; run `python -m"
      " teacher.train` or `teacher.import_hf` first."
  ]
  assert not os.path.exists(tmp_path / "new")  # no empty folders left
  verbose = procs.binary("teacher.cache_logits", *args, "--verbose")
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_a_damaged_checkpoint_names_its_step_folder(tiny_cached, tmp_path):
  w = copy_workdir(tiny_cached, tmp_path / "w")
  step_dir = os.path.join(layout.teacher_dir(w), ckpt.CHECKPOINT_DIR, "0")
  for root, _, names in os.walk(os.path.join(step_dir, "params")):
    for name in names:
      if name != "commit_success.txt":
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"damaged")
  with pytest.raises(ckpt.ModelFolderError, match=f"checkpoint {step_dir} is"):
    load_teacher(layout.teacher_dir(w))


def test_hf_configs_need_their_fields_and_a_causal_lm():
  base = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "vocab_size": 64}
  with pytest.raises(hf.HFImportError, match="lacks num_hidden_layers"):
    hf.teacher_config_from_hf({"model_type": "qwen3_moe", "vocab_size": 64})
  with pytest.raises(hf.HFImportError, match="not Qwen3MoeForCausalLM"):
    hf.teacher_config_from_hf(
        dict(base, architectures=["Qwen3MoeForSequenceClassification"])
    )
  config = hf.teacher_config_from_hf(
      dict(base, architectures=["Qwen3MoeForCausalLM"])
  )
  assert config.num_layers == 2


def _disk_full(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device", "/w/logits/shard")


def test_a_full_disk_while_caching_leaves_no_temporary(
    tiny_cached, tmp_path, monkeypatch
):
  w = copy_workdir(tiny_cached, tmp_path / "w")
  directory = layout.cache_dir(w)
  os.remove(os.path.join(directory, "shard-00001-of-00003.done.json"))
  monkeypatch.setattr(cache_shards, "encode_batch", _disk_full)
  with pytest.raises(OSError):
    cache_logits.cache_logits(stdlib.get_config("tiny"), w)
  assert not glob.glob(os.path.join(directory, "*.tmp-*"))


def test_a_full_disk_is_one_line(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["binary"])
  with pytest.raises(SystemExit) as stop:
    cli.run(_disk_full)
  assert stop.value.code == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: the disk is full (/w/logits/shard)")
  assert "\n" not in err


def test_a_full_disk_met_by_a_library_thread_is_one_line(monkeypatch, capsys):
  def wrapped(argv):  # as orbax's writer threads report it
    raise ValueError("Error writing ...: [errno 28] No space left on device")

  monkeypatch.setattr(sys, "argv", ["binary"])
  with pytest.raises(SystemExit) as stop:
    cli.run(wrapped)
  assert stop.value.code == 1
  assert capsys.readouterr().err.startswith("error: the disk is full (writing)")
