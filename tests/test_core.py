"""The ground floor: layout, atomic files, checked configs, the model
registry, and the floors themselves (imports point down only)."""

import ast
import os
import subprocess
import sys

import pytest
from flax import nnx

import student
import teacher
from distill.core import checkpoint, configs, files, layout, registry
from distill.core.errors import ConfigError, UserError
from distill.training import loop
from experiments import hf_moe, stdlib
from student.config import PRESETS, StudentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each package's floor; an import may only reach a floor below its own (a
# package may import itself; two packages on one floor never import each
# other: the teacher and the student stand side by side).
FLOORS = {
    "distill.core": 0,
    "distill.nn": 1,
    "distill.decoding": 1,
    "distill.losses": 0,
    "distill.training": 1,
    "data": 1,
    "distill.evals": 2,
    "teacher": 3,
    "student": 3,
    "distill": 5,
    "experiments": 6,
}


def _package(module: str) -> str:
  """The longest FLOORS key that ``module`` belongs to."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    name = ".".join(parts[:n])
    if name in FLOORS:
      return name
  return ""


def _imports(path: str, module: str):
  """Every project module ``path`` imports, inside functions too."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  package = (
      module if path.endswith("__init__.py") else module.rpartition(".")[0]
  )
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for a in node.names:
        yield f"{base}.{a.name}"


def _modules():
  for folder in ("data", "distill", "teacher", "student", "experiments"):
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        if name.endswith(".py"):
          path = os.path.join(dirpath, name)
          rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          yield path, rel.removesuffix(".__init__")


def test_imports_point_down_only():
  upward = []
  for path, module in _modules():
    floor = FLOORS[_package(module)]
    for target in _imports(path, module):
      other = _package(target)
      if other and other != _package(module) and FLOORS[other] >= floor:
        upward.append(f"{module} -> {target}")
  assert not upward, upward


def test_ground_floor_imports_no_model_or_stage():
  for path, module in _modules():
    if FLOORS[_package(module)] <= 1:
      for target in _imports(path, module):
        assert _package(target) not in ("teacher", "student", "distill"), (
            module,
            target,
        )


def test_layout_names_every_stage_folder(tmp_path):
  w = str(tmp_path)
  assert layout.data_dir(w) == os.path.join(w, "data")
  assert layout.teacher_dir(w) == os.path.join(w, "teacher")
  assert layout.cache_dir(w) == os.path.join(w, "logits")
  assert layout.student_dir(w, "ce") == os.path.join(w, "student", "ce")
  assert layout.export_dir(w, "ce", "hf") == os.path.join(w, "export", "ce-hf")
  assert layout.list_runs(w) == []
  os.makedirs(layout.student_dir(w, "b"))
  os.makedirs(layout.student_dir(w, "a"))
  os.makedirs(layout.student_dir(w, "empty"))
  for run in ("b", "a"):
    files.write_text(
        os.path.join(layout.student_dir(w, run), "config.json"), "{}"
    )
  assert layout.list_runs(w) == ["a", "b"]
  assert "Runs in" in layout.missing_run_message(w, "c")


def test_atomic_writes_leave_nothing_half_made(tmp_path):
  path = str(tmp_path / "x.json")
  files.write_json(path, {"a": 1})
  assert open(path, encoding="utf-8").read() == '{\n  "a": 1\n}'

  class Boom(Exception):
    pass

  with pytest.raises(Boom):
    with files.atomic_dir(str(tmp_path / "d")) as tmp:
      files.write_text(os.path.join(tmp, "f"), "half")
      raise Boom
  assert sorted(os.listdir(tmp_path)) == ["x.json"]  # no temporary, no "d"
  with files.atomic_dir(str(tmp_path / "d")) as tmp:
    files.write_text(os.path.join(tmp, "f"), "one")
  with files.atomic_dir(str(tmp_path / "d")) as tmp:
    files.write_text(os.path.join(tmp, "g"), "two")
  assert os.listdir(tmp_path / "d") == ["g"]  # replaced whole
  assert sorted(os.listdir(tmp_path)) == ["d", "x.json"]


def test_model_sections_state_only_what_differs():
  # ... and the precision, which every experiment states (float32 here).
  precision = {"dtype": "float32", "param_dtype": "float32"}
  config = stdlib.get_config()
  assert configs.overrides_of(config.student.model) == {
      "window": 64,
      **precision,
  }
  assert configs.overrides_of(config.teacher.model) == precision
  student = configs.from_preset(
      PRESETS, "demo", config.student.model, what="student", vocab_size=100
  )
  assert student.window == 64 and student.vocab_size == 100
  assert student.d_model == PRESETS["demo"].d_model
  # A variant that switches presets takes the new preset whole.
  tiny = stdlib.get_config("tiny").student.model
  assert configs.overrides_of(tiny) == precision
  assert hf_moe.get_config().student.preset == "gemma3_270m"
  assert configs.overrides_of(hf_moe.get_config().student.model) == {
      "dtype": "bfloat16",
      "param_dtype": "float32",
  }


def test_misspelt_keys_fail_with_a_suggestion():
  with pytest.raises(ConfigError, match="no field 'num_layer'.*'num_layers'"):
    configs.model_section(StudentConfig, num_layer=3)
  with pytest.raises(ConfigError, match="unknown teacher preset 'dmo'.*'demo'"):
    configs.get_preset({"demo": None}, "dmo", what="teacher")
  section = stdlib.get_config().teacher.train
  with pytest.raises(
      ConfigError, match="config.teacher.train has no key 'eval_batches'"
  ):
    # Without ``also``, a key the loop does not take is refused.
    configs.from_section(loop.LoopConfig, section, where="config.teacher.train")
  config = stdlib.get_config()
  with pytest.raises(AttributeError, match="Did you mean"):
    config.cache.num_sample = 8  # a locked experiment refuses new keys
  assert issubclass(ConfigError, UserError)


def test_model_fields_override_on_the_command_line(tmp_path):
  code = (
      "import sys\n"
      "from absl import flags\n"
      "from distill.core import cli, configs\n"
      "from student.config import PRESETS\n"
      "flags.FLAGS(sys.argv)\n"
      "c = flags.FLAGS.config\n"
      "s = configs.from_preset(PRESETS, c.student.preset, c.student.model,"
      " what='student', vocab_size=10)\n"
      "print(s.num_layers, s.layer_pattern, s.window, c.teacher.model.capacity_factor)\n"
  )
  result = subprocess.run(
      [
          sys.executable,
          "-c",
          code,
          "--config=experiments/stdlib.py",
          "--config.student.model.num_layers=3",
          "--config.student.model.layer_pattern=('global',)",
          "--config.teacher.model.capacity_factor=1.5",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["3", "('global',)", "64", "1.5"]


def test_registry_loads_by_kind_and_names_unknown_kinds(tmp_path):
  folder = str(tmp_path / "m")
  config = teacher.get_preset("tiny")
  checkpoint.write_config(folder, "teacher", config)
  checkpoint.save_params(folder, teacher.Teacher(config, nnx.Rngs(0)))
  assert isinstance(registry.load_model(folder), teacher.Teacher)
  checkpoint.write_config(folder, "vision", student.get_preset("tiny"))
  with pytest.raises(checkpoint.ModelFolderError, match="'vision'.*known"):
    registry.load_model(folder)
  with pytest.raises(
      checkpoint.ModelFolderError, match="config.json is missing"
  ):
    registry.load_model(str(tmp_path / "none"))
