"""Scale-out on the 8 simulated CPU devices: meshes, rules, one-device parity.

Every test here has "mesh", "shard", "distributed" or "elastic" in its name,
so ``pytest -k "mesh or shard or distributed or elastic"`` selects them.
"""

import itertools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import pipeline, sparse_targets
from distill import train as distill_train
from distill.core import checkpoint as ckpt
from distill.core import layout, sharding
from distill.core.errors import ConfigError
from distill.nn import blockwise
from distill.training import loop as trainer
from experiments import stdlib
from student import config as student_config
from student.model import Student
from teacher import config as teacher_config
from teacher import moe
from teacher import train as teacher_train
from teacher.model import Teacher

# The meshes of the parity tests (sizes not named are 1).
MESHES = {
    "fsdp8": dict(fsdp=8),
    "data2_fsdp4": dict(data=2, fsdp=4),
    "fsdp4_tensor2": dict(fsdp=4, tensor=2),
    "expert4_data2": dict(expert=4, data=2),
}
TOL = 1e-5  # float32


def mesh_of(**sizes):
  return sharding.make_mesh(sharding.MeshConfig(**{"fsdp": 1, **sizes}))


# ----------------------------------------------------------------------------
# Meshes and rules


def test_mesh_default_puts_every_device_on_fsdp():
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=-1, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
  one = sharding.make_mesh(devices=jax.devices()[:1])
  assert one.size == 1


@pytest.mark.parametrize(
    "sizes, words",
    [
        (dict(fsdp=3), "but 8 are present"),
        (dict(fsdp=-1, tensor=3), "not a multiple of 3"),
        (dict(fsdp=-1, data=-1), "at most one -1"),
        (dict(fsdp=0), "positive"),
    ],
)
def test_mesh_config_errors_say_what_to_change(sizes, words):
  with pytest.raises(ConfigError, match=words):
    sharding.make_mesh(sharding.MeshConfig(**sizes))


def test_shard_spec_follows_the_rules_and_replicates_what_does_not_divide():
  mesh = mesh_of(fsdp=4, tensor=2)
  P = jax.sharding.PartitionSpec
  assert sharding.spec(("vocab", "embed"), (512, 64), mesh) == P(
      "tensor", "fsdp"
  )
  # 3 heads do not split over tensor=2: that axis stays whole.
  assert sharding.spec(("embed", "heads", None), (64, 3, 16), mesh) == P(
      "fsdp", None, None
  )
  # A batch of 4 rows takes what divides it.
  assert sharding.spec(("batch", None), (4, 9), mesh_of(data=2, fsdp=4)) == P(
      "data", None
  )
  # One mesh axis is used once per array.
  assert sharding.spec(("embed", "embed"), (8, 8), mesh) == P("fsdp", None)


def test_shard_placement_of_every_parameter_and_optimizer_state():
  cfg = teacher_config.get_preset("tiny", vocab_size=512)
  model = Teacher(cfg, rngs=nnx.Rngs(0))
  mesh = mesh_of(expert=1, fsdp=4, tensor=2)
  sharding.place(model, mesh)
  moe = model.blocks[0].moe
  assert moe.gate[...].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor"
  )
  assert model.embed.embedding[...].sharding.spec == jax.sharding.PartitionSpec(
      "tensor", "fsdp"
  )
  # Each device holds an eighth of the embedding.
  table = model.embed.embedding[...]
  assert {s.data.shape for s in table.addressable_shards} == {
      (table.shape[0] // 2, table.shape[1] // 4)
  }
  import optax  # pylint: disable=import-outside-toplevel

  opt = sharding.place(
      nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param), mesh
  )
  mu = opt.opt_state[0].mu["embed"]["embedding"][...]
  assert mu.sharding.spec == table.sharding.spec


# ----------------------------------------------------------------------------
# One training step: same loss and gradients on every mesh as on one device


def _batch(vocab, rows=8, length=17, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (rows, length)).astype(np.int32)
  # Two documents per row, so packing and segment masks are exercised.
  cut = length // 2
  segment_ids = np.where(np.arange(length) < cut, 1, 2).astype(np.int32)
  positions = np.where(
      np.arange(length) < cut, np.arange(length), np.arange(length) - cut
  ).astype(np.int32)
  return {
      "tokens": tokens,
      "segment_ids": np.tile(segment_ids, (rows, 1)),
      "positions": np.tile(positions, (rows, 1)),
  }


