"""Nothing stale is used: caches know their teacher, their settings and
their own metadata, and every reader checks them."""

import json
import os
import shutil

import pytest

from conftest import copy_workdir, write_random_teacher
from data import cache
from distill import evaluate
from distill import train as distill_train
from distill.core import checkpoint as ckpt
from distill.core import files, layout
from experiments import stdlib
from teacher import cache_logits


def _manifest_path(workdir):
  return os.path.join(layout.cache_dir(workdir), cache.MANIFEST)


def _edit_manifest(workdir, reseal=False, **fields):
  path = _manifest_path(workdir)
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  manifest.update(fields)
  files.write_json(path, cache.seal(manifest) if reseal else manifest)


def test_an_unfinished_teacher_is_not_cached(tiny_prepared, tmp_path):
  w = copy_workdir(tiny_prepared, tmp_path / "w")
  write_random_teacher(w)
  teacher_dir = layout.teacher_dir(w)
  payload = ckpt.read_config(teacher_dir)
  payload["source"] = "teacher.train"  # as a run that was stopped early
  files.write_json(os.path.join(teacher_dir, ckpt.CONFIG_FILE), payload)
  config = stdlib.get_config("tiny")
  with pytest.raises(cache.CacheError, match="has not finished training"):
    cache_logits.cache_logits(config, w)
  assert not os.path.exists(layout.cache_dir(w))
  files.write_json(os.path.join(teacher_dir, "summary.json"), {"steps": 0})
  cache_logits.cache_logits(config, w)  # finished now: its summary says so
  assert cache.read_manifest(layout.cache_dir(w))["num_records"] > 0


def test_a_partial_teacher_is_cached_when_asked(tiny_prepared, tmp_path):
  w = copy_workdir(tiny_prepared, tmp_path / "w")
  write_random_teacher(w)
  payload = ckpt.read_config(layout.teacher_dir(w))
  payload["source"] = "teacher.train"
  files.write_json(
      os.path.join(layout.teacher_dir(w), ckpt.CONFIG_FILE), payload
  )
  cache_logits.cache_logits(
      stdlib.get_config("tiny"), w, allow_partial_teacher=True
  )
  assert cache.read_manifest(layout.cache_dir(w))["num_records"] > 0


def test_a_cache_of_another_teacher_is_refused(tiny_cached, tmp_path):
  w = copy_workdir(tiny_cached, tmp_path / "w")
  config = stdlib.get_config("tiny")
  shutil.rmtree(layout.teacher_dir(w))
  teacher = write_random_teacher(w, final_norm_scale=2.0)  # retrained, say
  assert (
      ckpt.fingerprint(teacher)
      != cache.read_manifest(layout.cache_dir(w))["teacher_fingerprint"]
  )
  with pytest.raises(cache.CacheError, match="another teacher"):
    distill_train.train_run(config, w, "sampled")
  assert not os.path.exists(layout.student_dir(w, "sampled"))  # no leftover
  # evaluate checks its inputs before any long measurement.
  with pytest.raises(cache.CacheError, match="another teacher"):
    evaluate.evaluate(config, w)
  assert not os.path.exists(layout.eval_dir(w))


def test_an_edited_manifest_is_refused_by_every_reader(tiny_cached, tmp_path):
  w = copy_workdir(tiny_cached, tmp_path / "w")
  _edit_manifest(w, temperature=3.0)  # not sealed: tampered or damaged
  for read in (
      lambda: cache.read_manifest(layout.cache_dir(w)),
      lambda: cache.verify(layout.cache_dir(w)),
      lambda: distill_train.train_run(stdlib.get_config("tiny"), w, "sampled"),
  ):
    with pytest.raises(cache.CacheError, match="changed after it was written"):
      read()
  with open(_manifest_path(w), "w", encoding="utf-8") as f:
    f.write("{not json")
  with pytest.raises(cache.CacheError, match="manifest.json is not valid JSON"):
    cache.read_manifest(layout.cache_dir(w))


@pytest.mark.parametrize(
    "run,key,value,field",
    [
        ("topk_ghost", "k", 4, "k"),
        ("sampled", "num_samples", 8, "num_samples"),
        ("sampled", "temperature", 2.0, "temperature"),
    ],
)
def test_config_values_must_match_the_cache(
    tiny_cached, tmp_path, run, key, value, field
):
  w = copy_workdir(tiny_cached, tmp_path / "w")
  config = stdlib.get_config("tiny")
  config.cache[key] = value
  with pytest.raises(cache.CacheError, match=f"{field} is .* in the cache but"):
    distill_train.train_run(config, w, run)


def test_the_cache_stage_rewrites_a_truncated_complete_shard(
    tiny_cached, tmp_path, capsys
):
  w = copy_workdir(tiny_cached, tmp_path / "w")
  directory = layout.cache_dir(w)
  before = cache.read_manifest(directory)
  name = before["shards"][1]["name"]
  path = os.path.join(directory, name)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  capsys.readouterr()
  cache_logits.cache_logits(stdlib.get_config("tiny"), w)
  assert f"{name} is" in capsys.readouterr().out
  after = cache.read_manifest(directory)
  assert [s["sha256"] for s in after["shards"]] == [
      s["sha256"] for s in before["shards"]
  ]
  cache.verify(directory)
