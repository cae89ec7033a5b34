"""The report's plots read: a style per model, nothing hidden or overprinted,
the legend beside the data and the report's own numbers drawn."""

import itertools
import json
import os

import numpy as np
import pytest

from distill.evals import plots, report


def _student(path, loss, mode="offline", target="sample", kl="sampled_kl"):
  return {
      "path": str(path),
      "step": 8,
      "mode": mode,
      "target": target,
      "loss_kind": kl,
      "sizes": {},
      "parts": {},
      "quantization": None,
      "loss": loss,
      "tokens": 512.0,
      "weight_bytes": 140544,
      "cache_bytes_per_token": 18.9 if mode == "offline" else None,
      "decode": {"batch_1": {"decode_tokens_per_s": 7000.0}},
  }


@pytest.fixture(name="models", scope="module")
def _models(tmp_path_factory):
  """A tiny run's report entries, crowded: more families than colours in
  a cycle, equal values, quantised variants (PTQ and QAT) on their parents,
  each trained model with a metrics.jsonl of eval/loss on 256 tokens."""
  tmp_path = tmp_path_factory.mktemp("workdir")
  models = {
      "teacher": {
          **_student(tmp_path / "teacher", 6.603),
          "mode": None,
          "cache_bytes_per_token": None,
      },
      "ce": _student(tmp_path / "ce", 6.605, "ce", None, None),
      "online": _student(tmp_path / "online", 6.644, "online", None, "dense"),
      "sampled": _student(tmp_path / "sampled", 6.6647),
      "sampled_qint8": {  # QAT: its float twin is "sampled"
          **_student(tmp_path / "sampled_qint8", 6.6644),
          "quantization": "int8_projections",
          "weight_bytes": 87296,
      },
      "topk_sparse": _student(tmp_path / "ts", 6.675, target="topk", kl="a"),
      "topk_tail": _student(tmp_path / "tt", 6.675, target="topk", kl="b"),
  }
  for i in range(8):  # ... and more runs: families past 10 colours
    path, loss = tmp_path / f"x{i}", 6.66 + 0.0001 * i
    models[f"extra{i}"] = _student(path, loss, mode="on_policy")
    models[f"extra{i}"]["parts"] = {"lam": i}
  for e in models.values():
    os.makedirs(e["path"])
    path = os.path.join(e["path"], "metrics.jsonl")
    with open(path, "w", encoding="utf-8") as f:
      for step in (4, 8):
        record = {"step": step, "eval/loss": 6.7 - 0.001 * step, "x": 0}
        f.write(json.dumps({**record, "eval/tokens": 256.0}) + "\n")
  for parent, how in (("online", "int8"), ("sampled", "int8_projections")):
    models[f"{parent}-{how}"] = {  # PTQ: the parent's folder, and loss
        **models[parent],
        "parent": parent,
        "quantization": how,
        "weight_bytes": 40192,
    }
  return models


@pytest.fixture(name="figs", scope="module")
def _figs(models):
  figs = plots.plot_figures(models)
  for fig in figs.values():
    fig.canvas.draw()
  return figs


def _styles(ax):
  """{label: (colour, marker, filled)} of the lines with a marker in ax."""
  return {
      line.get_label(): (
          line.get_color(),
          line.get_marker(),
          line.get_markerfacecolor() != "none",
      )
      for line in ax.get_lines()
      if line.get_marker() not in (None, "None", "")
  }


def _centres(ax):
  """Every marker's centre on screen (pixels), dodging included."""
  return [
      (line.get_label(), xy, line.get_markersize() * ax.figure.dpi / 72)
      for line in ax.get_lines()
      if line.get_marker() not in (None, "None", "")
      for xy in line.get_transform().transform(line.get_xydata())
  ]


def test_every_plot_is_drawn(figs):
  assert list(figs) == [
      "validation_loss.png",
      "quality_vs_speed.png",
      "quality_vs_weight_bytes.png",
      "quality_per_byte.png",
  ]


