"""Stage 2: pretrain the sparse MoE teacher on the prepared corpus.

    python -m teacher.train --config=experiments/stdlib.py --workdir=W

Writes ``W/teacher/`` (a model folder: ``config.json`` and orbax checkpoints
that include the data iterator state), ``metrics.jsonl``, TensorBoard events
and ``summary.json``. Resumes from the latest checkpoint; a finished run is
skipped. An imported teacher (``teacher.import_hf``) is never retrained;
an experiment that sets ``config.teacher.hf_dir`` imports that checkpoint
here instead of training (see experiments/hf_moe.py).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from data import pipeline
from data import tokenizer as tok
from distill.core import checkpoint as ckpt
from distill.core import cli, configs, layout, sharding
from distill.evals import validation
from distill.losses import chunked, terms
from distill.training import loop as trainer
from distill.core.errors import UserError
from teacher import config as teacher_config
from teacher import hf
from teacher.model import Teacher


def model_config(config, vocab_size: int) -> teacher_config.TeacherConfig:
  """The TeacherConfig of ``config.teacher`` for a tokenizer of ``vocab_size``."""
  return configs.from_preset(
      teacher_config.PRESETS,
      config.teacher.preset,
      config.teacher.model,
      what="teacher",
      vocab_size=vocab_size,
  )


def loop_config(config) -> trainer.LoopConfig:
  """The teacher's optimisation settings, ``config.teacher.train``."""
  loop = configs.from_section(
      trainer.LoopConfig,
      config.teacher.train,
      where="config.teacher.train",
      also=(
          "eval_batches",
          "loss_chunk",
          "short_steps",
          "short_seq_len",
          "short_batch_size",
      ),
  )
  return dataclasses.replace(loop, replay_check_every=config.replay_check_every)


def _check_same_model(out_dir: str, cfg: teacher_config.TeacherConfig) -> None:
  existing = ckpt.read_config(out_dir, kind="teacher")
  if existing.get("source") == "import_hf":
    return
  if ckpt.what_it_computes(existing["model"]) != ckpt.what_it_computes(cfg):
    raise UserError(
        f"{out_dir} holds a teacher with another configuration; training would"
        " mix the two. Use a new --workdir, or remove that folder to start over."
    )


def loss_fn_for(cfg: teacher_config.TeacherConfig, chunk_size: int):
  """Next-token CE plus the weighted router losses; MoE statistics as metrics."""

  def loss_fn(model, batch, step):
    del step  # No schedule on the loss itself.
    x = pipeline.model_inputs(batch)
    hidden, aux = model.hidden(x["inputs"], x["segment_ids"], x["positions"])
    ce = chunked.chunked_loss(
        hidden,
        model.logits_from_hidden,
        terms.cross_entropy_per_token,
        x["labels"],
        x["mask"],
        chunk_size,
    )
    loss = (
        ce
        + cfg.router_aux_loss_coef * aux["load_balancing_loss"]
        + cfg.router_z_loss_coef * aux["z_loss"]
    )
    metrics = {
        "ce": ce,
        "load_balancing_loss": aux["load_balancing_loss"],
        "z_loss": aux["z_loss"],
        "dropped_fraction": aux["dropped_fraction"],
        **expert_load_metrics(aux["expert_load"]),
    }
    return loss, metrics

  return loss_fn


def expert_load_metrics(expert_load: jax.Array) -> dict[str, jax.Array]:
  """Per-expert load statistics from routed assignments [layers, E].

  Every figure is a share of the layer's assignments relative to the uniform
  share 1/E (1.0 = an even load), so runs with different E compare:
  ``expert_load/NN`` is expert NN's, averaged over the MoE layers;
  ``expert_load_max_over_uniform`` / ``..._min_...`` are the busiest and the
  idlest expert's in each layer, averaged over layers.
  """
  load = expert_load.astype(jnp.float32)
  num_experts = load.shape[-1]
  if load.shape[0] == 0:  # No MoE layer.
    return {}
  relative = num_experts * load / jnp.maximum(load.sum(-1, keepdims=True), 1.0)
  per_expert = relative.mean(0)
  width = len(str(num_experts - 1))
  return {
      "expert_load_max_over_uniform": jnp.mean(relative.max(-1)),
      "expert_load_min_over_uniform": jnp.mean(relative.min(-1)),
      **{
          f"expert_load/{e:0{width}d}": per_expert[e]
          for e in range(num_experts)
      },
  }


