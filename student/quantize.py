"""Quantised students through Qwix: weight-only int8, fp8 or int4, and int8
weights with int8 activations, after training (PTQ) or during it (QAT).

    q = quantize(student, "int8")            # PTQ: int8 codes + float scales
    q = quantize(student, "int8", qat=True)  # QAT: float weights, fake-quantised
    save(directory, q, step)                 # a model folder load_student reads

Every linear map of the blocks (``*_proj``) and the embedding table (also the
tied output head) are quantised per output channel ("absmax"). The attention
scores, norms and the logits' softmax stay in the compute dtype. Weight-only
schemes keep the activations as they are; Qwix dequantises the codes inside
the matmul, so they save memory (and memory-bound decode time on an
accelerator), not compute. ``int8_dynamic`` also quantises each matmul's
input on the fly (int8 x int8 products).

Qwix rewrites the einsums of the methods it is told to intercept; a student
runs through ``__call__``, ``hidden``, ``logits_from_hidden`` (training and
evaluation) and ``decode`` (generation), so all four are intercepted.
Quantisation runs on an unscanned, unrematerialised stack (the scanned stack
stacks per-block copies, which Qwix would quantise instead of the stored
weights); the quantised model keeps the config's settings for running.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from qwix._src import model as qwix_model  # method interception (qwix 0.1.8)

from distill.core import checkpoint
from distill.core.errors import ConfigError
from student.model import Student

#: Scheme -> (weight dtype, activation dtype or None).
SCHEMES: dict[str, tuple[Any, Any]] = {
    "int8": (jnp.int8, None),
    "fp8": (jnp.float8_e4m3fn, None),
    "int4": (jnp.int4, None),
    "int8_dynamic": (jnp.int8, jnp.int8),
}
#: What is quantised: every projection of the blocks, and the embedding.
MODULES = r".*_proj|embed"
#: The projections alone (the embedding stays float): what QAT trains, since
#: Qwix fake-quantises matmuls but not the embedding's row lookup.
PROJECTIONS = r".*_proj"
#: Methods a student is run through, all intercepted.
METHODS = ("__call__", "hidden", "logits_from_hidden", "decode")
#: The key of a quantised student's config.json that names its scheme.
CONFIG_KEY = "quantization"


def check_scheme(scheme: str) -> str:
  if scheme not in SCHEMES:
    raise ConfigError(
        f"unknown quantization {scheme!r}; expected one of {sorted(SCHEMES)}"
    )
  return scheme


def _provider(scheme: str, qat: bool, embedding: bool):
  weight, act = SCHEMES[check_scheme(scheme)]
  rule = qwix.QtRule(
      module_path=MODULES if embedding else PROJECTIONS,
      weight_qtype=weight,
      act_qtype=act,
  )
  return qwix.QtProvider([rule]) if qat else qwix.PtqProvider([rule])


def quantize(
    model: Student,
    scheme: str,
    *,
    qat: bool = False,
    embedding: bool | None = None,
) -> Student:
  """A quantised copy of ``model`` (PTQ), or with ``qat`` one that trains
  its float weights through fake quantisation (straight-through gradients).
  ``embedding``: quantise the embedding table too (default: yes for PTQ;
  QAT leaves it float, so its forward is the PTQ forward of the same
  weights with ``embedding=False``). ``model`` itself is not changed."""
  if embedding is None:
    embedding = not qat
  if qat and embedding:
    raise ConfigError(
        "QAT cannot quantise the embedding: its row lookup is not a matmul"
        " Qwix fake-quantises, so training and serving would differ"
    )
  provider = _provider(scheme, qat, embedding)
  config = model.config
  plain = dataclasses.replace(config, scan_layers=False, remat="none")
  graphdef, state = nnx.split(model)
  source = nnx.merge(graphdef, state)  # a copy; same arrays
  source.config = plain
  tokens = jnp.zeros((1, 1), jnp.int32)
  quantized = qwix.quantize_model(source, provider, tokens)
  cls = type(quantized)
  base = cls._unquantized_type  # pylint: disable=protected-access
  for name in METHODS[1:]:
    setattr(
        cls,
        name,
        qwix_model._apply_interceptors(  # pylint: disable=protected-access
            getattr(base, name),
            provider,
            output_transform=lambda out, n=name: provider.process_model_output(
                n, out
            ),
        ),
    )
  quantized.config = config
  quantized.quantization = scheme if embedding else f"{scheme}_projections"
  return quantized


def parse(name: str) -> tuple[str, bool]:
  """A model's ``quantization`` name -> (scheme, embedding quantised)."""
  scheme, _, rest = name.partition("_projections")
  del rest
  return check_scheme(scheme), not name.endswith("_projections")


def abstract(config, name: str) -> Student:
  """A PTQ student of ``config`` (quantised as ``name`` says, e.g. "int8" or
  "int8_projections") with abstract parameters (shapes only)."""
  scheme, embedding = parse(name)
  return nnx.eval_shape(
      lambda: quantize(
          Student(config, nnx.Rngs(0)), scheme, embedding=embedding
      )
  )


def weight_bytes(model: nnx.Module) -> int:
  """Bytes of the parameters as stored (int4 counted as half a byte)."""
  total = 0.0
  for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
    bits = 4 if leaf.dtype == jnp.int4 else 8 * leaf.dtype.itemsize
    total += leaf.size * bits / 8
  return int(total)


def trained_scheme(payload: dict[str, Any]) -> str | None:
  """The scheme a run folder's student trained through quantisation-aware
  (its settings' ``q``, from a ``q=...`` run spec), from its config.json
  ``payload``; None for a run trained in float."""
  return (payload.get("settings") or {}).get("q") or None


def save(directory: str, model: Student, step: int = 0, **extra) -> None:
  """Writes a PTQ student as a model folder: config.json names the scheme,
  the checkpoint holds the codes and scales."""
  checkpoint.write_config(
      directory,
      "student",
      model.config,
      **{CONFIG_KEY: model.quantization},
      **extra,
  )
  checkpoint.save_params(directory, model, step=step)


def load(directory: str, step: int | None = None) -> Student:
  """The PTQ student saved by ``save`` (``load_student`` calls this for a
  folder whose config.json names a quantization)."""
  payload = checkpoint.read_config(directory, kind="student")
  config = checkpoint.config_from_dict(Student.config_class, payload["model"])
  target = abstract(config, payload[CONFIG_KEY])
  return checkpoint.restore_params(directory, target, step)
