"""Speculative decoding: the student drafts, the teacher verifies (batch 1).

One round, with n tokens committed so far (prompt + output):

1. The student, from its KV cache, drafts gamma tokens d_1..d_gamma (and, when
   sampling, keeps its distributions q_1..q_gamma).
2. The teacher runs ONE forward pass over [x_{n-1}, d_1, ..., d_gamma] at
   positions n-1..n-1+gamma with its KV cache, which gives its distributions
   p_1..p_{gamma+1} for positions n..n+gamma.
3. Greedy: accept the longest prefix of drafts equal to the teacher's argmax,
   then append the teacher's argmax at the first mismatch (or the bonus token
   after gamma accepted drafts). The output is exactly the teacher's greedy
   output. Sampling (Leviathan et al. 2023, Chen et al. 2023): accept d_i with
   probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from
   norm(max(0, p_i - q_i)); if all are accepted, draw the bonus token from
   p_{gamma+1}. The output then follows the teacher's distribution (with the
   same temperature and top-p applied to p and q).

Rejected tokens are rolled back without touching the caches: a decode call
never sees cache entries at or after its first position, and the local
(sliding-window) layers' rings have ``gamma`` extra slots so that the writes
of rejected tokens never overwrite keys the window still needs (see
``distill.nn.attention``).

After the two prefills (each model's cache gets the prompt but its last
token), every round runs on the device in one jitted ``jax.lax.while_loop``
whose carry holds both caches, the committed tokens (a buffer of the caches'
max_len), their count, the round number (from 1; round r draws its keys from
``fold_in(fold_in(key, r), 0)`` for drafting and ``..., 1)`` for
verification) and the accepted count; it stops at ``max_new_tokens`` new
tokens or ``eos_id``, and the host reads the result once. Every shape in it
is fixed (the student's first call of a round takes the last two committed
tokens, re-feeding one that may already be cached; after a one-token prompt
the first of them is padding), so it compiles once per pair of models,
gamma, greedy or not and max_len bucket, not per round or call.

    result = speculative_generate(teacher, student, prompt, 64, gamma=4)
    result.tokens, result.acceptance_rate, result.tokens_per_teacher_call
    compare(teacher, student, prompt, 64, gamma=4)   # + teacher-only timing
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.decoding import generate as gen
from distill.decoding import sampling
from distill.decoding import speed as decode_speed


@dataclasses.dataclass
class SpeculativeResult:
  """What one speculative generation produced and cost.

  tokens: the new tokens (at most max_new_tokens; ends at eos_id if it came).
  proposed / accepted: drafted tokens the teacher checked / accepted.
  teacher_calls: verification passes (the prompt's prefill not counted).
  draft_calls: student forward passes while drafting (prefill not counted).
  wall_s: seconds of the whole generation, prefill included.
  """

  tokens: list[int]
  proposed: int
  accepted: int
  teacher_calls: int
  draft_calls: int
  wall_s: float

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / max(self.proposed, 1)

  @property
  def tokens_per_teacher_call(self) -> float:
    return len(self.tokens) / max(self.teacher_calls, 1)

  def to_dict(self) -> dict[str, Any]:
    return {
        "tokens": list(self.tokens),
        "proposed": self.proposed,
        "accepted": self.accepted,
        "teacher_calls": self.teacher_calls,
        "draft_calls": self.draft_calls,
        "wall_s": self.wall_s,
        "acceptance_rate": self.acceptance_rate,
        "tokens_per_teacher_call": self.tokens_per_teacher_call,
    }


# ----------------------------------------------------------------------------
# One round, in two halves (traced inside the loop below)


def _draft(
    model,
    cache,
    tokens,
    positions,
    key,
    round_,
    temperature,
    top_p,
    *,
    gamma: int,
    greedy: bool,
    nucleus: bool,
):
  """Student drafts gamma tokens after the chunk tokens/positions [1, c].

  -> drafts [gamma] int32, q [gamma, V] (the draft distributions; zeros
  when greedy), cache.
  """
  keys = jax.random.split(
      jax.random.fold_in(jax.random.fold_in(key, round_), 0), gamma
  )

  def choose(logits, k):  # logits [1, V]
    if greedy:
      return sampling.pick(
          logits, k, temperature, top_p, greedy=True, nucleus=False
      ), jnp.zeros_like(logits)
    q = sampling.sampling_probs(logits, temperature, top_p, nucleus=nucleus)
    return jax.random.categorical(k, jnp.log(q), axis=-1).astype(jnp.int32), q

  logits, cache = model.decode(tokens, cache, positions)
  first, q0 = choose(logits[:, -1], keys[0])
  pos0 = positions[:, -1] + 1

  def body(carry, xs):
    cache, token, pos = carry
    k = xs
    logits, cache = model.decode(token[:, None], cache, pos[:, None])
    nxt, q = choose(logits[:, 0], k)
    return (cache, nxt, pos + 1), (nxt, q)

  (cache, _, _), (rest, qs) = jax.lax.scan(body, (cache, first, pos0), keys[1:])
  drafts = jnp.concatenate([first, rest[:, 0]])
  q = jnp.concatenate([q0, qs[:, 0]], axis=0)
  return drafts, q, cache


def _verify(
    model,
    cache,
    last,
    drafts,
    q,
    position,
    key,
    round_,
    temperature,
    top_p,
    *,
    greedy: bool,
    nucleus: bool,
):
  """Teacher checks the drafts in one pass.

  last: the last committed token (scalar), drafts [gamma], q [gamma, V],
  position: the last token's position -> (accepted count a (), [the a
  accepted drafts, the next token, -1 padding] int32 [gamma + 1], cache).
  """
  gamma = drafts.shape[0]
  key = jax.random.fold_in(jax.random.fold_in(key, round_), 1)
  tokens = jnp.concatenate([last[None], drafts])[None]  # [1, gamma+1]
  positions = position + jnp.arange(gamma + 1, dtype=jnp.int32)[None]
  logits, cache = model.decode(tokens, cache, positions)
  logits = logits[0]  # [gamma+1, V]
  if greedy:
    choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    ok = drafts == choice[:gamma]
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    token = choice[accepted]
  else:
    p = sampling.sampling_probs(logits, temperature, top_p, nucleus=nucleus)
    accepted, token = accept_reject(key, p, q, drafts)
  i = jnp.arange(gamma + 1)
  committed = jnp.where(
      i < accepted, jnp.append(drafts, 0), jnp.where(i == accepted, token, -1)
  )
  return accepted.astype(jnp.int32), committed.astype(jnp.int32), cache


def accept_reject(
    key: jax.Array, p: jax.Array, q: jax.Array, drafts: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The speculative sampling rule for one round.

  p [gamma+1, V] teacher probabilities, q [gamma, V] draft probabilities,
  drafts [gamma] (drawn from q) -> (accepted count a in [0, gamma], the
  token that follows the accepted drafts: drawn from norm(max(0, p_a -
  q_a)) after a rejection, from p_gamma (the bonus) when all are accepted).
  """
  gamma = drafts.shape[0]
  k_accept, k_token = jax.random.split(key)
  idx = jnp.arange(gamma)
  p_d = p[idx, drafts]
  q_d = q[idx, drafts]
  u = jax.random.uniform(k_accept, (gamma,))
  ok = u * q_d < p_d  # u < min(1, p/q)
  accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
  q_ext = jnp.concatenate([q, jnp.zeros_like(p[:1])])  # bonus: p - 0 = p
  residual = jnp.maximum(p[accepted] - q_ext[accepted], 0.0)
  total = jnp.sum(residual)
  # total == 0 only if p == q there, when a rejection cannot happen.
  residual = jnp.where(
      total > 0, residual / jnp.maximum(total, 1e-30), p[accepted]
  )
  token = jax.random.categorical(k_token, jnp.log(residual)).astype(jnp.int32)
  return accepted, token