def train(config, workdir: str) -> dict[str, Any]:
  """Runs the stage; returns the summary written to ``W/teacher/summary.json``.

  On the mesh of ``config.mesh`` (every device on ``fsdp`` by default).
  """
  with sharding.use(sharding.from_config(config)):
    return _train(config, workdir)


def _train(config, workdir: str) -> dict[str, Any]:
  out_dir = layout.teacher_dir(workdir)
  if os.path.isfile(os.path.join(out_dir, ckpt.CONFIG_FILE)):
    existing = ckpt.read_config(out_dir, kind="teacher")
    if existing.get("source") == "import_hf":
      print(
          f"teacher: {out_dir} was imported from {existing.get('hf_dir')};"
          " nothing to train."
      )
      return {"skipped": True, "imported": True}
  # a bad schedule is refused before anything is written
  phases = pipeline.row_phases(config)
  data_dir = layout.data_dir(workdir)
  tokenizer_path = layout.tokenizer_path(workdir)
  vocab_size = pipeline.prepared_vocab_size(workdir)
  cfg = model_config(config, vocab_size)
  if os.path.isfile(os.path.join(out_dir, ckpt.CONFIG_FILE)):
    _check_same_model(out_dir, cfg)
  else:
    ckpt.write_config(
        out_dir,
        "teacher",
        cfg,
        source="teacher.train",
        tokenizer_hash=tok.tokenizer_hash(tokenizer_path),
    )
  counts = teacher_config.param_counts(cfg)
  logging.info("Teacher %s: %s parameters", config.teacher.preset, counts)

  model = Teacher(cfg, rngs=nnx.Rngs(config.seed))
  loop = loop_config(config)
  data = config.data
  result = trainer.train(
      out_dir=out_dir,
      model=model,
      cfg=loop,
      desc="teacher",
      loss_fn=loss_fn_for(cfg, config.teacher.train.loss_chunk),
      make_iterator=lambda: _batches(config, data_dir, phases),
      eval_fn=validation.make_validation_fn(
          data_dir,
          seq_len=data.seq_len,
          batch_size=data.batch_size,
          max_batches=config.teacher.train.eval_batches,
          chunk_size=config.teacher.train.loss_chunk,
      ),
  )
  summary = trainer.summarize(out_dir, result, params=counts)
  if result.status == "finished":
    print(
        f"teacher: {result.step} steps, validation loss"
        f" {summary.get('eval/loss', float('nan')):.3f} nats/token"
    )
  return summary


def _batches(config, data_dir: str, phases) -> pipeline.Phases:
  data = config.data

  def make(seq_len: int, batch_size: int):
    return lambda: iter(
        pipeline.make_dataset(
            data_dir,
            "train",
            seq_len=seq_len,
            batch_size=batch_size,
            seed=config.seed,
            worker_count=data.worker_count,
            read_ahead=data.read_ahead,
        )
    )

  return pipeline.Phases(
      [(steps, make(seq, batch)) for steps, seq, batch in phases]
  )


def hf_dir_of(config) -> str | None:
  """The Hugging Face checkpoint the experiment imports, or None to train.

  An experiment that has the ``config.teacher.hf_dir`` key (hf_moe.py) must
  set it; only configs without the key train a teacher from scratch.
  """
  if "hf_dir" not in config.teacher:
    return None
  if not config.teacher.hf_dir:
    raise UserError(
        "This experiment distils an imported teacher: pass"
        " --config.teacher.hf_dir=/path/to/hf_checkpoint (a Mixtral,"
        " Qwen2-MoE, Qwen3-MoE or OLMoE folder with safetensors)."
    )
  return config.teacher.hf_dir


def stage(config, workdir: str):
  """The pipeline's teacher stage: import ``config.teacher.hf_dir`` if the
  experiment names a Hugging Face checkpoint, else pretrain from scratch."""
  hf_dir = hf_dir_of(config)
  if hf_dir:
    path = hf.import_hf(
        hf_dir,
        workdir,
        param_dtype=config.teacher.get("param_dtype") or None,
        dtype=config.teacher.get("dtype") or None,
        mesh=sharding.from_config(config),
        flag="--config.teacher.hf_dir",
    )
    print(f"teacher: imported {hf_dir} into {path}")
    return {"imported": hf_dir}
  return train(config, workdir)


def main(argv):
  config, workdir = cli.setup(argv)
  stage(config, workdir)


if __name__ == "__main__":
  cli.run(main)