def test_each_family_its_colour_and_marker(figs, models):
  left, right = figs["validation_loss.png"].axes
  # PTQ variants have no curve of their own (their folder is the parent's).
  assert set(_styles(left)) == {n for n in models if "parent" not in models[n]}
  styles = _styles(right)
  assert set(styles) == set(models)
  assert len(set(styles.values())) == len(styles)  # no two drawn alike
  float_models = [s for s in styles.values() if s[2]]
  assert len({s[0] for s in float_models}) == len(float_models)  # colours
  assert len({s[1] for s in float_models}) == min(len(float_models), 12)
  # Quantised variants: the parent's colour, hollow.
  for variant, parent in (
      ("online-int8", "online"),
      ("sampled-int8_projections", "sampled"),
      ("sampled_qint8", "sampled"),
  ):
    assert styles[variant][0] == styles[parent][0]
    assert styles[parent][2] and not styles[variant][2]
  assert styles["teacher"][:2] != styles["online-int8"][:2]


def test_no_marker_hides_another(figs):
  for filename, fig in figs.items():
    for ax in fig.axes:
      for (a, p, size), (b, q, _) in itertools.combinations(_centres(ax), 2):
        assert np.abs(p - q).max() >= size - 1e-6, (filename, a, b)


def test_legends_beside_the_axes(figs):
  for filename, fig in figs.items():
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    box = legend.get_window_extent()
    for ax in fig.axes:
      assert not box.overlaps(ax.get_window_extent()), filename


@pytest.mark.parametrize(
    "filename", ["quality_vs_speed.png", "quality_vs_weight_bytes.png"]
)
def test_names_do_not_overprint(figs, models, filename):
  (ax,) = figs[filename].axes
  names = [t for t in ax.texts if t.get_text()]
  assert {t.get_text() for t in names} <= set(models) and len(names) >= 5
  boxes = [t.get_window_extent() for t in names]
  for a, b in itertools.combinations(boxes, 2):
    assert not a.overlaps(b), filename
  markers = [line.get_window_extent() for line in ax.get_lines()]
  for text, box in zip(names, boxes):
    assert not any(m.overlaps(box) for m in markers), text.get_text()


def test_validation_loss_draws_the_report_numbers(figs, models):
  left, right = figs["validation_loss.png"].axes
  drawn = {line.get_label(): line.get_ydata()[0] for line in right.get_lines()}
  assert drawn == {n: e["loss"] for n, e in models.items()}
  assert "Report tables" in right.get_title() and "512" in right.get_title()
  # The curves are the runs' own logs, and say so.
  assert "Logged while training" in left.get_title()
  assert "256 tokens" in left.get_title()
  (teacher,) = [ln for ln in left.get_lines() if ln.get_label() == "teacher"]
  assert list(teacher.get_ydata()) == pytest.approx([6.696, 6.692])


def test_write_plots_writes_pngs(models, tmp_path):
  written = plots.write_plots(str(tmp_path), models)
  assert len(written) == 4
  for name in written:
    with open(tmp_path / name, "rb") as f:
      assert f.read(8).startswith(b"\x89PNG")


def test_loss_by_position_table_and_plot(models):
  """Models scored on long rows: a table and a plot of their loss per
  position bucket, the report's numbers drawn; short rows (one bucket)
  give neither."""
  long = {}
  for i, name in enumerate(("teacher", "ce", "sampled", "sampled_qint8")):
    by = {"0-512": 6.0 - 0.1 * i, "512-2k": 5.0 - 0.1 * i, "2k-8k": 4.5}
    long[name] = {
        **models[name],
        "loss_by_position": by,
        "tokens_by_position": {"0-512": 512.0, "512-2k": 1536.0, "2k-8k": 80.0},
    }
  fig = plots.plot_figures(long)["loss_by_position.png"]
  fig.canvas.draw()
  (ax,) = fig.axes
  drawn = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
  assert drawn == {
      n: list(e["loss_by_position"].values()) for n, e in long.items()
  }
  assert [t.get_text() for t in ax.get_xticklabels()] == [
      "0-512", "512-2k", "2k-8k"
  ]  # fmt: skip
  for (a, p, size), (b, q, _) in itertools.combinations(_centres(ax), 2):
    assert np.abs(p - q).max() >= size - 1e-6, (a, b)  # 2k-8k: all 4.5
  table = report._by_position(long)  # pylint: disable=protected-access
  assert "| model | 0-512 | 512-2k | 2k-8k |" in table
  assert "| ce | 5.900 | 4.900 | 4.500 |" in table
  assert "| (tokens) | 512 | 1,536 | 80 |" in table
  assert "loss_by_position.png" not in plots.plot_figures(models)
  assert report._by_position(models) == ""  # pylint: disable=protected-access
