"""On-policy distillation: its batches, its losses against a dense reference,
lambda mixing, starting from a student, and the frozen teacher."""

import dataclasses
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import teacher as teacher_lib
from conftest import copy_workdir
from distill import losses, on_policy, run_data
from distill import train as distill_train
from distill.core import checkpoint as ckpt
from distill.core import layout
from distill.core.errors import UserError
from distill.decoding import generate as gen
from distill.runs import RunKind
from distill.training import loop as trainer
from experiments import stdlib
from student import load_student
from student.config import get_preset
from student.model import Student

V = 48
L = 12  # tokens per row: inputs and labels of 11


@pytest.fixture(scope="module")
def teacher():
  # One MoE layer: the teacher only scores here (and compiles faster).
  return teacher_lib.Teacher(
      teacher_lib.get_preset("tiny", vocab_size=V, num_layers=1), nnx.Rngs(1)
  )


def _student(seed=5):
  return Student(get_preset("tiny", vocab_size=V), nnx.Rngs(seed))


def _rows(seed=0, batch=3):
  tokens = np.random.default_rng(seed).integers(1, V, (batch, L))
  return {
      "tokens": jnp.asarray(tokens, jnp.int32),
      "segment_ids": jnp.ones((batch, L), jnp.int32),
      "positions": jnp.tile(jnp.arange(L, dtype=jnp.int32), (batch, 1)),
  }


def test_batch_is_prompt_then_the_students_own_continuation():
  student = _student()
  rows = _rows()
  cfg = on_policy.OnPolicyConfig(prompt_len=4, temperature=1.0)
  batch = on_policy.make_batch(student, rows, 7, cfg, seed=3)
  tokens = np.asarray(batch["tokens"])
  assert tokens.shape == rows["tokens"].shape
  np.testing.assert_array_equal(
      tokens[:, :4], np.asarray(rows["tokens"])[:, :4]
  )
  # What the compiled sampler the run uses would write for these prompts.
  expected = gen.generate(
      student,
      np.asarray(rows["tokens"])[:, :4],
      L - 4,
      temperature=1.0,
      key=jax.random.fold_in(jax.random.key(3), 7),
  )
  np.testing.assert_array_equal(tokens[:, 4:], np.asarray(expected))
  assert not np.array_equal(tokens[:, 4:], np.asarray(rows["tokens"])[:, 4:])
  # Labels 3.. (tokens 4..) are generated: exactly those positions count.
  mask = np.asarray(batch[on_policy.MASK])
  assert mask.shape == (3, L - 1)
  assert not mask[:, :3].any() and mask[:, 3:].all()
  np.testing.assert_array_equal(batch["positions"][0], np.arange(L))


def _reference(student, teacher, tokens, mask, kind, beta):
  """The divergence written out over the full vocabulary, no chunking."""
  s = jax.nn.log_softmax(student(tokens[:, :-1]), axis=-1)
  t = jax.nn.log_softmax(teacher(tokens[:, :-1]), axis=-1)
  p, q = jnp.exp(t), jnp.exp(s)
  if kind == "forward":
    per = jnp.sum(p * (t - s), -1)
  elif kind == "reverse":
    per = jnp.sum(q * (s - t), -1)
  else:
    m = beta * p + (1 - beta) * q
    per = (
        beta * jnp.sum(p * (t - jnp.log(m)), -1)
        + (1 - beta) * jnp.sum(q * (s - jnp.log(m)), -1)
    ) / (beta * (1 - beta))
  return jnp.sum(per * mask) / jnp.sum(mask)


