"""benchmarks/results.py: each benchmark rewrites only its own section of RESULTS.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from results import markdown_table, write_section  # noqa: E402


def test_write_section_replaces_only_its_own_section(tmp_path: Path):
    results = tmp_path / "RESULTS.md"
    write_section("Training comparison", "first", results)
    write_section("Kernels", "keep me", results)
    write_section("Training comparison", "second", results)
    text = results.read_text()
    assert "first" not in text
    assert text.count("## Training comparison") == 1
    assert text.index("second") < text.index("## Kernels\n\nkeep me")
    assert text.startswith("# Benchmark results")


def test_markdown_table_has_a_header_rule_and_one_line_per_row():
    table = markdown_table(["a", "b"], [["1", "2"], ["3", "4"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]