# ----------------------------------------------------------------------------
# The loop


@gen.per_model(
    static_argnames=("gamma", "greedy", "nucleus"),
    donate_argnames=("t_cache", "s_cache"),
)
def _rounds(
    t_graph,
    s_graph,
    t_state,
    s_state,
    t_cache,
    s_cache,
    seq,
    n,
    max_new_tokens,
    eos_id,
    key,
    temperature,
    top_p,
    *,
    gamma: int,
    greedy: bool,
    nucleus: bool,
):
  """Every round of one generation in one while loop (batch 1).

  ``_rounds(t_graph, s_graph)(...)``. seq [L] int32: the prompt, then room
  (L = the caches' max_len); n: the prompt's length; the caches hold the
  prompt but its last token. Rounds run until ``max_new_tokens`` tokens
  follow the prompt or one of them is eos_id (-1: none).
  -> (seq with the committed tokens after the prompt, n: their end, rounds,
  accepted drafts, the caches).
  """
  teacher, student = nnx.merge(t_graph, t_state), nnx.merge(s_graph, s_state)
  prompt_len = n

  def body(carry):
    t_cache, s_cache, seq, n, round_, accepted, _ = carry
    round_ = round_ + 1
    # The student gets the last two committed tokens (it may hold the
    # first; it lacks the last). With one, the first column is padding.
    at = n - 2 + jnp.arange(2, dtype=jnp.int32)
    chunk = jnp.where(at >= 0, seq[jnp.maximum(at, 0)], 0)[None]
    positions = jnp.where(at >= 0, at, -1)[None]
    drafts, q, s_cache = _draft(
        student,
        s_cache,
        chunk,
        positions,
        key,
        round_,
        temperature,
        top_p,
        gamma=gamma,
        greedy=greedy,
        nucleus=nucleus,
    )
    a, committed, t_cache = _verify(
        teacher,
        t_cache,
        seq[n - 1],
        drafts,
        q,
        n - 1,
        key,
        round_,
        temperature,
        top_p,
        greedy=greedy,
        nucleus=nucleus,
    )
    seq = jax.lax.dynamic_update_slice(seq, committed, (n,))
    eos = jnp.any((committed == eos_id) & (jnp.arange(gamma + 1) <= a))
    n = n + a + 1
    stop = eos | (n - prompt_len >= max_new_tokens)
    return t_cache, s_cache, seq, n, round_, accepted + a, stop

  zero = jnp.int32(0)
  start = (t_cache, s_cache, seq, n, zero, zero, max_new_tokens <= 0)
  t_cache, s_cache, seq, n, rounds, accepted, _ = jax.lax.while_loop(
      lambda carry: ~carry[-1], body, start
  )
  # The caches are returned so that their donated buffers are updated in
  # place rather than copied into the loop.
  return seq, n, rounds, accepted, t_cache, s_cache