def _loss_and_grads(model, loss_fn, batch, frozen=(), mesh=None):
  model = nnx.clone(model)
  frozen = tuple(nnx.clone(m) for m in frozen)

  def objective(model, batch, frozen):
    return loss_fn(model, batch, jnp.int32(0), *frozen)[0]

  step = nnx.jit(nnx.value_and_grad(objective))
  if mesh is None:
    loss, grads = step(model, batch, frozen)
  else:
    with sharding.use(mesh):
      sharding.place(model, mesh)
      for m in frozen:
        sharding.place(m, mesh)
      loss, grads = step(model, sharding.put_batch(batch, mesh), frozen)
  flat = {
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(grads)
  }
  return float(loss), flat


def _assert_same(got, want):
  loss, grads = got
  want_loss, want_grads = want
  assert abs(loss - want_loss) <= TOL, (loss, want_loss)
  assert grads.keys() == want_grads.keys()
  for key in grads:
    np.testing.assert_allclose(
        grads[key], want_grads[key], atol=TOL, rtol=0, err_msg=key
    )


@pytest.fixture(scope="module")
def teacher_setup():
  # The tiny preset: MoE with 5 experts (odd: expert=4 must pad), top-2.
  # One layer: the rules place every layer's parameters alike, and each
  # layer more only costs compile time (the scanned stacks are checked
  # against the loop by test_stack).
  cfg = teacher_config.get_preset("tiny", vocab_size=256, num_layers=1)
  assert cfg.num_experts == 5 and cfg.top_k == 2
  model = Teacher(cfg, rngs=nnx.Rngs(0))
  loss_fn = teacher_train.loss_fn_for(cfg, chunk_size=8)
  batch = _batch(256)
  return model, loss_fn, batch, _loss_and_grads(model, loss_fn, batch)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_mesh_teacher_step_matches_one_device(teacher_setup, mesh_name):
  model, loss_fn, batch, want = teacher_setup
  got = _loss_and_grads(
      model, loss_fn, batch, mesh=mesh_of(**MESHES[mesh_name])
  )
  _assert_same(got, want)


@pytest.mark.parametrize("mesh_name", ["expert4_data2", "fsdp4_tensor2"])
@pytest.mark.parametrize(
    "impl, capacity_factor", [("ragged", None), ("blocked", 1.0)]
)
def test_mesh_moe_paths_match_one_device(mesh_name, impl, capacity_factor):
  """The MoE paths the presets do not take on the CPU: the ragged grouped
  matmul and capacity dispatch (here dropping 4% of the assignments)."""
  layer = moe.MoE(
      16,
      24,
      5,
      2,
      rngs=nnx.Rngs(0),
      impl=impl,
      capacity_factor=capacity_factor,
  )
  x = jax.random.normal(jax.random.key(1), (8, 6, 16))
  mask = jnp.ones((8, 6), bool).at[0, :2].set(False)

  def loss(layer, x):
    y, aux = layer(x, mask)
    return jnp.mean(y**2) + aux["load_balancing_loss"], aux["dropped_fraction"]

  grad = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  (want, want_dropped), want_g = grad(nnx.clone(layer), x)
  mesh = mesh_of(**MESHES[mesh_name])
  placed = sharding.place(nnx.clone(layer), mesh)
  with sharding.use(mesh):
    xs = jax.device_put(x, sharding.batch_sharding(mesh, x.shape))
    (got, dropped), got_g = grad(placed, xs)
  assert abs(float(got) - float(want)) <= TOL
  assert float(dropped) == float(want_dropped)
  if capacity_factor is not None:
    assert float(want_dropped) > 0  # the capacity really dropped some
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)


STUDENT_RUNS = (
    "ce",
    "sampled",
    "topk_ghost",
    "topk_sparse",
    "topk_tail",
    "online",
)


