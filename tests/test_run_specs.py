"""Runs given by their parts, and the smaller targets they read."""

import numpy as np
import pytest

from data import cache
from distill import evaluate, runs
from distill import train as distill_train
from distill.core.errors import UserError
from experiments import stdlib


def test_presets_and_parts():
  kind = distill_train.run_kind
  assert kind("sampled") == distill_train.RUN_KINDS["sampled"]
  assert kind("sampled@n=16") == distill_train.RunKind(
      "offline", "sample", "sampled_kl", n=16
  )
  assert kind("topk_sparse@k=8").k == 8
  assert kind("topk_tail@m=16").m == 16
  assert kind("mode=offline,target=topk,loss=ghost_kl,k=4") == (
      distill_train.RunKind("offline", "topk", "ghost_kl", k=4)
  )
  assert distill_train.run_folder("topk_tail@m=16") == "topk_tail_m16"
  qat = kind("sampled@q=int8")
  assert qat.q == "int8" and qat.settings()["q"] == "int8"
  assert distill_train.run_folder("sampled@q=int8") == "sampled_qint8"
  assert distill_train.run_folder("sampled") == "sampled"
  op = kind("on_policy@from=sampled,lam=0.25")
  assert (op.mode, op.target, op.loss, op.init, op.lam) == (
      "on_policy", "sample", "sampled_kl", "sampled", 0.25
  )  # fmt: skip
  assert distill_train.run_folder("on_policy@from=sampled") == (
      "on_policy_fromsampled"
  )
  assert kind("mode=on_policy,lam=1").target is None
  assert kind("online@feat=mse").feat == "mse"
  long = kind("ce@seq=1024,from=ce_seq128,rope=8")
  assert (long.seq, long.init, long.rope) == (1024, "ce_seq128", 8.0)
  assert distill_train.run_folder("online@seq=1024") == "online_seq1024"
  # Unset sizes stay out of a run's recorded settings (old folders match).
  assert distill_train.RUN_KINDS["sampled"].settings() == {
      "mode": "offline",
      "target": "sample",
      "loss": "sampled_kl",
  }


@pytest.mark.parametrize(
    "spec",
    [
        "sampled",
        "sampled@n=16",
        "sampled@q=int4,from=sampled",
        "on_policy@from=sampled,lam=0.25",
        "mode=offline,target=topk,loss=ghost_kl,k=4",
    ],
)
def test_a_spec_is_written_back_as_it_was_parsed(spec):
  preset, parts = runs.parse_spec(spec)
  assert runs.write_spec(preset, parts) == spec
  assert runs.run_kind(runs.write_spec(preset, parts)) == runs.run_kind(spec)


def test_leaving_out_a_part_keeps_the_rest_in_order():
  assert runs.without_part("sampled@q=int4,from=sampled", "q") == (
      "sampled@from=sampled"
  )
  assert runs.without_part("sampled@q=int8", "q") == "sampled"
  assert runs.without_part("sampled", "q") == "sampled"
  assert runs.parse_spec("mode=ce") == (None, {"mode": "ce"})
  twin = lambda spec: evaluate.float_twin(
      {"settings": {"run": spec, "q": runs.run_kind(spec).q}}
  )
  assert twin("sampled@q=int4,from=sampled") == "sampled_fromsampled"
  assert twin("topk_tail@m=16,q=int8") == "topk_tail_m16"
  assert twin("sampled") is None