def _fill(model, tokens: list[int], max_len: int, rollback: int):
  """A cache holding ``tokens`` at positions 0.. (parts of a model, cache)."""
  graphdef, state = nnx.split(model)
  if tokens:
    array, positions = gen.left_pad([tokens], gen.PROMPT_BUCKET)
    _, cache = gen.prefill(graphdef)(
        state, array, positions, max_len=max_len, rollback=rollback
    )
  else:
    cache = model.init_cache(1, max_len, rollback=rollback)
  return graphdef, state, cache


def speculative_generate(
    teacher: nnx.Module,
    student: nnx.Module,
    prompt_tokens: Sequence[int],
    max_new_tokens: int,
    *,
    gamma: int = 4,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    key: jax.Array | None = None,
) -> SpeculativeResult:
  """Generates with the student drafting ``gamma`` tokens per teacher call.

  prompt_tokens: one prompt (ints, at least one). Greedy (temperature 0)
  returns exactly the teacher's greedy tokens; sampling follows the
  teacher's distribution at this temperature and top-p. Any two models with
  ``init_cache`` / ``decode`` and the same vocabulary work (the drafter may
  be the teacher itself). Three device calls: the two prefills, then every
  round in one compiled loop.
  """
  start = time.perf_counter()
  prompt = [int(t) for t in np.asarray(prompt_tokens).reshape(-1)]
  if not prompt:
    raise ValueError(
        "the prompt needs at least one token (e.g. the BOS/EOS id)"
    )
  if gamma < 1:
    raise ValueError(f"gamma={gamma} must be >= 1")
  vt, vs = teacher.config.vocab_size, student.config.vocab_size
  if vt != vs:
    raise ValueError(
        f"teacher vocab {vt} != student vocab {vs}: the drafter must"
        " share the teacher's tokenizer and vocabulary"
    )
  greedy = temperature <= 0
  key = jax.random.key(0) if key is None else key
  # A round starts short of max_new_tokens and commits up to gamma + 1.
  max_len = gen.round_up(
      len(prompt) + max_new_tokens + gamma + 1, gen.LENGTH_BUCKET
  )
  t_graph, t_state, t_cache = _fill(teacher, prompt[:-1], max_len, gamma)
  s_graph, s_state, s_cache = _fill(student, prompt[:-1], max_len, gamma)
  seq = np.zeros(max_len, np.int32)
  seq[: len(prompt)] = prompt
  seq, n, rounds, accepted, _, _ = _rounds(t_graph, s_graph)(
      t_state,
      s_state,
      t_cache,
      s_cache,
      seq,
      len(prompt),
      max_new_tokens,
      -1 if eos_id is None else eos_id,
      key,
      np.float32(max(temperature, 1e-6)),
      np.float32(top_p),
      gamma=gamma,
      greedy=greedy,
      nucleus=sampling.nucleus_for(top_p),
  )
  out = np.asarray(seq)[len(prompt) : int(n)][:max_new_tokens].tolist()
  if eos_id in out:
    out = out[: out.index(eos_id) + 1]
  rounds = int(rounds)
  return SpeculativeResult(
      out,
      proposed=gamma * rounds,
      accepted=int(accepted),
      teacher_calls=rounds,
      draft_calls=gamma * rounds,
      wall_s=time.perf_counter() - start,
  )


