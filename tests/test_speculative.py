"""Speculative decoding: greedy output is the teacher's; sampling follows it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import teacher as teacher_lib
from distill.decoding import generate as gen
from distill.decoding import sampling as sampler
from distill import speculative as spec
from student import Student, get_preset

V = 12  # a tiny vocabulary: random models then agree only sometimes
P_MIN = 1e-3  # significance of the chi-square tests (fixed seeds)


@pytest.fixture(scope="module")
def teacher():
  return teacher_lib.Teacher(
      teacher_lib.get_preset("tiny", vocab_size=V, sliding_window=5),
      nnx.Rngs(1),
  )


@pytest.fixture(scope="module")
def student():
  # local layers with a window of 3 and a global one: the rings wrap often
  return Student(
      get_preset(
          "tiny",
          vocab_size=V,
          window=3,
          num_layers=3,
          layer_pattern=("local", "local", "global"),
      ),
      nnx.Rngs(5),
  )


PROMPT = [3, 7, 2, 9, 4]


@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_greedy_equals_teacher_greedy(teacher, student, gamma):
  want = gen.generate(teacher, [PROMPT], 40)[0]
  got = spec.speculative_generate(teacher, student, PROMPT, 40, gamma=gamma)
  assert got.tokens == want
  # the student disagrees often, so rejections (and rollbacks) happen
  assert 0.1 < got.acceptance_rate < 0.9, got.acceptance_rate
  assert got.teacher_calls < 40
  assert got.tokens_per_teacher_call == pytest.approx(40 / got.teacher_calls)
  assert got.proposed == gamma * got.teacher_calls


def _spy(model, records):
  """A copy of ``model`` whose decode also reports (tokens, positions, logits),
  in the order the calls run."""

  class Spy(type(model)):

    def decode(self, tokens, cache, positions):
      logits, cache = super().decode(tokens, cache, positions)
      jax.debug.callback(
          lambda *a: records.append([np.asarray(x)[0] for x in a]),
          tokens,
          positions,
          logits,
          ordered=True,
      )
      return logits, cache

  spy = nnx.eval_shape(lambda: Spy(model.config, nnx.Rngs(0)))
  nnx.update(spy, nnx.state(model))
  return spy


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_call_sees_exactly_its_context(teacher, student, temperature):
  """Through rejections (stale writes in the rings and caches), every decode
  call of either model gives the full forward's logits of its context: the
  tokens last fed at each earlier position, then its own."""
  records = {"teacher": [], "student": []}
  got = spec.speculative_generate(
      _spy(teacher, records["teacher"]),
      _spy(student, records["student"]),
      PROMPT,
      30,
      gamma=4,
      temperature=temperature,
      key=jax.random.key(1),
  )
  assert 0 < got.acceptance_rate < 1
  final = PROMPT + got.tokens
  for name, model in (("teacher", teacher), ("student", student)):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, t, g=graphdef: nnx.merge(g, st)(t))
    assert len(records[name]) >= 5
    fed = {}  # position -> the token fed there last
    for tokens, positions, logits in records[name]:
      real = positions >= 0
      tokens, positions, logits = tokens[real], positions[real], logits[real]
      fed.update(zip(positions.tolist(), tokens.tolist()))
      context = [fed[i] for i in range(positions[-1] + 1)]
      padded = np.zeros((1, 64), np.int32)
      padded[0, : len(context)] = context
      want = forward(state, padded)[0, positions[0] : len(context)]
      np.testing.assert_allclose(logits, want, atol=1e-4, err_msg=name)
    # the teacher was fed exactly the committed tokens (all but the last)
    if name == "teacher":
      assert [fed[i] for i in range(len(final) - 1)] == final[:-1]


@pytest.mark.parametrize("gamma", [1, 3])
def test_teacher_drafting_for_itself_accepts_everything(teacher, gamma):
  want = gen.generate(teacher, [PROMPT], 24)[0]
  got = spec.speculative_generate(teacher, teacher, PROMPT, 24, gamma=gamma)
  assert got.tokens == want
  assert got.acceptance_rate == 1.0
  assert got.teacher_calls == -(-24 // (gamma + 1))  # gamma + 1 tokens per call


def test_one_token_prompt_and_eos(teacher, student):
  want = gen.generate(teacher, [[5]], 20)[0]
  got = spec.speculative_generate(teacher, student, [5], 20, gamma=3)
  assert got.tokens == want
  eos = want[6]
  stop = want.index(eos)
  got = spec.speculative_generate(
      teacher, student, [5], 20, gamma=3, eos_id=eos
  )
  assert got.tokens == want[: stop + 1]


def test_compare_reports_speedup_and_identity(teacher, student):
  out = spec.compare(teacher, student, PROMPT, 16, gamma=2, repeats=1)
  assert out["matches_teacher"] and out["tokens"] == out["teacher_tokens"]
  assert out["teacher_wall_s"] > 0 and out["speculative_wall_s"] > 0
  assert out["speedup"] == pytest.approx(
      out["teacher_wall_s"] / out["speculative_wall_s"]
  )
  # A shared baseline is used as given (its tokens decide the comparison).
  wrong = {"tokens": out["teacher_tokens"][:-1] + [-1], "wall_s": 2.0}
  again = spec.compare(
      teacher, student, PROMPT, 16, gamma=2, repeats=1, baseline=wrong
  )
  assert not again["matches_teacher"] and again["teacher_wall_s"] == 2.0


def _chi2_p(counts, probs):
  """p-value of counts against probs, cells of expected count < 5 pooled
  (0 when a draw falls where probs is 0)."""
  counts = np.asarray(counts, np.float64).reshape(-1)
  probs = np.asarray(probs, np.float64).reshape(-1)
  if counts[probs == 0].sum():
    return 0.0
  expected = probs / probs.sum() * counts.sum()
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp).pvalue


def test_accept_reject_rule_keeps_the_target_distribution():
  """Many vmapped rounds with fixed p and q: the first token follows p[0],
  and the token after an accepted first draft follows p[1]."""
  gamma, draws = 3, 40_000
  kp, kq, kd = jax.random.split(jax.random.key(0), 3)
  p = jax.nn.softmax(2 * jax.random.normal(kp, (gamma + 1, V)))
  q = jax.nn.softmax(2 * jax.random.normal(kq, (gamma, V)))

  def one(key):
    k_draft, k_rule = jax.random.split(key)
    drafts = jax.random.categorical(k_draft, jnp.log(q)).astype(jnp.int32)
    accepted, token = spec.accept_reject(k_rule, p, q, drafts)
    first = jnp.where(accepted >= 1, drafts[0], token)
    second = jnp.where(accepted >= 2, drafts[1], token)
    return accepted, first, second

  accepted, first, second = jax.jit(jax.vmap(one))(jax.random.split(kd, draws))
  first = np.asarray(first)
  assert _chi2_p(np.bincount(first, minlength=V), p[0]) > P_MIN
  after = np.asarray(second)[np.asarray(accepted) >= 1]
  assert _chi2_p(np.bincount(after, minlength=V), p[1]) > P_MIN
  # the test can tell: the drafts alone follow q, which it rejects
  assert _chi2_p(np.bincount(first, minlength=V), q[0]) < 1e-6
  rate = float(np.mean(np.asarray(accepted) >= 1))
  assert rate == pytest.approx(
      float(jnp.sum(jnp.minimum(p[0], q[0]))), abs=0.01
  )


def _joint(model, temperature, top_p):
  """The model's exact distribution of its first two new tokens, [V, V]."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
  seqs = np.array([PROMPT + [x] for x in range(V)], np.int32)
  logits = forward(state, seqs)
  p1 = sampler.sampling_probs(logits[0, len(PROMPT) - 1], temperature, top_p)
  p2 = sampler.sampling_probs(logits[:, len(PROMPT)], temperature, top_p)
  return np.asarray(p1)[:, None] * np.asarray(p2)


