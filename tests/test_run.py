"""The main job: every stage in order, skipped when done; the tiny run end to end."""

import json
import os
import re

import pytest

from distill.core import checkpoint as ckpt
from distill.training import loop as trainer
import procs
from conftest import copy_workdir
from distill.train import run_folder
from student import load_student
from experiments import run, stdlib

RUNS = (
    "ce",
    "sampled",
    "topk_ghost",
    "topk_sparse",
    "topk_tail",
    "online",
    "sampled_qint8",  # quantisation-aware
    "on_policy_fromsampled",  # continuations of sampled: on its own text
    "sampled_fromsampled",  # ... and the control, on the cache
)
CONTINUATIONS = ("on_policy_fromsampled", "sampled_fromsampled")
MODEL_FIELDS = (
    "path",
    "step",
    "loss",
    "bits_per_byte",
    "perplexity",
    "ece",
    "tokens",
    "params",
    "kv_cache_bytes_per_token",
    "decode",
    "continuations",
)
STUDENT_FIELDS = ("mode", "kl_to_teacher", "top1_agreement", "speculative")
SPEC_FIELDS = (
    "gamma",
    "prompts",
    "acceptance_rate",
    "tokens_per_teacher_call",
    "teacher_wall_s",
    "speculative_wall_s",
    "speedup",
    "matches_teacher",
)


