"""Run specs: what a distillation run learns from, as data.

A run of ``config.distill.runs`` is a preset name (``RUN_KINDS``), a preset
with some parts changed (``sampled@n=16``, ``on_policy@lam=0.5``), or every
part given (``mode=offline,target=topk,loss=ghost_kl,k=16``). Parts:

======  =====================================================================
mode    ce | online | offline | on_policy
target  offline and on_policy: the cached target read (topk, sample,
        topk_tail; label for alm); online: topk for the teacher's top-k
        computed on the fly
loss    the KD loss of that target (``LOSSES``), or dense (online)
k n m   how much of the cached target is read (``SIZES``)
q       quantisation-aware training in this scheme (``student.quantize``)
lam     on_policy: the share of steps trained on the student's own
        continuations (the rest on the offline target); default
        ``config.distill.on_policy.lam``
from    start from the finished run in this folder of ``W/student`` (e.g.
        ``sampled``) instead of random parameters; the run then trains for
        ``config.distill.continue_train``
feat    online: add feature distillation, ``cosine`` or ``mse``
        (``distill.features``)
seq     the length of the rows this run trains on (default
        ``config.data.seq_len``): e.g. short rows for a first run that a
        long-row continuation (``from``) extends. A run that reads the cache
        trains on the cache's rows, so its seq must be the cache's.
rope    the linear RoPE scaling factor of the student's global layers
        (``rope_global_scaling``) for this run: a long-row continuation
        scales its parent's positions (e.g. rope=8 for 8x longer rows,
        Gemma 3's recipe); local layers keep theirs
tok     the tokenizer the student speaks: ``own`` (the config's
        ``student.tokenizer``) or ``teacher``; default: own when the config
        gives the student one. Only ce and the cross-tokenizer runs (alm,
        vocab, and their online and top-k forms) can speak their own.
======  =====================================================================
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from data import cache
from distill import features
from distill.core.errors import UserError
from student import quantize


@dataclasses.dataclass(frozen=True)
class RunKind:
  """What a run learns from: its mode, cached target and KD loss, and how
  much of the cached target it reads (None: all of it; see
  ``data.cache.TargetView``)."""

  mode: str  # ce | online | offline | on_policy
  target: str | None = None  # offline: topk | sample | topk_tail
  # sparse_kl | ghost_kl | sampled_kl | topk_tail_kl | dense
  loss: str | None = None
  k: int | None = None  # topk: the first k of the cached k ids
  n: int | None = None  # sample: n of the cached N draws
  m: int | None = None  # topk_tail: m of the cached M tail draws
  # Quantisation-aware: train through fake quantisation of this scheme
  # (``student.quantize``); the run's folder then loads quantised.
  q: str | None = None
  lam: float | None = None  # on_policy: share of on-policy steps
  init: str | None = None  # spec part "from": the run folder it starts from
  feat: str | None = None  # online: feature distillation's kind
  seq: int | None = None  # the rows' length (default config.data.seq_len)
  rope: float | None = None  # global layers' RoPE scaling factor
  tok: str | None = None  # own | teacher (default: the config's)

  def settings(self) -> dict[str, Any]:
    """The run's parts as its folder records them (unset optional parts
    left out, so folders made before a part existed still match)."""
    parts = dataclasses.asdict(self)
    return {
        key: value
        for key, value in parts.items()
        if value is not None or key not in OPTIONAL
    }

  def view(self, seed: int) -> cache.TargetView | None:
    if self.k is None and self.n is None and self.m is None:
      return None
    return cache.TargetView(self.k, self.n, self.m, seed)

  @property
  def reads_cache(self) -> bool:
    """Whether its batches come from the logit cache (with a target)."""
    return self.mode in ("offline", "on_policy") and self.target is not None

  @property
  def cross_tokenizer(self) -> bool:
    """Whether it learns from the teacher through the text's bytes alone
    (so it works whatever the student's tokenizer)."""
    return self.loss in CROSS_TOKENIZER_LOSSES

  @property
  def any_tokenizer(self) -> bool:
    """Whether a student with its own tokenizer can train it: the other
    runs read the teacher's distribution over the teacher's vocabulary."""
    return self.mode == "ce" or self.cross_tokenizer

  @property
  def needs_teacher(self) -> bool:
    """Whether the teacher runs inside its training step."""
    return self.mode in ("online", "on_policy")


#: The size each offline target can be read at (``RunKind`` fields).
SIZES = {"k": "topk", "n": "sample", "m": "topk_tail"}
#: Parts a run spec may leave out (not recorded when unset).
OPTIONAL = (*SIZES, "q", "lam", "init", "feat", "seq", "rope", "tok")
#: The KD losses each target (offline) or mode (online) can train with.
LOSSES = {
    "label": ("alm",),
    "topk": ("ghost_kl", "sparse_kl", "vocab_uld"),
    "sample": ("sampled_kl", "vocab_uld"),
    "topk_tail": ("topk_tail_kl",),
}

#: Named runs (presets); a run spec can start from one and change its parts.
RUN_KINDS = {
    "ce": RunKind("ce"),
    "online": RunKind("online", loss="dense"),
    "online_topk": RunKind("online", "topk", "ghost_kl"),
    "sampled": RunKind("offline", "sample", "sampled_kl"),
    "topk_ghost": RunKind("offline", "topk", "ghost_kl"),
    "topk_sparse": RunKind("offline", "topk", "sparse_kl"),
    "topk_tail": RunKind("offline", "topk_tail", "topk_tail_kl"),
    # On its own samples, mixed by lam with the sampled offline target.
    "on_policy": RunKind("on_policy", "sample", "sampled_kl"),
    # Across tokenizers: the student's likelihood of each chunk of text
    # both tokenizations end at matches the teacher's (distill.losses.alm).
    "alm": RunKind("offline", "label", "alm"),
    # Across tokenizers: the teacher's sample (or top-k) projected onto the
    # student's tokens through the student's tokenization of each teacher
    # token, ULD on what cannot be (distill.losses.vocab).
    "vocab": RunKind("offline", "sample", "vocab_uld"),
    "vocab_topk": RunKind("offline", "topk", "vocab_uld"),
    # The same two with the teacher in the loop (no cache).
    "online_alm": RunKind("online", loss="alm"),
    "online_vocab": RunKind("online", "topk", "vocab_uld"),
}

#: The (target, loss) pairs an online run can take.
ONLINE = (
    (None, "dense"),
    ("topk", "ghost_kl"),
    (None, "alm"),
    ("topk", "vocab_uld"),
)

#: The losses that learn from the teacher through the text's bytes, so that
#: the student may speak another tokenizer.
CROSS_TOKENIZER_LOSSES = ("alm", "vocab_uld")

_KEYS = (
    "mode", "target", "loss", "q", "lam", "from", "feat", "seq", "rope", "tok",
    *SIZES,
)  # fmt: skip
_FOLDER = re.compile(r"[A-Za-z0-9_.-]+")


def parse_spec(run: str) -> tuple[str | None, dict[str, str]]:
  """A run spec's preset and its parts as written, in order.

  "sampled@n=16,from=sampled" -> ("sampled", {"n": "16", "from":
  "sampled"}); a spec that gives every part has no preset (None). The
  inverse of ``write_spec``. Raises UserError for an unknown preset or a
  part that is not key=value with a known key; the values are checked by
  ``run_kind``.
  """
  preset, _, rest = run.partition("@")
  if "=" in preset:  # every part given
    preset, rest = None, run
  if preset is not None and preset not in RUN_KINDS:
    raise UserError(
        f"Unknown distillation run {run!r}; the named runs are"
        f" {sorted(RUN_KINDS)}, and a run may change their parts"
        " (e.g. 'sampled@n=16') or give them all"
        " ('mode=offline,target=topk,loss=sparse_kl,k=8')."
    )
  parts = {}
  for item in rest.split(",") if rest else ():
    key, eq, value = item.partition("=")
    if not eq or key not in _KEYS:
      raise UserError(
          f"Run {run!r}: {item!r} is not key=value with a key of"
          f" {', '.join(_KEYS)}."
      )
    parts[key] = value
  return preset, parts


def write_spec(preset: str | None, parts: dict[str, Any]) -> str:
  """The run spec of a preset with these parts changed (``preset`` None:
  every part given); ``write_spec(*parse_spec(spec)) == spec``."""
  written = ",".join(f"{key}={value}" for key, value in parts.items())
  if preset is None:
    return written
  return preset + ("@" + written if written else "")


def without_part(run: str, key: str) -> str:
  """The spec with one part left out ("sampled@q=int4,from=sampled", "q" ->
  "sampled@from=sampled")."""
  preset, parts = parse_spec(run)
  parts.pop(key, None)
  return write_spec(preset, parts)


def run_kind(run: str) -> RunKind:
  """The RunKind a run spec names.

  A spec is a preset name (``RUN_KINDS``: "sampled"), a preset with some
  parts changed ("sampled@n=16", "on_policy@from=sampled"), or every part
  given ("mode=offline,target=sample,loss=sampled_kl,n=8"); the parts are
  in the module docstring. Raises UserError naming what is wrong.
  """
  preset, given = parse_spec(run)
  if preset is not None and not given:
    return RUN_KINDS[preset]
  parts = dataclasses.asdict(RUN_KINDS[preset]) if preset else {}
  for key, value in given.items():
    parts["init" if key == "from" else key] = _part(run, key, value)
  if "mode" not in parts:
    raise UserError(
        f"Run {run!r}: give its mode (ce, online, offline or on_policy)"
    )
  kind = RunKind(**parts)
  check_kind(run, kind)
  return kind


def _part(run: str, key: str, value: str) -> Any:
  if key in SIZES:
    if not value.isdigit() or int(value) < 1:
      raise UserError(f"Run {run!r}: {key}={value!r} must be an integer >= 1")
    return int(value)
  if key == "seq":
    if not value.isdigit() or int(value) < 2:
      raise UserError(f"Run {run!r}: seq={value!r} must be an integer >= 2")
    return int(value)
  if key == "rope":
    try:
      factor = float(value)
    except ValueError:
      factor = 0.0
    if not factor >= 1.0:
      raise UserError(f"Run {run!r}: rope={value!r} must be a number >= 1")
    return factor
  if key == "lam":
    try:
      lam = float(value)
    except ValueError:
      lam = -1.0
    if not 0.0 <= lam <= 1.0:
      raise UserError(f"Run {run!r}: lam={value!r} must be a number in [0, 1]")
    return lam
  if key == "tok" and value not in ("own", "teacher"):
    raise UserError(f"Run {run!r}: tok={value!r} must be own or teacher")
  if key == "from" and not _FOLDER.fullmatch(value):
    raise UserError(
        f"Run {run!r}: from={value!r} must name a run folder under"
        " W/student (letters, digits, '_', '-', '.'), e.g. from=sampled"
    )
  return value


def check_kind(run: str, kind: RunKind) -> None:
  """Raises UserError when the parts of ``kind`` do not fit together."""
  bad = lambda why: UserError(f"Run {run!r}: {why}")
  if kind.q is not None and kind.q not in quantize.SCHEMES:
    raise bad(f"q={kind.q!r}; use one of {sorted(quantize.SCHEMES)}")
  if kind.mode not in ("ce", "online", "offline", "on_policy"):
    raise bad(f"mode={kind.mode!r}; use ce, online, offline or on_policy")
  if kind.lam is not None and kind.mode != "on_policy":
    raise bad("lam mixes on-policy steps in; it needs mode=on_policy")
  if kind.feat is not None:
    if kind.mode != "online":
      raise bad("feat (feature distillation) needs mode=online")
    if kind.feat not in features.KINDS:
      raise bad(f"feat={kind.feat!r}; use {' or '.join(features.KINDS)}")
  sizes = [key for key in SIZES if getattr(kind, key) is not None]
  if kind.mode == "ce":
    if kind.target or kind.loss or sizes:
      raise bad(
          "a ce run learns from labels only; give no target, loss or size"
      )
    return
  if kind.mode == "online":
    if (kind.target, kind.loss) not in ONLINE:
      raise bad(
          "an online run uses loss=dense or alm, or target=topk with"
          " ghost_kl or vocab_uld"
      )
    if sizes:
      raise bad("an online run reads no cache; give no k, n or m")
    return
  if kind.tok == "own" and not kind.any_tokenizer:
    raise bad(
        "tok=own: only ce and alm runs can speak the student's own"
        " tokenizer; the others learn the teacher's distribution over its"
        " vocabulary"
    )
  if kind.target == "label" and kind.mode != "offline":
    raise bad("target=label (alm) reads the cache: it needs mode=offline")
  if kind.loss == "vocab_uld" and kind.mode not in ("offline", "online"):
    raise bad("loss=vocab_uld needs mode=offline (the cache) or online")
  if kind.mode == "on_policy" and kind.target is None:
    if kind.loss or sizes:
      raise bad(
          "an on_policy run without a cached target (every step on-policy)"
          " gives no loss or size"
      )
    return
  if kind.target not in LOSSES:
    raise bad(f"target={kind.target!r}; use one of {sorted(LOSSES)}")
  if kind.loss not in LOSSES[kind.target]:
    raise bad(
        f"loss={kind.loss!r} does not fit target={kind.target!r};"
        f" use {' or '.join(LOSSES[kind.target])}"
    )
  for key in sizes:
    if SIZES[key] != kind.target:
      raise bad(f"{key} sizes a {SIZES[key]} target, not {kind.target}")
