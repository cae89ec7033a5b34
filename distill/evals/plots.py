"""The evaluation report's PNG plots: loss against size, speed, position.

``write_plots`` draws ``plot_figures``'s figures from ``report.json``'s
models into the evaluation folder; ``report.md`` shows them with captions.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np

from distill.evals import report
from distill.training import loop as trainer

# One colour and marker per family (a model and its quantised variants);
# the teacher, first, is black. Colours and markers cycle at different
# lengths, so families stay apart by the pair long after the colours run out.
_COLOURS = (
    "black",
    *(f"tab:{c}" for c in "blue orange green red purple brown".split()),
    *(f"tab:{c}" for c in "pink gray olive cyan".split()),
    *"navy darkgoldenrod teal indigo maroon olivedrab magenta".split(),
    *"slategray coral deepskyblue".split(),
)
_MARKERS = "osD^vP*Xph<>"
_LOSS_LABEL = "validation loss (nats/token)"


def write_plots(out_dir: str, models: dict[str, dict[str, Any]]) -> list[str]:
  """Writes each plot of ``plot_figures`` into ``out_dir``; returns the names.
  Students with their own tokenizer are left out: the plots are in nats per
  token of the teacher's (the Across tokenizers table has them)."""
  written = []
  shared = {n: e for n, e in models.items() if e.get("tokenizer") != "own"}
  for filename, fig in plot_figures(shared).items():
    path = os.path.join(out_dir, filename)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    written.append(filename)
  return written