@pytest.fixture(scope="module")
def student_setup():
  vocab = 256
  config = stdlib.get_config("tiny")
  d = config.distill
  # One layer each (as in teacher_setup): a local one for the student, whose
  # window is the mask the global one lacks.
  student = Student(
      student_config.get_preset(
          "tiny", vocab_size=vocab, num_layers=1, layer_pattern=("local",)
      ),
      rngs=nnx.Rngs(1),
  )
  teacher = Teacher(
      teacher_config.get_preset("tiny", vocab_size=vocab, num_layers=1),
      rngs=nnx.Rngs(2),
  )
  batch = _batch(vocab, seed=1)
  # Cached targets as teacher.cache_logits makes them, for the offline runs.
  logits = jax.jit(teacher)(
      batch["tokens"][:, :-1],
      batch["segment_ids"][:, :-1],
      batch["positions"][:, :-1],
  )
  log_p = jax.nn.log_softmax(logits, axis=-1)
  ids, log_probs, tail = sparse_targets.topk_targets(log_p, 8)
  s_ids, counts = sparse_targets.sample_targets(jax.random.key(0), log_p, 16)
  tt = sparse_targets.topk_tail_targets(jax.random.key(1), log_p, 4, 8)
  targets = {
      "topk": dict(ids=ids, log_probs=log_probs, tail=tail),
      "sample": dict(ids=s_ids, counts=counts),
      "topk_tail": dict(
          zip(("ids", "log_probs", "tail", "tail_ids", "tail_counts"), tt)
      ),
  }
  cases = {}
  for run in STUDENT_RUNS:
    kind = distill_train.run_kind(run)
    loss_fn = distill_train.loss_fn_for(kind, d, 1.0, topk_k=8)
    b = dict(batch)
    if kind.mode == "offline":
      b.update({k: np.asarray(v) for k, v in targets[kind.target].items()})
    frozen = (teacher,) if kind.mode == "online" else ()
    cases[run] = (loss_fn, b, frozen)
  want = {
      run: _loss_and_grads(student, loss_fn, b, frozen)
      for run, (loss_fn, b, frozen) in cases.items()
  }
  return student, cases, want


@pytest.mark.parametrize("run", STUDENT_RUNS)
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_mesh_student_step_matches_one_device(student_setup, mesh_name, run):
  student, cases, want = student_setup
  loss_fn, batch, frozen = cases[run]
  got = _loss_and_grads(
      student, loss_fn, batch, frozen, mesh=mesh_of(**MESHES[mesh_name])
  )
  _assert_same(got, want[run])


def test_shard_chunked_loss_never_holds_full_logits_on_one_device():
  """The chunked loss, compiled for fsdp=4 x tensor=2: no device array has a
  whole chunk's [B, chunk, V] (nor the whole [B, T, V]); each holds a
  quarter of the rows and half of the vocabulary."""
  vocab, rows, length, chunk = 256, 8, 33, 16
  config = stdlib.get_config("tiny")
  student = Student(
      student_config.get_preset("tiny", vocab_size=vocab), rngs=nnx.Rngs(1)
  )
  loss_fn = distill_train.loss_fn_for(
      distill_train.run_kind("ce"), config.distill, 1.0
  )
  assert config.distill.loss_chunk == chunk
  batch = _batch(vocab, rows=rows, length=length)
  mesh = mesh_of(fsdp=4, tensor=2)
  with sharding.use(mesh):
    sharding.place(student, mesh)
    batch = sharding.put_batch(batch, mesh)
    step = nnx.jit(
        nnx.value_and_grad(lambda m, b: loss_fn(m, b, jnp.int32(0))[0])
    )
    hlo = step.lower(student, batch).compile().as_text()
  full = [f"f32[{rows},{n},{vocab}]" for n in (chunk, length - 1)]
  assert not [s for s in full if s in hlo], "a device holds whole logits"
  assert f"f32[{rows // 4},{chunk},{vocab // 2}]" in hlo


def test_distributed_processes_read_disjoint_rows_of_each_batch(tiny_prepared):
  """Two processes' shards of every global batch: disjoint, and together the
  rows one process reads alone."""
  common = dict(seq_len=32, batch_size=8, seed=0)
  data_dir = layout.data_dir(tiny_prepared)
  alone = pipeline.make_dataset(
      data_dir, "train", process_index=0, process_count=1, **common
  )
  parts = [
      pipeline.make_dataset(
          data_dir, "train", process_index=i, process_count=2, **common
      )
      for i in range(2)
  ]
  for whole, a, b in itertools.islice(zip(alone, *parts), 5):
    rows_a, rows_b = set(a["row"].tolist()), set(b["row"].tolist())
    assert len(rows_a) == len(rows_b) == 4 and not rows_a & rows_b
    assert rows_a | rows_b == set(whole["row"].tolist())


