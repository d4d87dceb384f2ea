"""--corpus on small temporary corpora: which files a spec names, the split, the streams, the
fingerprint (printed, and in log.csv's header), and the errors that say what to fix."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from quartet_demo import corpus, sources, training
from quartet_demo.demo import main
from quartet_demo.run_log import read_log
from quartet_demo.training import LOG_NAME

# Half the files go to validation, so a handful of files gives both splits.
VAL_FRACTION = 0.5


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Eight .py files (two in a subfolder), a .txt file and a .pyc file, 300+ bytes each."""
    root = tmp_path / "corpus"
    for i in range(8):
        path = root / ("pkg" if i < 2 else "") / f"module_{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {i}\n" + f"def f_{i}(x):\n    return x * {i}\n" * 12)
    (root / "pkg" / "notes.txt").write_text("plain text, not Python\n" * 20)
    (root / "module_0.pyc").write_bytes(b"\x00" * 300)
    return root


def joined(root: Path, files: list[Path]) -> bytes:
    return corpus.DOCUMENT_SEPARATOR.join((root / path).read_bytes() for path in files)


def test_a_directory_means_its_py_files_split_disjointly_into_the_two_streams(tree: Path):
    found = sources.find_sources(str(tree))
    assert found.root == tree
    assert list(found.files) == sorted(p.relative_to(tree) for p in tree.rglob("*.py"))
    assert len(found.files) == 8
    train, val = corpus.split_files(list(found.files), VAL_FRACTION)
    assert train and val and set(train).isdisjoint(val)
    assert sorted(train + val) == list(found.files)

    data = corpus.load_corpus(str(tree), VAL_FRACTION)
    assert data.train.dtype == torch.uint8
    assert bytes(data.train) == joined(tree, train)
    assert bytes(data.val) == joined(tree, val)
    assert data.fingerprint.files == 8
    assert data.fingerprint.val_files == len(val)
    assert data.fingerprint.bytes == sum((tree / p).stat().st_size for p in found.files)


def test_split_and_hash_do_not_depend_on_where_the_corpus_lies(tree: Path, tmp_path: Path):
    here = corpus.load_corpus(str(tree), VAL_FRACTION)
    moved = shutil.copytree(tree, tmp_path / "elsewhere" / "copy")
    there = corpus.load_corpus(str(moved), VAL_FRACTION)
    assert torch.equal(here.train, there.train) and torch.equal(here.val, there.val)
    assert here.fingerprint.sha256 == there.fingerprint.sha256
    assert here.fingerprint.root != there.fingerprint.root


def test_the_hash_changes_when_one_byte_changes(tree: Path):
    before = corpus.load_corpus(str(tree), VAL_FRACTION).fingerprint
    path = tree / "pkg" / "module_1.py"
    content = bytearray(path.read_bytes())
    content[40] ^= 1
    path.write_bytes(bytes(content))
    after = corpus.load_corpus(str(tree), VAL_FRACTION).fingerprint
    assert (after.files, after.bytes) == (before.files, before.bytes)
    assert after.sha256 != before.sha256


def test_a_glob_names_any_files_relative_to_its_fixed_prefix(tree: Path):
    found = sources.find_sources(f"{tree}/**/*.txt")
    assert found.root == tree
    assert found.files == (Path("pkg/notes.txt"),)
    top_level = sources.find_sources(f"{tree}/module_[0-3].py")
    assert top_level.files == tuple(Path(f"module_{i}.py") for i in (2, 3))


def test_site_packages_is_every_py_file_of_this_interpreters_purelib():
    found = sources.find_sources("site-packages")
    assert found.root == Path(sysconfig.get_paths()["purelib"])
    assert found.files and all(path.suffix == ".py" for path in found.files)
    assert Path("torch/__init__.py") in found.files


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{tree}/missing", "no such directory; name 'stdlib', 'site-packages', a directory"),
        ("{tree}/**/*.rst", "the glob matches no file; check the pattern"),
        ("{tree}/pkg/empty", "no .py file under .*; for other files name a quoted glob"),
    ],
)
def test_a_spec_naming_no_file_says_what_to_fix(tree: Path, spec: str, message: str):
    (tree / "pkg" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=message):
        corpus.load_corpus(spec.format(tree=tree))


def test_too_few_files_for_both_splits_names_the_flags(tree: Path):
    with pytest.raises(RuntimeError, match="name more files or change --val-fraction"):
        corpus.load_corpus(f"{tree}/pkg/notes.txt*", VAL_FRACTION)


def test_the_demo_prints_the_fingerprint_and_writes_it_into_the_log_header(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    # Eager graphs: this test is about the corpus, not the compiler.
    monkeypatch.setitem(training.BACKENDS, "bf16", {"backend": "eager"})
    out = tmp_path / "run"
    main(
        f"--corpus {tree} --val-fraction {VAL_FRACTION} --steps 2 --batch-size 2 --seq-len 16 "
        f"--eval-every 1 --save-every 0 --device cpu --no-progress --out {out}".split()
    )
    fingerprint = corpus.load_corpus(str(tree), VAL_FRACTION).fingerprint
    assert fingerprint.describe() in capsys.readouterr().out
    log = read_log(out / LOG_NAME)
    assert log.metadata == {
        "corpus": str(tree),
        "corpus_root": str(tree),
        "corpus_files": "8",
        "corpus_bytes": str(fingerprint.bytes),
        "corpus_sha256": fingerprint.sha256,
    }
    assert [row["step"] for row in log.rows] == ["1", "2"]


@pytest.mark.parametrize("length", [1_000, 18_597_708])
def test_validation_windows_stay_inside_a_stream_longer_than_float32_counts_exactly(length: int):
    # 18,597,708 bytes: the site-packages validation stream on the H200, where float32 starts
    # once ran one byte past the end.
    stream = torch.arange(length, dtype=torch.int64).to(torch.uint8)
    batches = corpus.eval_batches(stream, batch_size=64, seq_len=512, n_batches=16)
    inputs, targets = batches[-1]
    assert inputs[-1, 0] == stream[length - 513] and targets[-1, -1] == stream[length - 1]
    firsts = torch.cat([inputs[:, 0] for inputs, _ in batches])
    assert firsts[0] == stream[0] and len(firsts) == 64 * 16
