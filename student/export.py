r"""Exports a distilled student: ``W/student/R/`` -> ``W/export/R[-hf]/``.

    python -m student.export --workdir=/tmp/kd --run=sampled --format=hf
    python -m student.export --workdir=/tmp/kd --run=sampled --format=orbax \
        --dtype=bfloat16

``--run`` left out exports every run under ``W/student/``. ``--config`` (the
flag every binary shares) is accepted and not needed. ``--quantize=int8``
(or fp8, int4, int8_dynamic) writes the post-training quantised student
(``student.quantize``) to ``W/export/R-int8/``, an orbax folder that
``load_student`` reads; the Hugging Face format refuses it (transformers has
no loader for Qwix's codes).

``--format=orbax`` writes a params-only model folder (config.json + one
checkpoint step) to ``W/export/R/``; ``--format=hf`` writes a Hugging Face
Gemma 3 text folder with ``W/tokenizer.json`` to ``W/export/R-hf/``. Both
load with ``student.load_student``; the HF folder also with
``transformers.Gemma3ForCausalLM.from_pretrained``.

The folder is built under a temporary name and renamed when complete, so a
crash never leaves a half export under the final name. Rerunning with the same
source step, format and dtype does nothing; a newer step replaces the export.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import flags, logging
from flax import nnx

from data import student_vocab
from distill.core import checkpoint, cli, files, layout, stop
from student import hf, load_student, quantize
from student.model import abstract_student

FORMATS = ("orbax", "hf")
DTYPES = ("float32", "bfloat16")
EXPORT_INFO = "export.json"


class ExportError(cli.UserError):
  """An export that cannot run as asked; the message says what to do."""


def export(
    workdir: str,
    run: str,
    fmt: str = "orbax",
    dtype: str = "float32",
    quantization: str | None = None,
) -> str:
  """Exports run ``run`` of ``workdir``; returns the export folder.

  ``quantization`` (``student.quantize.SCHEMES``) writes the post-training
  quantised student instead (orbax only) to ``W/export/R-<scheme>/``.
  """
  if fmt not in FORMATS:
    raise ExportError(f"unknown format {fmt!r}; expected one of {FORMATS}")
  if dtype not in DTYPES:
    raise ExportError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
  if quantization is not None:
    if quantization not in quantize.SCHEMES:
      raise ExportError(
          f"unknown quantization {quantization!r}; expected one of"
          f" {sorted(quantize.SCHEMES)}"
      )
    if fmt == "hf":
      raise ExportError(
          "a quantised student exports as an orbax folder only: transformers"
          " has no loader for Qwix's int8/fp8/int4 codes and scales. Export"
          " --format=hf without --quantize (float32 or bfloat16) and quantise"
          " on the serving side, or use --format=orbax --quantize=..."
      )
  run = layout.run_folder(run)  # a run spec ("sampled@q=int8") or its folder
  source = layout.student_dir(workdir, run)
  if not os.path.isfile(os.path.join(source, checkpoint.CONFIG_FILE)):
    raise ExportError(layout.missing_run_message(workdir, run))
  step = checkpoint.latest_step(source)
  if step is None:
    raise ExportError(
        f"{source} has no complete checkpoint yet; let"
        " `python -m distill.train` save one, then export"
    )
  tokenizer_json = student_vocab.tokenizer_path(
      workdir, student_vocab.speaks_own(workdir, checkpoint.read_config(source))
  )
  if fmt == "hf" and not os.path.isfile(tokenizer_json):
    raise ExportError(
        f"{tokenizer_json} is missing; the Hugging Face export ships the"
        " tokenizer. Run `python -m data.prepare` for this workdir first"
    )

  final = layout.export_dir(workdir, run, fmt)
  if quantization is not None:
    final = f"{final}-{quantization}"
  info = {
      "format": fmt,
      "run": run,
      "step": step,
      "dtype": dtype,
      "source": os.path.abspath(source),
  }
  if quantization is not None:
    info["quantization"] = quantization
  if _read_info(final) == info:
    print(f"export: {final} already holds step {step} of {run}; nothing to do")
    return final
  stop.check("export", "the exports finished so far are kept")

  model = load_student(source)
  if fmt == "hf" and getattr(model, "quantization", None):
    raise ExportError(
        f"{run} was trained quantisation-aware ({model.quantization}); a"
        " quantised student exports as an orbax folder only (transformers"
        " has no loader for Qwix's codes): use --format=orbax"
    )
  logging.info(
      "exporting %s step %d as %s (%s) to %s", run, step, fmt, dtype, final
  )
  with files.atomic_dir(final) as tmp:  # Replaces an older export.
    if quantization is not None:
      quantize.save(tmp, quantize.quantize(model, quantization), step)
    elif getattr(model, "quantization", None):  # trained quantisation-aware
      quantize.save(tmp, model, step)
    elif fmt == "hf":
      hf.save_hf(tmp, model, tokenizer_json=tokenizer_json, dtype=dtype)
    else:
      _save_orbax(tmp, model, dtype, step)
    files.write_json(os.path.join(tmp, EXPORT_INFO), info, sort_keys=True)
  what = quantization or getattr(model, "quantization", None) or dtype
  print(f"export: {run} step {step} as {fmt} ({what}) -> {final}")
  return final


def export_all(config, workdir: str) -> list[str]:
  """The pipeline stage: every run with a checkpoint, in every format.

  ``config.export.formats`` / ``config.export.dtype`` when the experiment
  config has them; else both formats, float32.
  """
  settings = config.get("export", None) if config is not None else None
  formats = tuple(settings.get("formats", FORMATS)) if settings else FORMATS
  dtype = settings.get("dtype", "float32") if settings else "float32"
  runs = [
      r
      for r in layout.list_runs(workdir)
      if checkpoint.latest_step(layout.student_dir(workdir, r)) is not None
  ]
  if not runs:
    raise ExportError(
        f"{workdir}/student has no finished runs to export; run"
        " `python -m distill.train` first"
    )
  quantized = {r for r in runs if _trained_quantized(workdir, r)}
  return [
      export(workdir, run, fmt, dtype)
      for run in runs
      for fmt in formats
      if not (fmt == "hf" and run in quantized)  # orbax only (see export)
  ]


def _trained_quantized(workdir: str, run: str) -> bool:
  payload = checkpoint.read_config(layout.student_dir(workdir, run))
  return quantize.trained_scheme(payload) is not None


def _save_orbax(directory: str, model, dtype: str, step: int) -> None:
  config = dataclasses.replace(model.config, param_dtype=dtype)
  params = jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param))
  target = abstract_student(config)
  nnx.update(target, params)
  checkpoint.write_config(directory, "student", config)
  checkpoint.save_params(directory, target, step=step)


def _read_info(directory: str) -> dict | None:
  try:
    with open(os.path.join(directory, EXPORT_INFO), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _define_flags():
  # Defined only when run as a binary, so that importing export_all into the
  # main job adds no flags there.
  flags.DEFINE_string(
      "run",
      None,
      "Run to export: its spec as distill.train takes it (sampled@q=int8) or"
      " its folder under WORKDIR/student/ (sampled_qint8); default: all runs.",
  )
  flags.DEFINE_enum(
      "format",
      "orbax",
      FORMATS,
      "orbax: params-only model folder;"
      " hf: Hugging Face Gemma 3 text folder.",
  )
  flags.DEFINE_enum(
      "dtype", "float32", DTYPES, "Dtype of the exported parameters."
  )
  flags.DEFINE_enum(
      "quantize",
      None,
      sorted(quantize.SCHEMES),
      "Post-training quantisation (Qwix) of the exported student: int8, fp8"
      " or int4 weights, or int8_dynamic (int8 weights and activations);"
      " orbax format only, to W/export/R-<scheme>/.",
  )


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS.workdir or not os.path.isdir(flags.FLAGS.workdir):
    raise ExportError(
        f"--workdir={flags.FLAGS.workdir} is not a folder; pass the workdir"
        " the pipeline wrote (it holds student/<run>/)"
    )
  workdir = flags.FLAGS.workdir
  runs = [flags.FLAGS.run] if flags.FLAGS.run else layout.list_runs(workdir)
  if not runs:
    raise ExportError(
        f"{workdir}/student has no runs; run `python -m distill.train` first"
    )
  for run in runs:  # each export prints what it wrote
    export(
        workdir,
        run,
        flags.FLAGS.format,
        flags.FLAGS.dtype,
        flags.FLAGS.quantize,
    )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