@pytest.mark.parametrize(
    "spec,why",
    [
        ("sampld", "Unknown distillation run 'sampld'"),
        ("sampled@k=8", "k sizes a topk target, not sample"),
        ("sampled@n=0", "n='0' must be an integer >= 1"),
        ("sampled@n", "'n' is not key=value"),
        ("topk_ghost@loss=sampled_kl", "does not fit target='topk'"),
        ("ce@n=4", "learns from labels only"),
        ("online@k=4", "online run reads no cache"),
        ("target=topk,loss=ghost_kl", "give its mode"),
        ("sampled@q=int3", "q='int3'; use one of"),
        ("on_policy@lam=1.5", "lam='1.5' must be a number in"),
        ("on_policy@lam=x", "lam='x' must be a number in"),
        ("sampled@lam=0.5", "it needs mode=on_policy"),
        ("sampled@feat=cosine", "feat .* needs mode=online"),
        ("online@feat=l1", "feat='l1'; use cosine or mse"),
        ("sampled@from=../x", "must name a run folder under"),
        ("ce@seq=1", "seq='1' must be an integer >= 2"),
        ("ce@seq=x", "seq='x' must be an integer >= 2"),
        ("ce@rope=0.5", "rope='0.5' must be a number >= 1"),
        ("ce@rope=nan", "rope='nan' must be a number >= 1"),
        ("mode=on_policy,loss=sampled_kl", "without a cached target"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, why):
  with pytest.raises(UserError, match=why):
    distill_train.run_kind(spec)


def test_thinning_keeps_n_draws_at_the_stored_frequencies():
  ids = np.array([[3, 5, 9, 0], [1, 2, 0, 0]])
  counts = np.array([[2, 1, 5, 0], [4, 4, 0, 0]])
  rng = np.random.default_rng(0)
  total = np.zeros((2, 10))
  for _ in range(3000):
    kept_ids, kept = cache.thin_sample(ids, counts, 3, rng)
    assert (kept.sum(-1) == 3).all() and kept_ids.shape == (2, 3)
    for t in range(2):
      np.add.at(total[t], kept_ids[t], kept[t])
  want = np.zeros((2, 10))
  for t in range(2):
    np.add.at(want[t], ids[t], 3 * counts[t] / counts[t].sum())
  np.testing.assert_allclose(total / 3000, want, atol=0.05)
  with pytest.raises(cache.CacheError, match="cannot keep 9 of 8"):
    cache.thin_sample(ids, counts, 9, rng)


def test_top_k_prefix_moves_the_rest_into_the_tail():
  lp = np.log(np.array([[0.5, 0.2, 0.1, 0.05]], np.float32))
  out = {
      "ids": np.array([[7, 3, 1, 4]]),
      "log_probs": lp,
      "tail": np.array([0.15], np.float32),
  }
  view = cache.TargetView(k=2)
  got = view.apply(0, dict(out), "topk")
  np.testing.assert_array_equal(got["ids"], [[7, 3]])
  np.testing.assert_allclose(got["tail"], [0.30], atol=1e-6)
  # The same record always reads the same thinned draws.
  sample = {"ids": np.array([[1, 2, 0]]), "counts": np.array([[3, 5, 0]])}
  a = cache.TargetView(n=4, seed=1).apply(5, dict(sample), "sample")
  b = cache.TargetView(n=4, seed=1).apply(5, dict(sample), "sample")
  np.testing.assert_array_equal(a["counts"], b["counts"])


def test_sweep_variant_reads_one_cache_at_every_size():
  config = stdlib.get_config("sweep")
  default = stdlib.get_config()
  assert config.cache.to_dict() == default.cache.to_dict()  # one cache
  runs = config.distill.runs
  folders = {distill_train.run_folder(r) for r in runs}
  assert len(folders) == len(runs) == 18
  # The default's float runs from scratch, reused (its quantisation-aware
  # run and its continuations of the sampled student are not about targets).
  assert {
      r for r in default.distill.runs if "q=" not in r and "from=" not in r
  } <= set(runs)
  for run in runs:
    kind = distill_train.run_kind(run)
    for key, target in distill_train.SIZES.items():
      size = getattr(kind, key)
      cached = {"k": "k", "n": "num_samples", "m": "tail_samples"}[key]
      assert size is None or size < config.cache[cached]
      assert size is None or kind.target == target
