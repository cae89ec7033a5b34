"""Imports a Hugging Face MoE checkpoint as the teacher.

    python -m teacher.import_hf --hf_dir=/path/to/OLMoE-1B-7B-0924 --workdir=/tmp/kd

Reads Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE folders (config.json,
*.safetensors, tokenizer.json; nothing is executed, pickled weights are
refused) and writes ``WORKDIR/teacher/`` and ``WORKDIR/tokenizer.json``.
A finished import of the same folder is skipped. ``--config`` is accepted for
uniformity with the other stages and not needed.
"""

from absl import flags, logging

from distill.core import cli
from teacher import hf

_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "Local Hugging Face checkpoint folder."
)
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype",
    None,
    ["float32", "bfloat16", "float16"],
    "Stored parameter dtype (default: the checkpoint's).",
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "Compute dtype (default: float32 for float32 weights, else bfloat16).",
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace WORKDIR/teacher.")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _HF_DIR.value:
    raise cli.UserError("--hf_dir is required: the checkpoint folder to import")
  workdir = cli.check_workdir(flags.FLAGS.workdir)
  cli.start_processes()
  path = hf.import_hf(
      _HF_DIR.value,
      workdir,
      param_dtype=_PARAM_DTYPE.value,
      dtype=_DTYPE.value,
      overwrite=_OVERWRITE.value,
  )
  logging.info("Teacher written to %s", path)
  print(path)


if __name__ == "__main__":
  cli.run(main)