# ----------------------------------------------------------------------------
# Elastic restore: a checkpoint from one mesh goes on on another


def _student_run(out_dir, data_dir, mesh, steps=3, seed=0):
  """The trainer on a tiny student (CE), checkpoints at 2 and 3; returns
  the loss of each step from metrics.jsonl."""
  if not os.path.isfile(os.path.join(out_dir, ckpt.CONFIG_FILE)):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, ckpt.CONFIG_FILE), "w") as f:
      f.write('{"kind": "test", "model": {}}')
  config = stdlib.get_config("tiny")
  model = Student(
      student_config.get_preset(
          "tiny", vocab_size=512, num_layers=1, layer_pattern=("global",)
      ),
      rngs=nnx.Rngs(seed),
  )
  cfg = trainer.LoopConfig(
      steps=steps,
      learning_rate=1e-2,
      warmup_steps=1,
      log_every=1,
      eval_every=100,
      checkpoint_every=2,
      keep_checkpoints=5,
  )
  trainer.train(
      out_dir=out_dir,
      model=model,
      loss_fn=distill_train.loss_fn_for(
          distill_train.run_kind("ce"), config.distill
      ),
      make_iterator=lambda: iter(
          pipeline.make_dataset(data_dir, "train", seq_len=32, batch_size=8)
      ),
      cfg=cfg,
      mesh=mesh,
  )
  return {r["step"]: r["loss"] for r in trainer.read_metrics(out_dir)}


def _lose_last_step(src, dst):
  """A copy of a finished 3-step run as if it had died after step 2."""
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, ckpt.CHECKPOINT_DIR, "3"))


@pytest.mark.parametrize(
    "saved_on, restored_on",
    [
        (8, 2),
        # The other directions, ~5 s each, in the slow suite.
        pytest.param(8, 1, marks=pytest.mark.slow),
        pytest.param(2, 1, marks=pytest.mark.slow),
        pytest.param(1, 8, marks=pytest.mark.slow),
    ],
)
def test_elastic_restore_onto_another_device_count(
    tiny_prepared, tmp_path, saved_on, restored_on
):
  data_dir = layout.data_dir(tiny_prepared)
  devices = jax.devices()
  first = sharding.make_mesh(devices=devices[:saved_on])
  full = _student_run(str(tmp_path / "full"), data_dir, first)
  _lose_last_step(tmp_path / "full", tmp_path / "resumed")
  second = sharding.make_mesh(devices=devices[:restored_on])
  # Other initial parameters: only the restored ones give the same step 3.
  resumed = _student_run(str(tmp_path / "resumed"), data_dir, second, seed=9)
  assert sorted(resumed) == [1, 2, 3]
  # Step 3 ran on the new mesh from the restored parameters, optimizer
  # state and data position.
  assert abs(resumed[3] - full[3]) <= 1e-5, (resumed[3], full[3])


@pytest.mark.parametrize("window", [None, 11])
def test_mesh_blockwise_attention_matches_one_device(window):
  """The blockwise (flash) path with rows over fsdp and heads over tensor:
  the same outputs and gradients as on one device."""
  keys = jax.random.split(jax.random.key(4), 3)
  shapes = ((4, 40, 4, 8), (4, 40, 2, 8), (4, 40, 2, 8))
  q, k, v = (jax.random.normal(key, s) for key, s in zip(keys, shapes))
  segments = jnp.ones((4, 40), jnp.int32).at[1, 17:].set(2)

  def loss(q, k, v, segments):
    out = blockwise.flash_attention(
        q, k, v, segments, window=window, scale=0.3, block=8
    )
    return jnp.sum(jnp.sin(out))

  grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  want = grad(q, k, v, segments)
  mesh = mesh_of(**MESHES["fsdp4_tensor2"])
  heads = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
  rows = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None))
  got = grad(
      *(jax.device_put(x, heads) for x in (q, k, v)),
      jax.device_put(segments, rows),
  )
  assert got[1][0].sharding.spec[2] == "tensor"  # it ran sharded
  assert abs(float(got[0]) - float(want[0])) <= TOL
  for a, b in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL, rtol=0)