@pytest.mark.parametrize(
    "kind,beta",
    [("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("forward", 0.5)],
)
def test_loss_and_gradient_on_generated_tokens_match_dense_reference(
    teacher, kind, beta
):
  student = _student()
  cfg = on_policy.OnPolicyConfig(prompt_len=4, divergence=kind, beta=beta)
  batch = on_policy.make_batch(student, _rows(1), 0, cfg, seed=0)
  config = stdlib.get_config("tiny")
  loss_fn = distill_train.loss_fn_for(
      RunKind("on_policy"), config.distill, on_policy_cfg=cfg
  )
  (loss, metrics), grads = nnx.value_and_grad(
      lambda m: loss_fn(m, batch, 0, teacher), has_aux=True
  )(student)
  assert float(metrics["on_policy"]) == 1.0
  mask = batch[on_policy.MASK].astype(jnp.float32)
  ref, ref_grads = nnx.value_and_grad(
      lambda m: _reference(m, teacher, batch["tokens"], mask, kind, beta)
  )(student)
  np.testing.assert_allclose(float(loss), float(ref), rtol=2e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-6)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def _collapsed(logits, ids, log_probs, tail):
  """Teacher and student over the K stored ids plus one class for the rest,
  built by summing probabilities (the ghost-class reference)."""
  q = jax.nn.softmax(logits, -1)
  onehot = jax.nn.one_hot(ids, logits.shape[-1])  # [..., K, V]
  q_head = jnp.einsum("...kv,...v->...k", onehot, q)
  q_all = jnp.concatenate([q_head, 1 - q_head.sum(-1, keepdims=True)], -1)
  p_all = jnp.concatenate([jnp.exp(log_probs), tail[..., None]], -1)
  return p_all, q_all


@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("jsd", 0.3)])
def test_topk_divergences_match_the_collapsed_distributions(kind, beta):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 3, 20)) * 2, jnp.float32)
  t_logits = jnp.asarray(rng.normal(size=(2, 3, 20)) * 3, jnp.float32)
  log_p = jax.nn.log_softmax(t_logits, -1)
  order = jnp.argsort(-log_p, -1)[..., :5]
  log_probs = jnp.take_along_axis(log_p, order, -1)
  tail = 1 - jnp.exp(log_probs).sum(-1)

  def ours(z):
    return losses.ghost_kd_per_token(
        z, order, log_probs, tail, 1.0, kind, beta
    ).sum()

  def reference(z):
    p, q = _collapsed(z, order, log_probs, tail)
    if kind == "reverse":
      return jnp.sum(q * (jnp.log(q) - jnp.log(p)))
    m = beta * p + (1 - beta) * q
    jsd = beta * jnp.sum(p * jnp.log(p / m)) + (1 - beta) * jnp.sum(
        q * jnp.log(q / m)
    )
    return jsd / (beta * (1 - beta))

  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-5)
  np.testing.assert_allclose(
      jax.grad(ours)(logits), jax.grad(reference)(logits), atol=1e-5
  )
  # 'forward' is the ghost KL.
  np.testing.assert_allclose(
      losses.ghost_kd_per_token(logits, order, log_probs, tail),
      losses.ghost_kl_per_token(logits, order, log_probs, tail),
  )


def test_lam_picks_that_share_of_steps_reproducibly():
  picks = [on_policy.on_policy_step(0.3, 0, s) for s in range(2000)]
  assert 0.26 < np.mean(picks) < 0.34
  assert picks == [on_policy.on_policy_step(0.3, 0, s) for s in range(2000)]
  assert not any(on_policy.on_policy_step(0.0, 0, s) for s in range(100))
  assert all(on_policy.on_policy_step(1.0, 0, s) for s in range(100))


def test_teacher_stays_frozen_and_the_student_learns(teacher, tmp_path):
  student = _student()
  before_t = jax.tree.map(np.array, nnx.state(teacher, nnx.Param))
  before_s = jax.tree.map(np.array, nnx.state(student, nnx.Param))
  cfg = on_policy.OnPolicyConfig(prompt_len=4, divergence="reverse")
  config = stdlib.get_config("tiny")
  loop = trainer.LoopConfig(steps=4, warmup_steps=1, log_every=1)

  rows = {k: np.asarray(v) for k, v in _rows(2, batch=4).items()}

  def iterator():  # the same rows every step, as grain would give them
    return iter(grain.MapDataset.source([rows]).repeat())

  out_dir = str(tmp_path / "run")
  ckpt.write_config(out_dir, "student", student.config)
  result = trainer.train(
      out_dir=out_dir,
      model=student,
      loss_fn=distill_train.loss_fn_for(
          RunKind("on_policy"), config.distill, on_policy_cfg=cfg
      ),
      make_iterator=iterator,
      cfg=loop,
      frozen=(teacher,),
      prepare=on_policy.prepare_fn(cfg, 0),
      best_metric=None,
  )
  assert result.last_metrics["on_policy"] == 1.0
  after_t = nnx.state(teacher, nnx.Param)
  for a, b in zip(jax.tree.leaves(before_t), jax.tree.leaves(after_t)):
    np.testing.assert_array_equal(a, np.asarray(b))  # bit for bit
  changed = [
      not np.array_equal(a, np.asarray(b))
      for a, b in zip(
          jax.tree.leaves(before_s),
          jax.tree.leaves(nnx.state(student, nnx.Param)),
      )
  ]
  assert all(changed)


