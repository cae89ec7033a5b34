r"""Generates text from a student run or the teacher, streamed as it comes.

    python -m distill.generate --workdir=/tmp/kd --run=sampled \
        --prompt="def fib(n):" --max_new_tokens=64 --temperature=0.8
    python -m distill.generate --workdir=/tmp/kd --teacher --prompt="import os"

Loads ``W/tokenizer.json`` and the model (``W/student/R/``, latest
checkpoint, or ``W/teacher/``, or any model folder with ``--model_dir``, such
as a quantised export ``W/export/R-int8/``); ``--run`` may be left out when
the workdir has exactly one run. The prompt is encoded after an end-of-sequence token
(documents are separated by EOS in training, so that is how a document
starts), and generation stops at EOS or ``--max_new_tokens``.
``--temperature=0`` is greedy. ``--config`` (the flag every binary shares)
is accepted and not needed.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import flags

# Importing the model packages registers their kinds with the registry
# (``--teacher`` loads the teacher's folder).
import student as student_lib  # pylint: disable=unused-import
import teacher as teacher_lib  # pylint: disable=unused-import
from data import tokenizer as tok
from distill.core import checkpoint, cli, layout, registry
from distill.decoding import generate as gen


class GenerateError(cli.UserError):
  """A generation that cannot run as asked; the message says what to do."""


def model_dir(
    workdir: str, run: str | None, teacher: bool, path: str | None = None
) -> str:
  """The model folder to load, or a GenerateError that says what exists.

  ``path``: any model folder (an export, e.g. ``W/export/R-int8/``)."""
  if teacher and run:
    raise GenerateError(
        "pass either --run=R (a student) or --teacher, not both"
    )
  if path and (run or teacher):
    raise GenerateError(
        "--model_dir names the model itself; leave out --run and --teacher"
    )
  if path:
    if not os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
      raise GenerateError(
          f"--model_dir={path} holds no {checkpoint.CONFIG_FILE}: pass a model"
          " folder (W/student/R, W/export/R, W/export/R-int8, ...)"
      )
    return path
  if teacher:
    path = layout.teacher_dir(workdir)
    if not os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
      raise GenerateError(
          f"no teacher in {workdir}: {path}/{checkpoint.CONFIG_FILE} is missing."
          " Run `python -m teacher.train` or `python -m teacher.import_hf` first"
      )
    return path
  runs = layout.list_runs(workdir)
  if run is not None:  # a run spec ("sampled@q=int8") or its folder
    run = layout.run_folder(run)
  if run is None:
    if len(runs) == 1:
      run = runs[0]
    else:
      raise GenerateError(
          "pass --run=R or --teacher; "
          + (
              f"runs in {workdir}/student: {', '.join(runs)}"
              if runs
              else f"{workdir}/student has no runs yet (run `python -m distill.train`)"
          )
      )
  if run not in runs:
    raise GenerateError(layout.missing_run_message(workdir, run))
  return layout.student_dir(workdir, run)


class TextStream:
  """Decodes the growing token list and writes only the new text.

  Byte-level BPE may split a character over tokens; text ending in an
  incomplete character (U+FFFD) is held back until the next token.
  """

  def __init__(self, tokenizer, out=sys.stdout):
    self.tokenizer, self.out = tokenizer, out
    self.ids: list[int] = []
    self.shown = 0

  def add(self, token: int, final: bool = False) -> None:
    self.ids.append(int(token))
    self.flush(final)

  def flush(self, final: bool = True) -> None:
    text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
    if not final and text.endswith("\ufffd"):
      return
    self.out.write(text[self.shown :])
    self.out.flush()
    self.shown = len(text)


def generate_text(
    workdir: str,
    prompt: str,
    *,
    run: str | None = None,
    teacher: bool = False,
    model_path: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    out=sys.stdout,
) -> str:
  """Streams ``prompt`` and its continuation to ``out``; returns the new text."""
  if not os.path.isdir(workdir):
    raise GenerateError(
        f"--workdir={workdir} is not a folder; pass the workdir"
        " the pipeline wrote"
    )
  if max_new_tokens < 1:
    raise GenerateError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or not 0 < top_p <= 1:
    raise GenerateError(
        f"need --temperature >= 0 and 0 < --top_p <= 1, got"
        f" {temperature} and {top_p}"
    )
  path = model_dir(workdir, run, teacher, model_path)
  tokenizer_path = layout.tokenizer_path(workdir)
  tokenizer = tok.load_tokenizer(tokenizer_path)
  eos = tok.special_ids(tokenizer)["eos"]
  model = registry.load_model(path)
  if tokenizer.get_vocab_size() > model.config.vocab_size:
    raise GenerateError(
        f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens but"
        f" the model in {path} only {model.config.vocab_size}; they were not"
        " trained together"
    )
  prompt_ids = [eos] + tokenizer.encode(prompt, add_special_tokens=False).ids
  out.write(prompt)
  out.flush()
  text = TextStream(tokenizer, out)
  for tokens in gen.stream(
      model,
      [prompt_ids],
      max_new_tokens,
      temperature=temperature,
      top_p=top_p,
      eos_id=eos,
      key=jax.random.key(seed),
  ):
    if tokens[0] >= 0:
      text.add(tokens[0])
  text.flush()
  out.write("\n")
  out.flush()
  return tokenizer.decode(text.ids, skip_special_tokens=True)


def _define_flags():
  # Defined only when run as a binary (importing adds no flags).
  flags.DEFINE_string(
      "run",
      None,
      "Student run: its spec (sampled@q=int8) or its folder under"
      " WORKDIR/student/ (sampled_qint8).",
  )
  flags.DEFINE_bool("teacher", False, "Generate with WORKDIR/teacher instead.")
  flags.DEFINE_string(
      "model_dir",
      None,
      "Any model folder instead (an export, e.g. WORKDIR/export/R-int8).",
  )
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 128, "Most tokens to generate.")
  flags.DEFINE_float(
      "temperature", 0.0, "0 = greedy; else sampling temperature."
  )
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS.workdir:
    raise GenerateError("--workdir is required: the folder the pipeline wrote")
  generate_text(
      flags.FLAGS.workdir,
      flags.FLAGS.prompt,
      run=flags.FLAGS.run,
      teacher=flags.FLAGS.teacher,
      model_path=flags.FLAGS.model_dir,
      max_new_tokens=flags.FLAGS.max_new_tokens,
      temperature=flags.FLAGS.temperature,
      top_p=flags.FLAGS.top_p,
      seed=flags.FLAGS.seed,
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
