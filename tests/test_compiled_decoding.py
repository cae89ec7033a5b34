"""Compiled decoding loops equal simple per-step / per-round Python loops.

``generate`` / ``stream`` run their steps in one jitted while loop per call,
and ``speculative_generate`` every round in one: their tokens (greedy and
sampled) and statistics must be those of the Python loops below, which
dispatch one jitted step or round at a time and read every result back.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

import teacher as teacher_lib
from distill import speculative as spec
from distill.decoding import generate as gen
from distill.decoding import sampling as sampler
from distill.decoding import speed as decode_speed
from student import Student, get_preset

V = 16
PROMPTS = [[1, 2, 3], [7, 5, 9, 4, 4, 1, 2], [3]]  # three lengths


def _student(vocab=V):
  return Student(
      get_preset(
          "tiny",
          vocab_size=vocab,
          window=3,
          num_layers=3,
          layer_pattern=("local", "local", "global"),
      ),
      nnx.Rngs(5),
  )


def _teacher(vocab=V):
  return teacher_lib.Teacher(
      teacher_lib.get_preset("tiny", vocab_size=vocab, sliding_window=5),
      nnx.Rngs(1),
  )


@pytest.fixture(scope="module")
def student():
  return _student()


@pytest.fixture(scope="module")
def teacher():
  return _teacher()


# ----------------------------------------------------------------------------
# generate / stream


@functools.lru_cache(maxsize=8)
def _reference_step(graphdef, mode):
  """One jitted step: feed tokens [B] at positions [B], pick the next."""

  def step(state, cache, tokens, positions, key, temperature, top_p):
    logits, cache = nnx.merge(graphdef, state).decode(
        tokens[:, None], cache, positions[:, None]
    )
    return (
        sampler.pick(logits[:, 0], key, temperature, top_p, **dict(mode)),
        cache,
    )

  return jax.jit(step)


def _reference_stream(
    model, rows, max_new_tokens, *, temperature=0.0, top_p=1.0, eos_id=None
):
  """Per step: [B] tokens (-1 once a row is done), one dispatch per token."""
  key = jax.random.key(3)
  mode = (("greedy", temperature <= 0), ("nucleus", sampler.nucleus_for(top_p)))
  temperature, top_p = np.float32(max(temperature, 1e-6)), np.float32(top_p)
  graphdef, state = nnx.split(model)
  tokens, positions = gen.left_pad(rows, gen.PROMPT_BUCKET)
  max_len = gen.round_up(max(map(len, rows)) + max_new_tokens, 64)
  logits, cache = gen.prefill(graphdef)(
      state, tokens, positions, max_len=max_len
  )
  token = sampler.pick(
      logits, jax.random.fold_in(key, 0), temperature, top_p, **dict(mode)
  )
  done = np.zeros(len(rows), bool)
  out = []
  for i in range(max_new_tokens):
    host = np.asarray(token)
    out.append(np.where(done, -1, host))
    done |= host == eos_id
    if done.all() or i + 1 == max_new_tokens:
      return out
    token, cache = _reference_step(graphdef, mode)(
        state,
        cache,
        token,
        positions[:, -1] + 1 + i,
        jax.random.fold_in(key, i + 1),
        temperature,
        top_p,
    )
  return out


def _rows(steps):
  return [[int(t) for t in row if t >= 0] for row in np.stack(steps, 1)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize(
    "make",
    [_student, pytest.param(_teacher, marks=pytest.mark.slow)],
    ids=["student", "teacher"],
)
def test_generate_and_stream_equal_a_per_step_loop(make, temperature):
  """Greedy and sampled, rows of three prompt lengths, with and without an
  eos that stops some rows in the middle."""
  model = make()
  kw = dict(temperature=temperature, top_p=0.9)
  free = _reference_stream(model, PROMPTS, 20, **kw)
  eos = int(free[4][0])  # row 0 stops at step 4 or before
  for eos_id, want in ((None, free), (eos, None)):
    if want is None:
      want = _reference_stream(model, PROMPTS, 20, eos_id=eos_id, **kw)
    key = jax.random.key(3)
    got = gen.generate(model, PROMPTS, 20, eos_id=eos_id, key=key, **kw)
    assert got == _rows(want)
    for chunk in (1, 3, 32):
      streamed = list(
          gen.stream(
              model, PROMPTS, 20, eos_id=eos_id, key=key, chunk=chunk, **kw
          )
      )
      assert len(streamed) == len(want)
      np.testing.assert_array_equal(streamed, want, err_msg=f"chunk {chunk}")
  stopped = _rows(want)
  assert len(stopped[0]) <= 5 and stopped[0][-1] == eos
  assert max(map(len, stopped)) > len(stopped[0])  # other rows went on


def test_lengths_zero_and_one(student):
  assert gen.generate(student, PROMPTS, 0) == [[], [], []]
  assert not list(gen.stream(student, PROMPTS, 0))
  one = gen.generate(student, PROMPTS, 1)
  assert one == [row[:1] for row in gen.generate(student, PROMPTS, 5)]
  with pytest.raises(ValueError, match="chunk"):
    list(gen.stream(student, PROMPTS, 4, chunk=0))


def test_the_loop_exits_once_every_row_is_done(student):
  prompts = [[4, 2, 6]] * 2  # equal rows finish together
  free = gen.generate(student, prompts, 12)[0]
  eos = free[3]
  stop = free.index(eos)  # the step where both rows finish
  steps = list(gen.stream(student, prompts, 12, eos_id=eos, chunk=4))
  assert len(steps) == stop + 1 and (steps[-1] == eos).all()
  # On the device: the while loop took only the steps up to the eos.
  graphdef, state = nnx.split(student)
  tokens, positions = gen.left_pad(prompts, gen.PROMPT_BUCKET)
  args = (jax.random.key(0), np.float32(1e-6), np.float32(1.0), eos)
  cache, cursor = gen.start(graphdef)(
      state, tokens, positions, *args, max_len=64, greedy=True, nucleus=False
  )
  _, cursor, out, count = gen.decode_loop(graphdef)(
      state, cache, cursor, 12, *args, steps=16, greedy=True, nucleus=False
  )
  assert int(count) == int(cursor.step) == stop
  assert np.asarray(cursor.done).all()
  np.testing.assert_array_equal(out[0, :stop], free[1 : stop + 1])
  assert (np.asarray(out)[:, stop:] == -1).all()


def test_one_loop_compilation_per_bucket_and_mode():
  model = _student(vocab=20)  # a structure no other test compiles
  loop = gen.decode_loop(nnx.split(model)[0])
  before = loop._cache_size()
  gen.generate(model, [[1, 2, 3]], 10)
  gen.generate(model, [[4, 5]], 30, eos_id=3)  # the same step bucket
  assert loop._cache_size() == before + 1
  gen.generate(model, [[1, 2, 3]], 10, temperature=0.7, key=jax.random.key(1))
  gen.generate(model, [[1, 2, 3]], 20, temperature=0.8, key=jax.random.key(2))
  assert loop._cache_size() == before + 2  # sampling: once more
  gen.generate(model, [[1, 2, 3]], 20, temperature=0.9, top_p=0.5)
  gen.generate(model, [[1, 2, 3]], 30, temperature=0.9, top_p=0.7)
  assert loop._cache_size() == before + 3  # with a nucleus: once more
  list(gen.stream(model, [[1, 2, 3]], 30, chunk=4))  # 8 calls of one shape
  assert loop._cache_size() == before + 4
  # measure_speed times the loop generate compiled for that shape
  gen.generate(model, [list(range(16))], 9)
  compiled = loop._cache_size()
  speed = decode_speed.measure_speed(
      model, prompt_len=16, new_tokens=8, repeats=1
  )
  assert loop._cache_size() == compiled and speed["decode_tokens_per_s"] > 0


# ----------------------------------------------------------------------------
# Speculative decoding


@functools.lru_cache(maxsize=8)
def _reference_round(t_graph, s_graph, gamma, greedy, nucleus):
  """The two halves of a round, each its own jit (as dispatched per round)."""

  def draft(s_state, cache, tokens, positions, key, round_, temp, top_p):
    return spec._draft(
        nnx.merge(s_graph, s_state),
        cache,
        tokens,
        positions,
        key,
        round_,
        temp,
        top_p,
        gamma=gamma,
        greedy=greedy,
        nucleus=nucleus,
    )

  def verify(t_state, cache, last, drafts, q, position, key, round_, *rest):
    return spec._verify(
        nnx.merge(t_graph, t_state),
        cache,
        last,
        drafts,
        q,
        position,
        key,
        round_,
        *rest,
        greedy=greedy,
        nucleus=nucleus,
    )

  return jax.jit(draft), jax.jit(verify)


def _reference_speculative(
    teacher, student, prompt, max_new_tokens, *, gamma, key, **sampling
):
  """The Python loop: a draft and a verify dispatch per round, the verdict
  read back every round; the student gets the last one or two tokens."""
  temperature = sampling.get("temperature", 0.0)
  eos_id = sampling.get("eos_id")
  temp = np.float32(max(temperature, 1e-6))
  nucleus = sampler.nucleus_for(sampling.get("top_p", 1.0))
  top_p = np.float32(sampling.get("top_p", 1.0))
  max_len = gen.round_up(len(prompt) + max_new_tokens + gamma + 1, 64)
  t_graph, t_state, t_cache = spec._fill(teacher, prompt[:-1], max_len, gamma)
  s_graph, s_state, s_cache = spec._fill(student, prompt[:-1], max_len, gamma)
  draft, verify = _reference_round(
      t_graph, s_graph, gamma, temperature <= 0, nucleus
  )
  seq, out = list(prompt), []
  stats = {"proposed": 0, "accepted": 0, "teacher_calls": 0, "draft_calls": 0}
  round_ = 0
  while len(out) < max_new_tokens and not (out and out[-1] == eos_id):
    n = len(seq)
    round_ += 1
    first = max(0, n - 2)
    drafts, q, s_cache = draft(
        s_state,
        s_cache,
        np.asarray([seq[first:n]], np.int32),
        np.arange(first, n, dtype=np.int32)[None],
        key,
        round_,
        temp,
        top_p,
    )
    a, committed, t_cache = verify(
        t_state,
        t_cache,
        np.int32(seq[-1]),
        drafts,
        q,
        np.int32(n - 1),
        key,
        round_,
        temp,
        top_p,
    )
    a = int(a)
    new = [int(t) for t in np.asarray(committed)[: a + 1]]
    stats["proposed"] += gamma
    stats["accepted"] += a
    stats["teacher_calls"] += 1
    stats["draft_calls"] += gamma
    for t in new:
      if len(out) == max_new_tokens or (out and out[-1] == eos_id):
        break
      out.append(t)
    seq.extend(new)
  return {"tokens": out, **stats}


@pytest.mark.parametrize(
    "drafter,gamma,temperature,prompt",
    [
        ("student", 3, 0.0, [3, 7, 2, 9, 4]),
        ("student", 3, 1.0, [3, 7, 2, 9, 4]),
        pytest.param(  # one token: the first chunk is padded
            "student", 2, 0.8, [5], marks=pytest.mark.slow
        ),
        pytest.param(  # the teacher drafting for itself
            "teacher", 2, 1.0, [3, 7, 2], marks=pytest.mark.slow
        ),
    ],
)
def test_speculative_equals_the_round_by_round_loop(
    teacher, student, drafter, gamma, temperature, prompt
):
  drafter = teacher if drafter == "teacher" else student
  sampling = dict(temperature=temperature, top_p=0.9)
  key = jax.random.key(7)
  want = _reference_speculative(
      teacher, drafter, prompt, 24, gamma=gamma, key=key, **sampling
  )
  # an eos that comes in the middle (possibly inside a round's tokens)
  eos = want["tokens"][9]
  for eos_id in (None, eos):
    if eos_id is not None:
      want = _reference_speculative(
          teacher,
          drafter,
          prompt,
          24,
          gamma=gamma,
          key=key,
          eos_id=eos_id,
          **sampling,
      )
      assert len(want["tokens"]) <= 10 and want["tokens"][-1] == eos
    got = spec.speculative_generate(
        teacher,
        drafter,
        prompt,
        24,
        gamma=gamma,
        key=key,
        eos_id=eos_id,
        **sampling,
    )
    assert {k: getattr(got, k) for k in want} == want
  assert 0 < got.accepted <= got.proposed


def test_speculative_compiles_once_per_bucket():
  big, small = _teacher(vocab=13), _student(vocab=13)  # not compiled yet
  t_graph, s_graph = nnx.split(big)[0], nnx.split(small)[0]
  rounds = spec._rounds(t_graph, s_graph)
  before = rounds._cache_size()
  a = spec.speculative_generate(big, small, [3, 7, 2], 20, gamma=3)
  b = spec.speculative_generate(
      big, small, [1, 4, 4, 2, 8, 9, 5], 30, gamma=3, eos_id=2
  )
  spec.speculative_generate(big, small, [6], 12, gamma=3)
  assert rounds._cache_size() == before + 1  # one max_len bucket (64)
  assert a.teacher_calls > 1 and b.teacher_calls >= 1
  spec.speculative_generate(big, small, [3, 7, 2], 20, gamma=2)
  assert rounds._cache_size() == before + 2  # gamma is part of the shape
