"""The pass's uuid (its part of Inductor's cache keys) hashes every module of the package, so no
change to the code that builds the rewritten graphs can be served from stale cache entries."""

import sys
from pathlib import Path

import pytest

from quartet_compile import backend, passes
from quartet_compile.config import QuartetConfig


def test_every_imported_module_of_the_package_is_hashed() -> None:
    imported = {
        module.__file__
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] == "quartet_compile" and getattr(module, "__file__", None)
    }
    assert imported and imported <= set(backend.sources())


def test_a_new_module_in_a_subpackage_changes_the_uuid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    quartet_pass = backend.QuartetPass(QuartetConfig(), {}, [], lambda _: None)
    before = quartet_pass.uuid()
    new_module = tmp_path / "new_form.py"
    new_module.write_text("FORM = 'new'\n")
    # A directory on the package's path, as passes/ itself is (not a file glob's guess).
    monkeypatch.setattr(passes, "__path__", [*passes.__path__, str(tmp_path)])
    assert str(new_module) in backend.sources()
    assert quartet_pass.uuid() != before
