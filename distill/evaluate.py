"""Stage 5: compare the teacher, the distilled students and the CE baseline.

    python -m distill.evaluate --config=experiments/stdlib.py --workdir=W

For the teacher and every run under ``W/student/`` (their latest
checkpoints), on the validation split: loss and perplexity, KL(teacher ||
model) over the full vocabulary, top-1 agreement with the teacher, expected
calibration error, parameters (total and active), KV-cache bytes per token at
several context lengths, prefill and decode tokens/s (batch 1 and 8),
speculative decoding with each student drafting for the teacher, and the
teacher's log-likelihood of each model's own greedy and sampled
continuations of held-out prompts (``distill.evals.generation``). For the
logit cache: bytes per cached token of each method and the time it took.

Writes ``W/eval/report.json`` (every number), ``W/eval/report.md`` (tables a
person reads) and PNG plots: validation loss over training for every run, and
quality against decode speed. A report whose inputs (the checkpoints) have not
changed is not computed again.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
from absl import logging
from flax import nnx
from tqdm import tqdm

# Importing the model packages registers their kinds with the registry.
import student as student_lib  # pylint: disable=unused-import
import teacher as teacher_lib  # pylint: disable=unused-import
from data import cache, pipeline, student_vocab, token_bytes
from data import tokenizer as tok
from distill import runs as run_specs
from distill import speculative as spec
from distill.core import checkpoint as ckpt
from distill.core import cli, files, layout, registry, sharding, stop
from distill.core.errors import UserError
from distill.decoding import speed as decode_speed
from distill.evals import cache_size, generation, headline, metrics, plots
from distill.evals import report, targets
from distill.evals import validation
from student import quantize
from teacher.config import runtime_settings


def model_folders(workdir: str) -> dict[str, str]:
  """``{"teacher": path, "<run>": path, ...}`` of the folders with a checkpoint."""
  folders = {}
  teacher_dir = layout.teacher_dir(workdir)
  if ckpt.latest_step(teacher_dir) is not None:
    folders["teacher"] = teacher_dir
  for run in layout.list_runs(workdir):
    path = layout.student_dir(workdir, run)
    if ckpt.latest_step(path) is not None:
      folders[run] = path
  return folders


def validation_prompts(
    workdir: str, count: int, length: int
) -> list[list[int]]:
  """Prompts from the held-out split: EOS then the first ``length - 1`` tokens
  of each of the first ``count`` validation documents that are that long
  (a document starts after an EOS in training, so that is how prompts start).
  """
  directory = pipeline.tokens_dir(layout.data_dir(workdir), "validation")
  stream = pipeline.load_stream(directory)
  offsets = stream.doc_offsets()
  eos = tok.special_ids(tok.load_tokenizer(layout.tokenizer_path(workdir)))[
      "eos"
  ]
  prompts = []
  for start, end in zip(offsets[:-1], offsets[1:]):
    if len(prompts) == count:
      break
    if end - start > length:
      prompts.append(
          [eos] + [int(t) for t in stream.tokens(start, start + length - 1)]
      )
  if not prompts:
    raise UserError(
        f"No validation document under {directory} is longer than"
        f" {length} tokens; lower config.eval.speculative.prompt_len."
    )
  return prompts


def speed(model, e) -> dict[str, dict[str, float]]:
  """Prefill and decode tokens/s at each of ``e.batch_sizes`` (``config.eval.speed``)."""
  return {
      f"batch_{b}": decode_speed.measure_speed(
          model, e.prompt_len, e.new_tokens, b, repeats=e.repeats
      )
      for b in e.batch_sizes
  }


def speculative_figures(teacher, student, prompts, baselines, e) -> list[dict]:
  """Greedy speculative decoding with ``student`` drafting, per gamma.

  ``e`` is ``config.eval.speculative``; ``baselines`` the teacher's own
  timed generations of the same prompts (``speculative.teacher_baseline``).

  Summed over the prompts: acceptance = accepted / proposed drafts, tokens
  per teacher call, speed-up = teacher-alone time / speculative time, and
  whether every output equals the teacher's own greedy output.
  """
  out = []
  for gamma in e.gammas:
    runs = [
        spec.compare(
            teacher,
            student,
            p,
            e.new_tokens,
            gamma=gamma,
            repeats=e.repeats,
            baseline=b,
        )
        for p, b in zip(prompts, baselines)
    ]

    def total(key, runs=runs):
      return sum(r[key] for r in runs)

    out.append(
        {
            "gamma": gamma,
            "prompts": len(runs),
            "acceptance_rate": total("accepted") / max(total("proposed"), 1),
            "tokens_per_teacher_call": sum(len(r["tokens"]) for r in runs)
            / max(total("teacher_calls"), 1),
            "teacher_wall_s": total("teacher_wall_s"),
            "speculative_wall_s": total("speculative_wall_s"),
            "speedup": total("teacher_wall_s") / total("speculative_wall_s"),
            "matches_teacher": all(r["matches_teacher"] for r in runs),
        }
    )
  return out


def float_twin(payload: dict[str, Any]) -> str | None:
  """For a run trained quantisation-aware (``q=...`` in its spec), the
  folder of the same run without it ("sampled@q=int4" -> "sampled"), so that
  evaluate can set the same recipe's PTQ beside it; None for other runs."""
  if quantize.trained_scheme(payload) is None:
    return None
  return layout.run_folder(
      run_specs.without_part(payload["settings"]["run"], "q")
  )