def plot_figures(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """{file name: matplotlib Figure}: validation loss over training beside
  the report's own figures, and quality against decode speed, weight bytes
  and cache bytes (those the report has the numbers for)."""
  styles = _styles(models)
  out = {"validation_loss.png": _validation_loss(models, styles)}
  speed = {
      n: models[n]["decode"]["batch_1"]["decode_tokens_per_s"]
      for n in styles
      if models[n].get("decode", {}).get("batch_1")
  }
  if speed:
    out["quality_vs_speed.png"] = _scatter(
        models,
        styles,
        speed,
        "decode tokens/s, batch 1 (log scale)",
        "Quality against decode speed (lower right is better)",
        log=True,
    )
  family = _families(models)
  quantised = {f for n, f in family.items() if f != n}  # families with both
  weights = {
      n: models[n]["weight_bytes"] / 2**20
      for n in styles
      if family[n] in quantised and models[n].get("weight_bytes")
  }
  if weights:
    out["quality_vs_weight_bytes.png"] = _scatter(
        models,
        styles,
        weights,
        "weight MiB (as stored)",
        "Quantised students against their float parents",
    )
  per_byte = _gain_per_byte(models, styles)
  if per_byte is not None:
    out["quality_per_byte.png"] = per_byte
  if len(report.position_buckets(models)) > 1:
    out["loss_by_position.png"] = _loss_by_position(models, styles)
  return out


def _loss_by_position(models, styles):
  """Each model's validation loss per position bucket: how its loss falls
  as it has more of the document before a token."""
  buckets = report.position_buckets(models)
  fig = _figure(figsize=(7.5, 4.5))
  ax = fig.add_subplot()
  drawn = []
  for name, style in styles.items():
    by = models[name].get("loss_by_position", {})
    xs = [i for i, b in enumerate(buckets) if b in by]
    drawn += ax.plot(
        xs, [by[buckets[i]] for i in xs], label=name, linewidth=1.2, **style
    )
  ax.set_xticks(range(len(buckets)), buckets)
  ax.margins(x=0.1)
  ax.set(
      xlabel="tokens of the document before the token (bucket)",
      ylabel=_LOSS_LABEL,
      title="Validation loss by position in the document",
  )
  _finish(fig, ax)
  _dodge(ax, drawn)
  return fig


def _figure(**kwargs):
  """A matplotlib Figure drawn by Agg, outside pyplot (no global state)."""
  # Imported here: only the evaluate stage draws, and matplotlib is slow to
  # import.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(dpi=110, **kwargs)  # as saved: the layout is in pixels
  FigureCanvasAgg(fig)
  return fig


def _recipe(entry: dict[str, Any]) -> str:
  """What a student learns from, quantisation aside."""
  keys = ("mode", "target", "loss_kind", "sizes", "parts")
  return repr([entry.get(k) for k in keys])


def _families(models: dict[str, dict[str, Any]]) -> dict[str, str]:
  """{name: the float model it is a quantised variant of, else itself}: a
  PTQ variant's ``parent``; a QAT run's float twin (the run of the same
  recipe, unquantised), when the report has it."""
  floats: dict[str, str] = {}
  for name, e in models.items():
    if not e.get("quantization") and not e.get("parent"):
      floats.setdefault(_recipe(e), name)
  family = {}
  for name, e in models.items():
    if e.get("parent") in models:
      family[name] = e["parent"]
    elif e.get("quantization"):
      family[name] = floats.get(_recipe(e), name)
    else:
      family[name] = name
  return family


def _styles(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """{name: Line2D keywords}, families in report order, each model after its
  float parent: a colour and marker per family, filled for the float model,
  hollow for quantised ones (variants from the second on: another marker)."""
  family = _families(models)
  styles = {}
  for i, root in enumerate(dict.fromkeys(family.values())):
    colour = _COLOURS[i % len(_COLOURS)]
    members = sorted((n for n in models if family[n] == root), key=root.__ne__)
    for k, name in enumerate(members):
      styles[name] = {
          "color": colour,
          "marker": _MARKERS[(i + max(k - 1, 0)) % len(_MARKERS)],
          "markersize": 7,
          "markeredgecolor": colour,
          "markerfacecolor": (
              "none" if k or models[name].get("quantization") else colour
          ),
      }
  return styles


def _tokens(counts) -> str:
  """How many tokens a figure is of, e.g. "256 tokens" (a range if several)."""
  counts = sorted({int(c) for c in counts if c})
  if not counts:
    return "each run's eval batches"
  if len(counts) == 1:
    return f"{counts[0]:,} tokens"
  return f"{counts[0]:,}-{counts[-1]:,} tokens"


def _validation_loss(models, styles):
  """Left: the eval/loss each training run logged as it trained, on its own
  eval batches; right: each model's val loss of the report's tables (this
  stage's batches, another sample), the figure to compare models by."""
  fig = _figure(figsize=(10, 4.8))
  left, right = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
  curves, tokens = [], set()
  for name, style in styles.items():
    e = models[name]
    # A PTQ variant has no training of its own: its path is its parent's.
    logged = [] if e.get("parent") else trainer.read_metrics(e["path"])
    logged = [r for r in logged if "eval/loss" in r]
    if logged:
      tokens.update(r.get("eval/tokens") for r in logged)
      curves += left.plot(
          [r["step"] for r in logged],
          [r["eval/loss"] for r in logged],
          linewidth=1.2,
          label=name,
          **{**style, "markersize": 6},
      )
  fig.suptitle("Validation loss: the panels score different samples")
  left.set(
      xlabel="training step",
      ylabel=_LOSS_LABEL,
      title=f"Logged while training (eval/loss, {_tokens(tokens)})",
  )
  for x, name in enumerate(styles):
    right.plot(
        [x], [models[name]["loss"]], ls="none", label=name, **styles[name]
    )
  right.set_xticks(range(len(styles)), list(styles), rotation=90, fontsize=8)
  right.set_title(
      "Report tables (val loss,"
      f" {_tokens(e.get('tokens') for e in models.values())})"
  )
  left.margins(x=0.15)
  _finish(fig, right)
  _dodge(left, curves)
  return fig


def _scatter(models, styles, xs, xlabel: str, title: str, log=False):
  """Each model of ``xs`` ({name: x}) at (x, its report val loss), named
  beside it."""
  fig = _figure(figsize=(7.5, 4.5))
  ax = fig.add_subplot()
  points = {
      n: ax.plot([x], [models[n]["loss"]], ls="none", label=n, **styles[n])[0]
      for n, x in xs.items()
  }
  if log:
    ax.set_xscale("log")
  ax.margins(x=0.12, y=0.1)
  ax.set(xlabel=xlabel, ylabel=_LOSS_LABEL, title=title)
  _finish(fig, ax)
  _dodge(ax, list(points.values()))
  _name_points(ax, points)
  return fig


def _gain_per_byte(models, styles):
  """``quality_per_byte`` as a line per cached method, in the style of its
  first run, with the online runs (no cache) and CE as reference lines."""
  lines = report.quality_per_byte(models)
  if not lines:
    return None
  fig = _figure(figsize=(7.5, 4.5))
  ax = fig.add_subplot()
  drawn = []
  for method, pts in sorted(lines.items()):
    names = [n for _, _, n in pts]
    drawn += ax.plot(
        [b for b, _, _ in pts],
        [g for _, g, _ in pts],
        label=f"{method}: {', '.join(names)}",
        **styles[names[0]],
    )
  ce = report.ce_baseline(models)
  for name, e in models.items():
    if e.get("mode") == "online" and not e.get("quantization"):
      ax.axhline(
          ce["loss"] - e["loss"],
          linestyle="--",
          color=styles[name]["color"],
          label=f"{name} (online, no cache)",
      )
  ce_name = next(n for n, e in models.items() if e is ce)
  ax.axhline(
      0.0, color=styles[ce_name]["color"], lw=0.8, label=f"{ce_name} (baseline)"
  )
  ax.set_xscale("log")
  ax.margins(x=0.1)
  ax.set(
      xlabel="cache bytes per token (log scale)",
      ylabel="validation gain over CE (nats/token)",
      title="What each cached byte buys (higher is better)",
  )
  _finish(fig, ax)
  _dodge(ax, drawn)
  return fig


def _finish(fig, ax) -> None:
  """A grid on every axes, ``ax``'s legend right of it, the layout fixed
  (before ``_dodge`` and ``_name_points``, which work on screen)."""
  for a in fig.axes:
    a.grid(alpha=0.3)
  handles, _ = ax.get_legend_handles_labels()
  hollow = any(h.get_markerfacecolor() == "none" for h in handles)
  ax.legend(
      bbox_to_anchor=(1.02, 1),
      loc="upper left",
      borderaxespad=0,
      fontsize=8,
      title="hollow: quantised" if hollow else None,
      title_fontsize=8,
  )
  fig.tight_layout()


def _dodge(ax, lines) -> None:
  """Shifts each line sideways on screen, a marker's width at a time (right,
  left, twice right, ...), until its markers cover none drawn before it (a
  quantised variant beside its parent, equal values side by side); the data
  are unchanged."""
  from matplotlib import transforms  # pylint: disable=import-outside-toplevel

  fig = ax.get_figure()
  taken = np.empty((0, 2))  # marker centres so far, in pixels
  for line in lines:
    xy = ax.transData.transform(line.get_xydata())
    width = 1.25 * line.get_markersize() * fig.dpi / 72  # with a gap
    shifts = ((i + 1) // 2 * (-1) ** (i + 1) * width for i in itertools.count())
    shift = next(s for s in shifts if not _near(xy + [s, 0], taken, width))
    taken = np.concatenate([taken, xy + [shift, 0]])
    line.set_clip_on(False)  # shifted past the edge: still drawn
    line.set_transform(
        transforms.offset_copy(
            ax.transData, fig, x=shift * 72 / fig.dpi, units="points"
        )
    )


def _near(points, others, distance: float) -> bool:
  """Whether a point of ``points`` is nearer than ``distance`` (rounding
  aside) to one of ``others`` along both axes: their markers would touch."""
  gaps = np.abs(points[:, None] - others[None]).max(-1)
  return bool((gaps < distance - 1e-3).any())


# Where a name may sit beside its marker, by preference: offset in points
# and alignment.
_PLACES = (
    ((6, 0), "left", "center"),
    ((-6, 0), "right", "center"),
    ((0, 6), "center", "bottom"),
    ((0, -6), "center", "top"),
)


def _name_points(ax, points) -> None:
  """Names each one-point line of ``points`` ({name: line}) beside its
  marker, lowest first, covering no marker and no name placed before."""
  renderer = ax.get_figure().canvas.get_renderer()
  boxes = {n: line.get_window_extent(renderer) for n, line in points.items()}
  taken = list(boxes.values())
  for name in sorted(points, key=lambda n: boxes[n].y0):
    line = points[name]
    where = {"xycoords": line.get_transform(), "textcoords": "offset points"}
    xy = line.get_xydata()[0]
    text = ax.annotate(
        name, xy, xytext=(0, 0), fontsize=8, color=line.get_color(), **where
    )
    taken.append(_place(text, renderer, taken, ax.get_window_extent(renderer)))
    if text.get_position() not in [p for p, _, _ in _PLACES]:  # moved up
      leader = {"arrowstyle": "-", "color": line.get_color(), "lw": 0.6}
      ax.annotate(
          "", xy, xytext=text.get_position(), arrowprops=leader, **where
      )


def _place(text, renderer, taken, inside):
  """Puts ``text`` at the first of ``_PLACES`` inside the box ``inside``
  that overlaps none of ``taken``; else right of its point (left at the
  right edge), moved up until it overlaps none. Returns its box on screen."""
  for offset, ha, va in _PLACES:
    text.set(position=offset, horizontalalignment=ha, verticalalignment=va)
    box = text.get_window_extent(renderer)
    within = inside.contains(*box.p0) and inside.contains(*box.p1)
    if within and not any(b.overlaps(box) for b in taken):
      return box
  text.set(position=_PLACES[0][0], horizontalalignment="left")
  text.set_verticalalignment("center")
  if text.get_window_extent(renderer).x1 > inside.x1:
    text.set(position=_PLACES[1][0], horizontalalignment="right")
  box = text.get_window_extent(renderer)
  while (hit := next((b for b in taken if b.overlaps(box)), None)) is not None:
    x, y = text.get_position()
    step = (hit.y1 - box.y0 + 1) * 72 / text.get_figure().dpi
    text.set_position((x, y + step))
    box = text.get_window_extent(renderer)
  return box
