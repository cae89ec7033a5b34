"""How good a model's own text is, as the teacher judges it.

Validation loss scores a student on the corpus' tokens. When it generates,
it conditions on its own tokens instead, and small errors compound (exposure
bias): what on-policy distillation trains against. This measure looks at
that directly: the model continues held-out prompts, greedily and by
sampling at a temperature, and the teacher scores the continuations. The
figure is the teacher's mean log-probability per generated token (nats,
higher is better: the teacher finds the text more likely); the teacher's
own continuations give the reference.

Every continuation has exactly ``new_tokens`` tokens (no end-of-sequence
stop), made by the compiled KV-cache decoding
(``distill.decoding.generate.continuations``); the teacher scores prompt +
continuation in one forward pass. Sampling uses one fixed key, so two models
are compared on the same prompts and the same random draws.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill.decoding import generate as gen


@nnx.jit(static_argnames=("prompt_len",), graph_updates=False)
def continuation_log_probs(teacher, tokens, prompt_len: int) -> jax.Array:
  """The teacher's log-probability of each token after the prompt.

  tokens [B, P + G] int32 (P = ``prompt_len``) -> [B, G] float32.
  """
  logits = teacher(tokens[:, :-1])
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_p, tokens[:, 1:, None], axis=-1)[..., 0]
  return picked[:, prompt_len - 1 :]


def teacher_log_likelihood(
    teacher,
    model,
    prompts,
    new_tokens: int,
    *,
    temperature: float = 1.0,
    key: jax.Array | None = None,
) -> dict[str, Any]:
  """The teacher's mean log-likelihood of ``model``'s continuations.

  prompts: [B, P] token ids (equal lengths). Returns
  ``teacher_loglik_greedy`` and ``teacher_loglik_sampled`` (mean nats per
  generated token, at ``temperature`` for the sampled ones),
  ``model_loglik_sampled`` (the model's own, for context) and ``tokens``
  (generated tokens per figure).
  """
  prompts = jnp.asarray(np.asarray(prompts), jnp.int32)
  key = jax.random.key(0) if key is None else key
  width = prompts.shape[1]
  out: dict[str, Any] = {"tokens": int(prompts.shape[0] * new_tokens)}
  for name, temp in (("greedy", 0.0), ("sampled", temperature)):
    generated = gen.continuations(
        model, prompts, new_tokens, temperature=temp, key=key
    )
    tokens = jnp.concatenate([prompts, generated], axis=1)
    scores = continuation_log_probs(teacher, tokens, width)
    out[f"teacher_loglik_{name}"] = float(jnp.mean(scores))
    if name == "sampled":
      own = continuation_log_probs(model, tokens, width)
      out["model_loglik_sampled"] = float(jnp.mean(own))
  return out