def teacher_baseline(
    teacher: nnx.Module,
    prompt_tokens: Sequence[int],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
  """The teacher's own greedy generation, timed: {"tokens", "wall_s"}.

  One warm-up run (compilation), then the median wall time of ``repeats``
  runs. ``compare`` takes it as ``baseline`` so several drafters share it.
  """
  seconds, tokens = decode_speed.median_time(
      lambda: gen.generate(
          teacher, [list(prompt_tokens)], max_new_tokens, eos_id=eos_id
      )[0],
      repeats,
  )
  return {"tokens": tokens, "wall_s": seconds}


def compare(
    teacher: nnx.Module,
    student: nnx.Module,
    prompt_tokens: Sequence[int],
    max_new_tokens: int,
    *,
    gamma: int = 4,
    eos_id: int | None = None,
    repeats: int = 3,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """Greedy speculative decoding against the teacher alone, timed the same way.

  Both run once to warm up (compile), then ``repeats`` times; the medians
  are compared (``baseline``: a ``teacher_baseline`` of the same prompt and
  length, to reuse). Returns the speculative statistics, "teacher_wall_s",
  "speculative_wall_s", "speedup" (teacher / speculative wall time),
  "teacher_tokens" and "matches_teacher" (the speculative output equals the
  teacher's greedy output).
  """
  if baseline is None:
    baseline = teacher_baseline(
        teacher, prompt_tokens, max_new_tokens, eos_id=eos_id, repeats=repeats
    )

  spec_s, result = decode_speed.median_time(
      lambda: speculative_generate(
          teacher,
          student,
          prompt_tokens,
          max_new_tokens,
          gamma=gamma,
          eos_id=eos_id,
      ),
      repeats,
  )
  return {
      **result.to_dict(),
      "gamma": gamma,
      "teacher_wall_s": baseline["wall_s"],
      "speculative_wall_s": spec_s,
      "speedup": baseline["wall_s"] / spec_s,
      "teacher_tokens": baseline["tokens"],
      "matches_teacher": result.tokens == baseline["tokens"],
  }