@pytest.mark.parametrize(
    "gamma,temperature,top_p", [(1, 0.7, 1.0), (3, 1.0, 0.9)]
)
def test_sampled_pairs_follow_the_teacher(
    teacher, student, gamma, temperature, top_p
):
  """End to end: the first two sampled tokens, over many seeds, follow the
  teacher's joint distribution (chi-square), not the student's."""
  draws = 500
  counts = np.zeros((V, V))
  accepted = proposed = 0
  for seed in range(draws):
    result = spec.speculative_generate(
        teacher,
        student,
        PROMPT,
        2,
        gamma=gamma,
        temperature=temperature,
        top_p=top_p,
        key=jax.random.key(seed),
    )
    counts[result.tokens[0], result.tokens[1]] += 1
    accepted += result.accepted
    proposed += result.proposed
  assert 0.2 < accepted / proposed < 0.95  # both branches of the rule ran
  assert _chi2_p(counts, _joint(teacher, temperature, top_p)) > P_MIN
  assert _chi2_p(counts, _joint(student, temperature, top_p)) < P_MIN


def test_rejects_bad_arguments(teacher):
  other = Student(get_preset("tiny", vocab_size=V + 1), nnx.Rngs(0))
  with pytest.raises(ValueError, match="vocab"):
    spec.speculative_generate(teacher, other, PROMPT, 4)
  with pytest.raises(ValueError, match="gamma"):
    spec.speculative_generate(teacher, teacher, PROMPT, 4, gamma=0)
  with pytest.raises(ValueError, match="prompt"):
    spec.speculative_generate(teacher, teacher, [], 4)
