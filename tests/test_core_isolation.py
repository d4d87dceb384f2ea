"""The core package never imports the demo: ``quartet_compile`` and every one of its submodules load
without pulling in ``quartet_demo`` (examples/), so the backend ships without the demo's model,
corpus, training loop or launcher.

Checked in a fresh interpreter: in this one, other tests may already have imported the demo.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Imports every module of the given packages (walking subpackages), then reports what loaded.
_SCRIPT = """
import importlib, json, pkgutil, sys
imported = []
for name in sys.argv[1:]:
    package = importlib.import_module(name)
    imported.append(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(module.name)
        imported.append(module.name)
demo = sorted(m for m in sys.modules if m.split(".")[0] == "quartet_demo")
importlib.import_module("quartet_demo.demo")  # the name is right: the check above is not vacuous
print(json.dumps({"imported": imported, "demo": demo}))
"""


def core_packages() -> list[str]:
    """The installed packages of the core, as pyproject.toml lists them."""
    listed = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
    names = re.findall(r'"([\w.]+)"', listed.group(1))
    return [name for name in names if name.split(".")[0] == "quartet_compile"]


def test_importing_all_of_quartet_compile_loads_no_demo_module():
    packages = core_packages()
    assert {"quartet_compile", "quartet_compile.passes", "quartet_compile.kernels"} <= set(packages)
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *packages],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.splitlines()[-1])
    # The walk reached modules of the mapped subpackages, not only the top-level package.
    for module in ("backend", "ops", "passes.rewrite"):
        assert f"quartet_compile.{module}" in report["imported"]
    assert any(m.startswith("quartet_compile.kernels.") for m in report["imported"])
    assert report["demo"] == []