def _fingerprint(folders: dict[str, str], config) -> dict[str, Any]:
  return {
      "steps": {n: ckpt.latest_step(p) for n, p in folders.items()},
      "eval": config.eval.to_dict(),
  }


def evaluate(config, workdir: str) -> dict[str, Any]:
  """Runs the stage on the mesh of ``config.mesh``; returns the report (also
  written to W/eval/report.json by the main process)."""
  return _evaluate(config, workdir, sharding.from_config(config))


def _stop_here() -> None:
  """Raises ``stop.Stopped`` once a SIGTERM or Ctrl-C came (every process
  at the same point: the passes on the mesh are collective)."""
  signum = stop.agreed()
  if signum is not None:
    raise stop.stopped(
        "evaluate",
        signum,
        "no report is written until it is complete, so a rerun evaluates"
        " again from the start",
    )


def _evaluate(config, workdir: str, mesh) -> dict[str, Any]:
  folders = model_folders(workdir)
  if not folders:
    raise UserError(
        f"Nothing to evaluate in {workdir}: no teacher/ or student/<run>/"
        " with a checkpoint. Run the teacher and distill stages first."
    )
  json_path = os.path.join(layout.eval_dir(workdir), "report.json")
  fingerprint = json.loads(json.dumps(_fingerprint(folders, config)))
  if os.path.isfile(json_path):
    with open(json_path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous.get("inputs") == fingerprint:
      print(f"evaluate: report is up to date ({json_path}); nothing to do.")
      return previous

  with sharding.use(mesh):  # Each parameter read straight onto the mesh.
    runtime = {"teacher": runtime_settings(config)}  # how the teacher runs
    loaded = {
        name: registry.load_model(path, **runtime.get(name, {}))
        for name, path in folders.items()
    }
  for name, model in loaded.items():  # No report of a diverged model.
    ckpt.check_finite(nnx.state(model, nnx.Param), f"{folders[name]}")
  teacher = loaded.get("teacher")
  # Inputs are checked before the long work: a damaged or stale cache fails
  # here, not after the speed measurements.
  figures_of_cache = cache_size.cache_figures(workdir, teacher)
  payloads = {name: ckpt.read_config(path) for name, path in folders.items()}
  models = {
      name: _entry(name, path, payloads[name], loaded[name])
      for name, path in folders.items()
  }
  # Students that speak their own tokenizer are scored on its streams, in
  # bits per byte beside the others; what needs the teacher's vocabulary
  # (KL, speculative decoding, the teacher's judgement) leaves them out.
  own = {
      name
      for name, payload in payloads.items()
      if name != "teacher" and student_vocab.speaks_own(workdir, payload)
  }
  for name in own:
    models[name]["tokenizer"] = "own"
  shared = {n: m for n, m in loaded.items() if n not in own}
  if figures_of_cache:
    _cache_bytes(models, figures_of_cache, workdir, config.seed)
  started = time.time()
  with sharding.use(mesh):
    score = _scorer(config, workdir, teacher)
    for name, values in score(shared, progress=True).items():
      models[name].update(values)
    if own:
      own_score = _scorer(config, workdir, None, own_tokenizer=True)
      for name, values in own_score(
          {n: loaded[n] for n in own}, progress=True
      ).items():
        models[name].update(values)
    logging.info("validation pass: %.1fs", time.time() - started)
    if figures_of_cache and teacher is not None and config.eval.target_batches:
      figures_of_cache["targets"] = targets.target_figures(
          teacher,
          layout.data_dir(workdir),
          cache.read_manifest(layout.cache_dir(workdir)),
          batch_size=config.data.batch_size,
          max_batches=config.eval.target_batches,
          seed=config.seed,
      )
    loaded.update(
        _quantised_variants(
            config,
            models,
            shared,
            {n: p for n, p in payloads.items() if n not in own},
            score,
        )
    )
  for name, model in loaded.items():
    models[name]["weight_bytes"] = quantize.weight_bytes(model)
  _serving_figures(config, workdir, models, loaded, own)
  result = {
      "inputs": fingerprint,
      "models": models,
      "summary": headline.headline(models),
      "cache": figures_of_cache,
      "machine": report.machine_description(),
      "seconds": round(time.time() - started, 1),
  }
  if sharding.is_main():
    _write_report(layout.eval_dir(workdir), result)
  return result


def _cache_bytes(models, figures_of_cache, workdir: str, seed: int) -> None:
  """Each offline run's bytes per token of the target it reads."""
  directory = layout.cache_dir(workdir)
  for entry in models.values():
    if entry.get("mode") != "offline":
      continue
    entry["cache_bytes_per_token"] = (
        cache_size.target_bytes_per_token(
            directory,
            cache.read_manifest(directory),
            entry["target"],
            cache.TargetView(**entry["sizes"], seed=seed),
        )
        if entry["sizes"]
        else figures_of_cache.get(f"{entry['target']}_bytes_per_token")
    )


def _entry(name, path, payload, model):
  """What a model's report entry says before it is scored: its folder and
  step, how it was trained (students), what it stores and what it costs."""
  entry: dict[str, Any] = {"path": path, "step": ckpt.latest_step(path)}
  if name != "teacher":
    settings = payload.get("settings", {})
    entry["mode"], entry["target"], entry["loss_kind"] = (
        settings.get("mode"),
        settings.get("target"),
        settings.get("loss"),
    )
    sizes = {key: settings.get(key) for key in ("k", "n", "m")}
    entry["sizes"] = {key: v for key, v in sizes.items() if v is not None}
    parts = {key: settings.get(key) for key in ("lam", "init", "feat")}
    entry["parts"] = {key: v for key, v in parts.items() if v is not None}
  entry["params"] = model.param_counts()
  entry["vocab_size"] = model.config.vocab_size
  entry["kv_cache_bytes_per_token"] = metrics.model_kv_bytes(model.config)
  entry["quantization"] = getattr(model, "quantization", None)
  return entry


def _scorer(config, workdir: str, teacher, own_tokenizer: bool = False):
  """``score(models, progress=False) -> {name: figures}``: the validation
  pass of the config over a dict of models (``progress``: a bar); with
  ``own_tokenizer``, on the student's own token streams."""
  data, e = config.data, config.eval
  data_dir = student_vocab.data_dir(workdir, own_tokenizer)
  seq_len = student_vocab.seq_len(config, workdir, own_tokenizer)
  score = functools.partial(
      validation.validation_pass,
      teacher=teacher,
      data_dir=data_dir,
      seq_len=seq_len,
      batch_size=data.batch_size,
      max_batches=e.batches,
      chunk_size=config.distill.loss_chunk,
      num_bins=e.ece_bins,
      byte_lengths=token_bytes.byte_lengths(
          tok.load_tokenizer(
              student_vocab.tokenizer_path(workdir, own_tokenizer)
          )
      ),
  )

  def with_bar(models, progress: bool = False):
    if not progress:
      return score(models)
    rows = len(pipeline.PackedRows(data_dir, "validation", seq_len))
    batches = rows // data.batch_size
    with tqdm(
        total=min(e.batches, batches) if e.batches else batches,
        desc="evaluate: validation",
        unit="batch",
        disable=not sharding.is_main(),
    ) as bar:

      def advance(i):
        del i
        bar.update(1)
        _stop_here()

      return score(models, progress=advance)

  return with_bar


def _quantised_variants(config, models, loaded, payloads, score):
  """Post-training quantised variants, scored like the others beside their
  float parent: of the best distilled student in each scheme of
  ``config.eval.ptq``, and of each QAT run's float twin, quantised exactly
  as that run is (the same scheme, the embedding left float): like with
  like. Adds their entries to ``models``; returns {name: model}."""
  best = headline.headline(models).get("best_distilled")
  wanted = [(best, scheme) for scheme in config.eval.ptq] if best else []
  for name, payload in payloads.items():
    twin = float_twin(payload)
    if twin in loaded:
      wanted.append((twin, loaded[name].quantization))
  parents, variants = {}, {}
  for parent, how in dict.fromkeys(wanted):
    scheme, embedding = quantize.parse(how)
    name = f"{parent}-{how}"
    parents[name] = parent
    variants[name] = quantize.quantize(
        loaded[parent], scheme, embedding=embedding
    )
  if not variants:
    return {}
  _stop_here()
  scores = score(variants)
  for name, model in variants.items():
    parent = models[parents[name]]
    models[name] = {
        **{k: v for k, v in parent.items() if k not in scores[name]},
        **scores[name],
        "parent": parents[name],
        "quantization": model.quantization,
    }
  return variants


def _serving_figures(config, workdir, models, loaded, own=()) -> None:
  """Decode speed, speculative decoding with each student drafting, and the
  teacher's judgement of each model's own continuations, into ``models``.

  Decoding is timed as a model is served at batch 1 or 8: whole, on one
  device (this process's first), not spread over the mesh. Students of
  ``own`` (their own tokenizer) are timed, not paired with the teacher.
  """
  e = config.eval
  device = jax.local_devices()[0]
  loaded = {name: sharding.to_device(m, device) for name, m in loaded.items()}
  teacher = loaded.get("teacher")
  for name, model in tqdm(loaded.items(), desc="evaluate: speed", unit="model"):
    _stop_here()
    models[name]["decode"] = speed(model, e.speed)

  students = [n for n in loaded if n != "teacher" and n not in own]
  if teacher is not None and students and e.speculative.gammas:
    sp = e.speculative
    prompts = validation_prompts(workdir, sp.prompts, sp.prompt_len)
    baselines = [
        spec.teacher_baseline(teacher, p, sp.new_tokens, repeats=sp.repeats)
        for p in prompts
    ]
    for name in tqdm(students, desc="evaluate: speculative", unit="drafter"):
      _stop_here()
      models[name]["speculative"] = speculative_figures(
          teacher, loaded[name], prompts, baselines, sp
      )

  co = e.continuations
  if teacher is not None and co.prompts:
    prompts = validation_prompts(workdir, co.prompts, co.prompt_len)
    judged = {n: m for n, m in loaded.items() if n not in own}
    for name, model in tqdm(
        judged.items(), desc="evaluate: continuations", unit="model"
    ):
      _stop_here()
      models[name]["continuations"] = generation.teacher_log_likelihood(
          teacher,
          model,
          prompts,
          co.new_tokens,
          temperature=co.temperature,
          key=jax.random.key(config.seed),
      )


def _write_report(out_dir: str, result: dict[str, Any]) -> None:
  """``report.json``, ``report.md`` and the plots, in ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  result["plots"] = plots.write_plots(out_dir, result["models"])
  json_path = files.write_json(os.path.join(out_dir, "report.json"), result)
  md_path = files.write_text(
      os.path.join(out_dir, "report.md"), report.markdown(result)
  )
  print(f"evaluate: wrote {md_path} and {json_path}")


def main(argv):
  config, workdir = cli.setup(argv)
  evaluate(config, workdir)


if __name__ == "__main__":
  cli.run(main)