# ------------------------------------------------------- runs in a workdir


@pytest.fixture(scope="module")
def trained(tiny_cached, tmp_path_factory):
  """A copy of the tiny cached workdir with the sampled run trained."""
  workdir = copy_workdir(tiny_cached, tmp_path_factory.mktemp("op") / "w")
  config = stdlib.get_config("tiny")
  distill_train.train_run(config, workdir, "sampled")
  return workdir


def _params(workdir, folder):
  model = load_student(layout.student_dir(workdir, folder))
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_lam_zero_is_the_offline_run_step_for_step(trained):
  config = stdlib.get_config("tiny")
  distill_train.train_run(config, trained, "on_policy@lam=0")
  ours = trainer.read_metrics(layout.student_dir(trained, "on_policy_lam0"))
  theirs = trainer.read_metrics(layout.student_dir(trained, "sampled"))
  losses_of = lambda records: [r["loss"] for r in records if "loss" in r]
  assert losses_of(ours) == losses_of(theirs) and len(losses_of(ours)) > 1
  assert all(r["on_policy"] == 0.0 for r in ours if "on_policy" in r)
  for a, b in zip(
      _params(trained, "on_policy_lam0"), _params(trained, "sampled")
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_starts_from_any_student_folder(trained):
  """``--init_from``: at a learning rate of 0 the run ends where it started,
  on the source's parameters, bit for bit. (A run that names its source,
  ``from=sampled``, is trained and checked by the tiny main job,
  tests/test_run.py.)"""
  config = stdlib.get_config("tiny")
  config.distill.continue_train.learning_rate = 0.0
  cont = distill_train.train_run(
      config,
      trained,
      "ce",
      init_from=layout.student_dir(trained, "sampled"),
  )
  assert cont["steps"] == config.distill.continue_train.steps
  payload = ckpt.read_config(layout.student_dir(trained, "ce"))
  source = load_student(layout.student_dir(trained, "sampled"))
  assert payload["settings"]["init_from"]["fingerprint"] == (
      ckpt.fingerprint(source)
  )
  for a, b in zip(_params(trained, "ce"), _params(trained, "sampled")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unfinished_or_missing_source_is_refused(trained):
  config = stdlib.get_config("tiny")
  config.distill.runs = ("on_policy@from=topk_ghost", "topk_ghost")
  with pytest.raises(UserError, match="list the run of folder 'topk_ghost'"):
    distill_train.train_all(config, trained)
  with pytest.raises(UserError, match="has not finished training"):
    distill_train.train_run(config, trained, "sampled@from=online")
  with pytest.raises(UserError, match="do not give --init_from"):
    distill_train.train_run(
        config, trained, "sampled@from=sampled", init_from="/elsewhere"
    )
  config.distill.on_policy.prompt_len = config.data.seq_len
  with pytest.raises(UserError, match="prompt_len"):
    distill_train.train_run(config, trained, "on_policy")
  deeper = stdlib.get_config("tiny")
  deeper.student.model.num_layers = 3
  with pytest.raises(UserError, match="of another architecture"):
    distill_train.train_run(deeper, trained, "sampled@n=4,from=sampled")
  assert not os.path.exists(
      layout.student_dir(trained, "sampled_n4_fromsampled")
  )


def test_on_policy_without_a_cached_target_needs_lam_one(trained):
  config = stdlib.get_config("tiny")
  with pytest.raises(UserError, match="no cached target"):
    distill_train.train_run(config, trained, "mode=on_policy,lam=0.5")


def test_feature_projections_train_but_stay_out_of_the_student(trained):
  config = stdlib.get_config("tiny")
  config.distill.train.update(dict(steps=4, checkpoint_every=2, eval_every=4))
  run = "online@feat=cosine"
  summary = distill_train.train_run(config, trained, run)
  assert 0 < summary["feature_loss"] < 2
  folder = layout.student_dir(trained, "online_featcosine")
  step_dir = os.path.join(folder, ckpt.CHECKPOINT_DIR, "4")
  assert os.path.isdir(os.path.join(step_dir, trainer.EXTRAS))
  # The student loads alone, from the run, its best/ and an export.
  plain = Student.abstract(load_student(folder).config)
  want = jax.tree.structure(nnx.state(plain, nnx.Param))
  for path in (folder, os.path.join(folder, trainer.BEST_DIR)):
    got = nnx.state(load_student(path), nnx.Param)
    assert jax.tree.structure(got) == want
  from student import export  # pylint: disable=import-outside-toplevel

  for fmt in ("orbax", "hf"):
    out = export.export(trained, "online_featcosine", fmt=fmt)
    exported = nnx.state(load_student(out), nnx.Param)
    assert jax.tree.structure(exported) == want
  with open(os.path.join(folder, ckpt.CONFIG_FILE)) as f:
    settings = json.load(f)["settings"]
  assert settings["feat"] == "cosine" and "features" in settings["distill"]
  # Resumed from step 2, the run ends where it did: the projections were
  # restored with the rest (their gradient reaches the student).
  before = _params(trained, "online_featcosine")
  shutil.rmtree(step_dir)
  os.remove(os.path.join(folder, trainer.SUMMARY_FILE))
  assert distill_train.train_run(config, trained, run)["steps"] == 4
  for a, b in zip(before, _params(trained, "online_featcosine")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decoder_returns_the_blocks_it_is_asked_for():
  student = _student()
  rows = _rows()
  hidden, aux = student.hidden(rows["tokens"], features=(0, -1))
  first, last = aux["features"]
  np.testing.assert_allclose(student.final_norm(last), hidden, rtol=1e-6)
  scanned = dataclasses.replace(student.config, scan_layers=True)
  other = Student(scanned, nnx.Rngs(5))
  _, other_aux = other.hidden(rows["tokens"], features=(0, -1))
  np.testing.assert_allclose(other_aux["features"][0], first, atol=1e-5)
  assert first.shape == hidden.shape


def test_short_rows_then_a_long_row_continuation_with_rope_scaling(trained):
  """``seq``: a run on rows of half the length, as many as keep the tokens
  per step; ``from`` + ``rope``: its continuation on the config's rows with
  the global layers' RoPE scaled (the same parameters at a learning rate of
  0, the factor in the model config and its HF export); a run that reads
  the cache cannot change the rows."""
  config = stdlib.get_config("tiny")
  data = config.data
  half = data.seq_len // 2
  kind = distill_train.run_kind(f"ce@seq={half}")
  assert run_data.rows_of(config, kind) == (half, 2 * data.batch_size)
  make_iterator, _ = run_data.batches(
      config, trained, f"ce@seq={half}", kind, None, 512
  )
  assert next(make_iterator())["tokens"].shape == (
      2 * data.batch_size,
      half + 1,
  )
  config.distill.train.update(dict(steps=2, checkpoint_every=2, eval_every=2))
  distill_train.train_run(config, trained, f"ce@seq={half}")
  config.distill.continue_train.learning_rate = 0.0
  run = f"ce@from=ce_seq{half},rope=2"
  distill_train.train_run(config, trained, run)
  folder = layout.student_dir(trained, f"ce_fromce_seq{half}_rope2")
  assert load_student(folder).config.rope_global_scaling == 2.0
  for a, b in zip(
      _params(trained, f"ce_fromce_seq{half}_rope2"),
      _params(trained, f"ce_seq{half}"),
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  from student import export  # pylint: disable=import-outside-toplevel

  out = export.export(trained, f"ce_fromce_seq{half}_rope2", fmt="hf")
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    hf_config = json.load(f)
  assert hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
  with pytest.raises(UserError, match=f"cannot train on rows of seq={half}"):
    distill_train.train_run(config, trained, f"sampled@seq={half}")