@pytest.fixture(scope="module")
def tiny_run(tiny_prepared, tmp_path_factory):
  """The whole main job on the tiny config, as a user starts it: the
  ``experiments.run`` binary, on one CPU device (a laptop's), from a copy of
  the shared prepared data (its prepare stage finds it done and says so).
  Each stage on a mesh of the suite's 8 devices is checked by its own tests
  (test_sharding, test_cache, test_on_policy) and end to end, as several
  processes, by test_distributed (slow)."""
  workdir = copy_workdir(tiny_prepared, tmp_path_factory.mktemp("kd") / "w")
  config = stdlib.get_config("tiny")
  # the comparison the issue asks for
  assert tuple(run_folder(r) for r in config.distill.runs) == RUNS
  proc = procs.binary(
      "experiments.run",
      "--config=experiments/stdlib.py:tiny",
      f"--workdir={workdir}",
      timeout=1200,
      env=procs.device_env(1),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "prepare: already done" in proc.stdout
  ran = re.findall(r"^run: stage (\w+) done in", proc.stdout, re.M)
  return workdir, config, ran


def ran_summary(workdir, name):
  with open(os.path.join(workdir, "student", name, "summary.json")) as f:
    return json.load(f)


def test_tiny_run_writes_every_stage(tiny_run):
  workdir, config, ran = tiny_run
  assert ran == [name for name, _ in run.STAGES]
  sampled_fingerprint = ckpt.fingerprint(
      load_student(os.path.join(workdir, "student", "sampled"))
  )
  for path in (
      "tokenizer.json",
      "data/tokens/train/manifest.json",
      "teacher/config.json",
      "teacher/summary.json",
      "logits/manifest.json",
      "eval/report.json",
      "eval/report.md",
  ):
    assert os.path.isfile(os.path.join(workdir, path)), path
  for name in RUNS:
    assert os.path.isfile(
        os.path.join(workdir, "student", name, "summary.json")
    )
    records = [
        r
        for r in trainer.read_metrics(os.path.join(workdir, "student", name))
        if "loss" in r
    ]
    if name in CONTINUATIONS:  # they start where sampled ended
      with open(os.path.join(workdir, "student", name, "config.json")) as f:
        init = json.load(f)["settings"]["init_from"]
      assert init["path"] == os.path.join(workdir, "student", "sampled")
      assert init["fingerprint"] == sampled_fingerprint
      assert init["step"] == config.distill.train.steps
      summary = ran_summary(workdir, name)
      assert summary["steps"] == config.distill.continue_train.steps
      assert ("on_policy" in summary) == (name == "on_policy_fromsampled")
      assert summary.get("on_policy", 1.0) == 1.0  # every step on-policy
    else:
      assert records[-1]["loss"] < records[0]["loss"], name  # every run learns
    assert os.path.isfile(os.path.join(workdir, "export", name, "config.json"))
    hf = os.path.join(workdir, "export", f"{name}-hf", "model.safetensors")
    # A quantisation-aware run exports quantised, orbax only.
    assert os.path.isfile(hf) == (name != "sampled_qint8"), name
  exported = load_student(os.path.join(workdir, "export", "sampled_qint8"))
  assert exported.quantization == "int8_projections"


def test_report_has_every_field_and_plots(tiny_run):
  workdir, config, _ = tiny_run
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  models = report["models"]
  best = report["summary"]["best_distilled"]
  ptq = f"{best}-int8"  # the post-training quantised best student
  # ... and the QAT run's float twin quantised the same way, beside it.
  twin = "sampled-int8_projections"  # quantised as the QAT run is
  assert set(models) == {"teacher", *RUNS, ptq, twin}
  assert models[twin]["parent"] == "sampled"
  assert models[twin]["quantization"] == "int8_projections"
  assert models[ptq]["parent"] == best and models[ptq]["quantization"] == "int8"
  assert models["sampled_qint8"]["quantization"] == "int8_projections"
  assert models[ptq]["weight_bytes"] < 0.4 * models[best]["weight_bytes"]
  assert (
      models["sampled_qint8"]["weight_bytes"]
      < 0.8 * models["sampled"]["weight_bytes"]
  )
  for name, entry in models.items():
    for field in MODEL_FIELDS:
      assert field in entry, (name, field)
    assert entry["loss"] > 0 and 0 <= entry["ece"] <= 1
    assert set(entry["kv_cache_bytes_per_token"]) == {
        "1024",
        "8192",
        "32768",
        "131072",
    }
    for b in config.eval.speed.batch_sizes:
      speed = entry["decode"][f"batch_{b}"]
      assert (
          speed["decode_tokens_per_s"] > 0 and speed["prefill_tokens_per_s"] > 0
      )
    own = entry["continuations"]  # the teacher's view of the model's text
    co = config.eval.continuations
    # As many prompts as validation has documents that long, at most asked.
    assert own["tokens"] in range(co.new_tokens, co.prompts * co.new_tokens + 1)
    assert own["tokens"] % co.new_tokens == 0
    for key in ("teacher_loglik_greedy", "teacher_loglik_sampled"):
      assert -20 < own[key] < 0, (name, key)
    if name == "teacher":
      assert "kl_to_teacher" not in entry
      continue
    for field in STUDENT_FIELDS:
      assert field in entry, (name, field)
    assert entry["kl_to_teacher"] >= 0 and 0 <= entry["top1_agreement"] <= 1
    (figures,) = entry["speculative"]
    assert set(SPEC_FIELDS) <= set(figures)
    assert figures["matches_teacher"] is True  # greedy: the teacher's output
  summary = report["summary"]
  # A float student trained from scratch, like the baseline.
  assert summary["best_distilled"] in RUNS[1:6]
  best = models[summary["best_distilled"]]
  assert summary["distill_gain"] == pytest.approx(
      models["ce"]["loss"] - best["loss"]
  )
  assert summary["teacher_gain"] == pytest.approx(
      models["ce"]["loss"] - models["teacher"]["loss"]
  )
  assert summary["decode_speedup_b1"] > 0
  cache = report["cache"]
  assert (
      cache["sample_bytes_per_token"] > 0 and cache["topk_bytes_per_token"] > 0
  )
  assert report["plots"] == [
      "validation_loss.png",
      "quality_vs_speed.png",
      "quality_vs_weight_bytes.png",
      "quality_per_byte.png",
  ]
  assert cache["topk_tail_bytes_per_token"] > 0
  figures = cache["targets"]
  assert figures["teacher_entropy"] > 0
  for method in ("sample", "topk", "topk_tail"):
    assert figures[f"{method}_kl"] >= 0
    assert 0 <= figures[f"{method}_missing"] <= 1
  for name in ("sampled", "topk_ghost", "topk_sparse", "topk_tail"):
    method = models[name]["target"]
    assert (
        models[name]["cache_bytes_per_token"]
        == cache[f"{method}_bytes_per_token"]
    )
  for plot in report["plots"]:
    with open(os.path.join(workdir, "eval", plot), "rb") as f:
      head = f.read()
    assert head.startswith(b"\x89PNG") and len(head) > 5000, plot
  with open(os.path.join(workdir, "eval", "report.md")) as f:
    text = f.read()
  for heading in (
      "## Quality",
      "## Distillation against the CE baseline",
      "## KV cache",
      "## Speed",
      "## Speculative decoding",
      "## Logit cache",
  ):
    assert heading in text, heading
  for name in RUNS:
    assert f"| {name} |" in text
  # The validation plot's training-time curves are another sample than the
  # tables': report.md says so under the plot.
  assert "not its table figure" in text.split("![validation_loss.png]")[1]


def test_rerun_skips_every_finished_stage(tiny_run, capsys):
  workdir, config, _ = tiny_run
  report = os.path.join(workdir, "eval", "report.json")
  before = os.path.getmtime(report)
  capsys.readouterr()
  run.run_all(config, workdir)
  out = capsys.readouterr().out
  assert "prepare: " in out and "nothing to do" in out
  assert "report is up to date" in out
  assert os.path.getmtime(report) == before


def test_unknown_stage_is_refused(tmp_path):
  with pytest.raises(run.cli.UserError, match="Unknown stage"):
    run.run_all(stdlib.get_config("tiny"), str(tmp_path), only=["teach"])


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="Unknown variant"):
    stdlib.get_config("huge")
