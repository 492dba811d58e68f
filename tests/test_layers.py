"""The floor plan as tests: imports point down only (import-linter's contracts in pyproject.toml), and the
Makefile's stage targets and the demo's steps are the stage table's."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

from qwen2_align.demo import STEPS
from qwen2_align.stage_table import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("qwen2_align", "data_synthesis", "alignment", "reward")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", command, "--no-cache"], cwd=root, capture_output=True, text=True,
                          timeout=120)


def test_every_import_points_down_and_no_package_has_a_circle():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def test_the_contracts_catch_an_upward_import_and_a_circle(tmp_path):
    """The same check on a copy with one import that climbs a floor and one circle: both contracts break."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    sandbox = tmp_path / "reward" / "sandbox.py"
    sandbox.write_text(sandbox.read_text() + "\nfrom alignment.atomic import atomic_write_text  # noqa\n")
    generate = tmp_path / "data_synthesis" / "generate.py"
    generate.write_text(generate.read_text() + "\nfrom . import select  # noqa\n")
    select = tmp_path / "data_synthesis" / "select.py"
    assert "from .generate import" in select.read_text()
    out = _lint_imports(tmp_path)
    assert out.returncode != 0
    assert "0 kept, 2 broken" in out.stdout
    assert "reward.sandbox -> alignment.atomic" in out.stdout


def test_the_makefile_and_the_demo_run_the_stages_of_the_table():
    makefile = (ROOT / "Makefile").read_text()
    listed = re.search(r"^STAGES\s*:=((?:.*\\\n)*.*)$", makefile, re.M).group(1)
    assert set(listed.replace("\\", " ").split()) == set(STAGES)
    for step in STEPS:
        assert step.stage in STAGES
        assert (ROOT / step.recipe_path).is_file()
    # every stage runs in the demo, but pretrain (run before the steps, cached) and the people's app
    assert {step.stage for step in STEPS} == set(STAGES) - {"pretrain"}


def test_the_gpu_check_imports_without_trl_or_datasets():
    """The GPU machines' image has neither (TRL travels as a wheel): what benchmarks/gpu_check.py imports from
    the packages must load without them."""
    blocked = "import sys; sys.modules.update(trl=None, datasets=None, openai=None); "
    imports = ("import alignment.model, alignment.model.attention, alignment.model.dca, alignment.model.modeling, "
               "qwen2_align.plan")
    out = subprocess.run([sys.executable, "-c", blocked + imports], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr


def test_ray_is_imported_only_by_the_ray_executor():
    """Ray is optional: nothing imports it at module level, so a stage that does not ask for it runs without it."""
    importers = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:  # module level only
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(name == "ray" or name.startswith("ray.") for name in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert importers == []
