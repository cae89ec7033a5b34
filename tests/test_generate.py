"""KV-cache decoding equals the full forward; generation, sampling, speed, binary."""

import io
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import procs
import teacher as teacher_lib
from data import tokenizer as tok
from distill.core import checkpoint
from distill.decoding import generate as gen
from distill.decoding import sampling as sampler
from distill.decoding import speed as decode_speed
from student import Student, get_preset
from distill import generate as text_generate

TOL = 1e-4
T = 21  # longer than every window below, so the rings wrap


def _student(vocab=64, window=4, seed=0):
  return Student(
      get_preset(
          "tiny",
          vocab_size=vocab,
          window=window,
          num_layers=3,
          layer_pattern=("local", "local", "global"),
      ),
      nnx.Rngs(seed),
  )


def _teacher(vocab=64, window=None, seed=1):
  return teacher_lib.Teacher(
      teacher_lib.get_preset("tiny", vocab_size=vocab, sliding_window=window),
      nnx.Rngs(seed),
  )


MODELS = {
    "student": lambda: _student(),
    "teacher_global": lambda: _teacher(),
    "teacher_window5": lambda: _teacher(window=5),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
  return MODELS[request.param]()


def _forward(model):
  """The full forward under jit: tokens [B, T] -> logits [B, T, V]."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, tokens: nnx.merge(graphdef, st)(tokens))
  return lambda tokens: fn(state, jnp.asarray(tokens, jnp.int32))


def _last_logits(forward, prompt, width=32):
  """Logits after ``prompt`` from one fixed-width (right-padded) forward."""
  padded = np.zeros((1, width), np.int32)
  padded[0, : len(prompt)] = prompt
  return forward(padded)[0, len(prompt) - 1]


def _tokens(vocab, shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


def _positions(b, start, stop):
  return jnp.broadcast_to(
      jnp.arange(start, stop, dtype=jnp.int32), (b, stop - start)
  )


# ----------------------------------------------------------------------------
# Decoding against the full forward


def test_every_decode_step_matches_full_forward(model):
  tokens = _tokens(model.config.vocab_size, (2, T))
  full = _forward(model)(tokens)
  decode = gen.decode(nnx.split(model)[0])
  state = nnx.state(model)
  cache = model.init_cache(2, T)
  logits, cache = decode(state, tokens[:, :3], cache, _positions(2, 0, 3))
  np.testing.assert_allclose(logits, full[:, :3], atol=TOL)
  for i in range(3, T):  # one token at a time, far past the window
    logits, cache = decode(
        state, tokens[:, i : i + 1], cache, _positions(2, i, i + 1)
    )
    np.testing.assert_allclose(
        logits[:, 0], full[:, i], atol=TOL, err_msg=f"step {i}"
    )


def test_local_layers_keep_a_ring_of_the_window(model):
  cache = model.init_cache(1, 1000, rollback=3)
  kinds = [b.attn.window for b in model.blocks]
  sizes = [c["k"].shape[1] for c in cache]
  for window, size in zip(kinds, sizes):
    assert size == (1000 if window is None else window + 3)
  if isinstance(model, Student):
    assert sorted(set(sizes)) == [7, 1000]  # local and global layers both there


def test_chunks_and_rollback_match_full_forward(model):
  """Chunks of 3 tokens; then take back 3 and decode other tokens instead."""
  vocab = model.config.vocab_size
  tokens = _tokens(vocab, (2, T))
  decode = gen.decode(nnx.split(model)[0])
  state = nnx.state(model)
  cache = model.init_cache(2, T + 3, rollback=3)
  forward = _forward(model)
  full = forward(tokens)
  for start in range(0, 15, 3):
    logits, cache = decode(
        state,
        tokens[:, start : start + 3],
        cache,
        _positions(2, start, start + 3),
    )
    np.testing.assert_allclose(logits, full[:, start : start + 3], atol=TOL)
  # Positions 12..14 are now written (the rings wrapped). Rewind to 12 with
  # a different continuation: the stale entries must never be seen.
  other = tokens.at[:, 12:].set(_tokens(vocab, (2, T - 12), seed=7))
  full_other = forward(other)
  assert not np.allclose(full_other[:, 13:], full[:, 13:], atol=1e-3)
  for i in range(12, T):
    logits, cache = decode(
        state, other[:, i : i + 1], cache, _positions(2, i, i + 1)
    )
    np.testing.assert_allclose(
        logits[:, 0], full_other[:, i], atol=TOL, err_msg=f"step {i}"
    )


def test_without_rollback_slots_a_rewind_breaks_the_window():
  """The extra ring slots are what makes rollback safe (not the mask alone)."""
  model = _student(window=4)
  tokens = _tokens(64, (1, 12))
  decode = gen.decode(nnx.split(model)[0])
  state = nnx.state(model)
  cache = model.init_cache(1, 12, rollback=0)
  _, cache = decode(state, tokens[:, :10], cache, _positions(1, 0, 10))
  logits, _ = decode(state, tokens[:, 7:8], cache, _positions(1, 7, 8))
  assert not np.allclose(logits[:, 0], _forward(model)(tokens)[:, 7], atol=1e-3)


@pytest.mark.parametrize("name", ["student", "teacher_window5"])
def test_left_padded_prompts_match_unpadded_rows(name):
  model = MODELS[name]()
  vocab = model.config.vocab_size
  prompts = [[5, 9, 3, 7, 1, 2], [4], [8, 8, 2]]
  batched = gen.generate(model, prompts, 12)
  for prompt, row in zip(prompts, batched):  # one prompt bucket: no recompiling
    assert gen.generate(model, [prompt], 12)[0] == row
  # and the padded prefill's last logits equal the unpadded forward's
  tokens, positions = gen.left_pad(prompts)
  assert tokens.shape == (3, 6) and (positions[1] == [-1] * 5 + [0]).all()
  logits, _ = gen.prefill(nnx.split(model)[0])(
      nnx.state(model), tokens, positions, max_len=8
  )
  forward = _forward(model)
  for b, prompt in enumerate(prompts):
    np.testing.assert_allclose(
        logits[b], _last_logits(forward, prompt), atol=TOL
    )
  assert max(map(max, batched)) < vocab


def test_chunked_prefill_equals_one_call(model):
  """A prompt longer than the prefill chunk is fed a chunk per decode call
  (left-padded to whole chunks): the last logits and every cached position
  as one call makes them, local rings wrapped included."""
  tokens, positions = gen.left_pad([list(range(1, 30)), [7] * 13])
  at = lambda chunk: nnx.jit(
      lambda m: gen._prefill(m, tokens, positions, 40, 0, chunk)  # pylint: disable=protected-access
  )(model)
  (one, cache_one), (chunked, cache_chunked) = at(64), at(8)
  np.testing.assert_allclose(chunked, one, atol=TOL)
  for a, b in zip(cache_one, cache_chunked):
    np.testing.assert_array_equal(a["pos"], b["pos"])
    seen = np.asarray(a["pos"] >= 0)[..., None, None]
    for key in ("k", "v"):
      np.testing.assert_allclose(
          np.where(seen, b[key], 0), np.where(seen, a[key], 0), atol=TOL
      )


# ----------------------------------------------------------------------------
# Generation


def test_greedy_generate_is_argmax_of_full_forward(model):
  prompt = [3, 1, 4, 1, 5]
  new = gen.generate(model, [prompt], 24)[0]
  forward = _forward(model)
  seq = list(prompt)
  for _ in range(24):
    seq.append(int(jnp.argmax(_last_logits(forward, seq))))
  assert new == seq[len(prompt) :]


def test_eos_stops_each_row_on_its_own():
  model = _student(vocab=16)
  prompts = [[1, 2, 3], [7, 5, 9]]
  free = gen.generate(model, prompts, 20)
  # An id that row 0 produces, as early as possible, and row 1 later or never.
  candidates = [
      (free[0].index(t), t)
      for t in set(free[0])
      if t not in free[1][: free[0].index(t) + 2]
  ]
  assert candidates, free
  first, eos = min(candidates)
  stopped = gen.generate(model, prompts, 20, eos_id=eos)
  assert stopped[0] == free[0][: first + 1]
  want1 = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
  assert stopped[1] == want1
  assert len(stopped[1]) > len(stopped[0])


def test_decode_step_compiles_once_per_shape():
  model = _student(vocab=48)
  step = gen.decode_loop(nnx.split(model)[0])
  before = step._cache_size()
  gen.generate(model, [[1, 2, 3]], 16)
  after_one = step._cache_size()
  gen.generate(model, [[4, 5, 6]], 16, eos_id=3)
  assert after_one - before == 1
  assert step._cache_size() == after_one


def test_sampling_probs_temperature_and_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
  np.testing.assert_allclose(
      sampler.sampling_probs(logits, 1.0, 1.0),
      [[0.5, 0.05, 0.3, 0.15]],
      atol=1e-6,
  )
  # top_p 0.8: 0.5 (before 0) and 0.3 (before 0.5) stay; 0.15 (before 0.8) goes.
  np.testing.assert_allclose(
      sampler.sampling_probs(logits, 1.0, 0.8),
      [[0.625, 0, 0.375, 0]],
      atol=1e-6,
  )
  np.testing.assert_allclose(
      sampler.sampling_probs(logits, 1.0, 0.81),
      [[0.5 / 0.95, 0, 0.3 / 0.95, 0.15 / 0.95]],
      atol=1e-6,
  )
  np.testing.assert_allclose(
      sampler.sampling_probs(logits, 1.0, 0.1), [[1, 0, 0, 0]], atol=1e-6
  )
  hot = sampler.sampling_probs(logits, 0.5, 1.0)
  want = np.array([0.5, 0.05, 0.3, 0.15]) ** 2
  np.testing.assert_allclose(hot[0], want / want.sum(), atol=1e-6)


def test_sampled_first_tokens_follow_the_model(model):
  """4000 rows of one prompt: counts of the first new token, chi-square."""
  prompt = [2, 7, 1]
  temperature, top_p = 0.8, 0.9
  draws = 4000
  rows = gen.generate(
      model,
      [prompt] * draws,
      1,
      temperature=temperature,
      top_p=top_p,
      key=jax.random.key(3),
  )
  counts = np.bincount([r[0] for r in rows], minlength=model.config.vocab_size)
  probs = np.asarray(
      sampler.sampling_probs(
          _last_logits(_forward(model), prompt), temperature, top_p
      ),
      np.float64,
  )
  assert counts[probs == 0].sum() == 0  # nothing outside the nucleus
  keep = probs > 0
  _, p_value = stats.chisquare(
      counts[keep], probs[keep] / probs[keep].sum() * draws
  )
  assert p_value > 1e-3


def test_measure_speed_reports_positive_throughput():
  model = _student()
  for batch in (1, 8):
    speed = decode_speed.measure_speed(
        model, prompt_len=8, new_tokens=4, batch=batch, repeats=2
    )
    assert (
        speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    )
    assert speed["batch"] == batch


# ----------------------------------------------------------------------------
# The binary


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  w = str(tmp_path_factory.mktemp("gen"))
  texts = ["def hello(name):\n    return 'hello ' + name\n"] * 20 + [
      "import os\nprint(os.getcwd())\n"
  ] * 20
  tokenizer = tok.train_tokenizer(texts, vocab_size=300)
  tok.save_tokenizer(tokenizer, os.path.join(w, "tokenizer.json"))
  config = get_preset("tiny", vocab_size=tokenizer.get_vocab_size(), window=4)
  model = Student(config, nnx.Rngs(0))
  run_dir = os.path.join(w, "student", "r1")
  checkpoint.write_config(run_dir, "student", config)
  checkpoint.save_params(run_dir, model)
  return w


def test_binary_streams_text(workdir):
  proc = procs.binary(
      "distill.generate",
      f"--workdir={workdir}",
      "--run=r1",
      "--prompt=def hello",
      "--max_new_tokens=12",
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr
  out = io.StringIO()
  text = text_generate.generate_text(
      workdir, "def hello", run="r1", max_new_tokens=12, out=out
  )
  assert proc.stdout == out.getvalue() == "def hello" + text + "\n"
  assert text  # a random model still writes something


def test_binary_errors_name_the_runs(workdir):
  proc = procs.binary(
      "distill.generate",
      f"--workdir={workdir}",
      "--run=nope",
      "--prompt=x",
      timeout=120,
  )
  assert proc.returncode == 1
  assert "no student run 'nope'" in proc.stderr and "r1" in proc.stderr
  assert "Traceback" not in proc.stderr
  with pytest.raises(text_generate.GenerateError, match="no teacher"):
    text_generate.model_dir(workdir, None, teacher=True)
  with pytest.raises(text_generate.GenerateError, match="not both"):
    text_generate.model_dir(workdir, "r1", teacher=True)
  assert text_generate.model_dir(workdir, None, False).endswith("r1")
