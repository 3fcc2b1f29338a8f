"""scan_folder on every layout, on awkward names, and on every error it reports."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featbank.errors import DatasetError, FeatbankError
from featbank.sources import SPLIT_NAMES, ImageIndex, scan_folder

from _imagecorpus import make_bad_image_corpus

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _img(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (value, value, value)).save(path, format="PNG")
    return path


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _check_arrays(index: ImageIndex) -> None:
    n = len(index)
    assert index.labels.dtype == np.int64 and index.labels.shape == (n,)
    assert index.splits.dtype == np.int8 and index.splits.shape == (n,)
    assert index.fingerprints.dtype == np.int64 and index.fingerprints.shape == (n, 2)
    assert index.paths == sorted(index.paths)
    assert index.root.is_absolute()
    for rel, (size, mtime_ns) in zip(index.paths, index.fingerprints):
        st = (index.root / rel).stat()
        assert (size, mtime_ns) == (st.st_size, st.st_mtime_ns), rel


def test_imagefolder(tmp_path: Path) -> None:
    for rel in ("dog/b.png", "cat/a.png", "cat/deep/er/c.jpg", "dog/A.JPEG", "bird/x.webp"):
        _img(tmp_path / rel)
    index = scan_folder(tmp_path)
    _check_arrays(index)
    assert index.layout == "imagefolder"
    assert index.classes == ["bird", "cat", "dog"]
    assert index.paths == [
        "bird/x.webp",
        "cat/a.png",
        "cat/deep/er/c.jpg",
        "dog/A.JPEG",
        "dog/b.png",
    ]
    assert index.labels.tolist() == [0, 1, 1, 2, 2]
    assert index.splits.tolist() == [-1] * 5
    assert len(index) == 5
    assert index.ignored == []


def test_root_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _img(tmp_path / "data" / "a" / "1.png")
    _img(tmp_path / "data" / "b" / "1.png")
    (tmp_path / "alias").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    index = scan_folder("alias")
    assert index.root == (tmp_path / "data").resolve()
    assert scan_folder(Path("data")).paths == index.paths


def test_sort_order_is_by_relative_path_string(tmp_path: Path) -> None:
    names = [
        "a10.png",
        "a2.png",
        "B.png",
        "a.png",
        "a-b.png",
        "a/z.png",
        "a_/y.png",
        "é.png",
        "Z/q.png",
    ]
    for name in names:
        _img(tmp_path / "c1" / name)
    _img(tmp_path / "c0" / "zz.png")
    index = scan_folder(tmp_path)
    expected = sorted(["c0/zz.png"] + [f"c1/{n}" for n in names])
    assert index.paths == expected
    # Python's str order is code-point order: upper case before lower case, '-' and '.' before '/'.
    assert expected[:4] == ["c0/zz.png", "c1/B.png", "c1/Z/q.png", "c1/a-b.png"]
    assert index.labels.tolist() == [0] + [1] * len(names)


def test_labels_follow_sorted_class_names_not_creation_order(tmp_path: Path) -> None:
    for cls in ("zebra", "Ant", "mouse", "ant"):
        _img(tmp_path / cls / "1.png")
    index = scan_folder(tmp_path)
    assert index.classes == ["Ant", "ant", "mouse", "zebra"]
    assert index.labels.tolist() == [0, 1, 2, 3]


def test_hidden_files_and_folders_are_skipped_silently(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    _img(tmp_path / "b" / "1.png")
    _img(tmp_path / "a" / ".hidden.png")
    _img(tmp_path / "a" / ".cache" / "2.png")
    _img(tmp_path / ".trash" / "3.png")
    _touch(tmp_path / ".DS_Store")
    index = scan_folder(tmp_path)
    assert index.paths == ["a/1.png", "b/1.png"]
    assert index.classes == ["a", "b"]
    assert index.ignored == []


def test_other_files_and_stray_images_are_listed_as_ignored(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    _img(tmp_path / "b" / "1.png")
    _touch(tmp_path / "a" / "notes.txt")
    _touch(tmp_path / "a" / "noext")
    _touch(tmp_path / "b" / "sub" / "labels.csv")
    _img(tmp_path / "stray.png")
    _touch(tmp_path / "README.md")
    (tmp_path / "empty_dir").mkdir()
    index = scan_folder(tmp_path)
    assert index.paths == ["a/1.png", "b/1.png"]
    assert index.classes == ["a", "b"]  # a folder without images is not a class
    assert index.ignored == ["README.md", "a/noext", "a/notes.txt", "b/sub/labels.csv", "stray.png"]


def test_unicode_names(tmp_path: Path) -> None:
    _img(tmp_path / "chat_café" / "日本.png")
    _img(tmp_path / "dog" / "naïve ü.jpg")
    index = scan_folder(tmp_path)
    assert index.classes == ["chat_café", "dog"]
    assert index.paths == ["chat_café/日本.png", "dog/naïve ü.jpg"]
    assert all((index.root / p).is_file() for p in index.paths)


def test_names_that_are_not_utf8_are_ignored(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "ok.png")
    _img(tmp_path / "b" / "ok.png")
    raw = os.fsencode(tmp_path / "a") + b"/bad\xff.png"
    with open(raw, "wb") as f:
        f.write(b"\x89PNG")
    os.mkdir(os.fsencode(tmp_path) + b"/c\xfe")
    with open(os.fsencode(tmp_path) + b"/c\xfe/img.png", "wb") as f:
        f.write(b"\x89PNG")
    index = scan_folder(tmp_path)
    assert index.paths == ["a/ok.png", "b/ok.png"]
    assert index.classes == ["a", "b"]
    assert index.ignored == ["a/bad\\xff.png", "c\\xfe"]
    for text in index.ignored:
        text.encode("utf-8")  # printable, storable


def test_symlinks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _img(data / "a" / "1.png")
    _img(tmp_path / "elsewhere" / "2.png", value=9)
    _img(data / "b" / "3.png")
    (data / "b" / "linked.png").symlink_to(tmp_path / "elsewhere" / "2.png")
    (data / "b" / "broken.png").symlink_to(tmp_path / "missing.png")
    (data / "a" / "loop").symlink_to(data)  # would recurse for ever if followed
    index = scan_folder(data)
    assert index.paths == ["a/1.png", "b/3.png", "b/linked.png"]
    size = (tmp_path / "elsewhere" / "2.png").stat().st_size
    assert index.fingerprints[2, 0] == size  # the target's stat, not the link's
    assert index.ignored == ["a/loop/", "b/broken.png"]


def test_directory_with_an_image_name_is_walked_not_indexed(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    _img(tmp_path / "b" / "x.jpg" / "inner.png")
    index = scan_folder(tmp_path)
    assert index.paths == ["a/1.png", "b/x.jpg/inner.png"]


def test_fingerprint_changes_when_the_file_changes(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "1.png")
    _img(tmp_path / "b" / "1.png")
    before = scan_folder(tmp_path).fingerprints.copy()
    path = tmp_path / "a" / "1.png"
    Image.new("RGB", (30, 30)).save(path)
    os.utime(path, ns=(1, 123_456_789))
    after = scan_folder(tmp_path).fingerprints
    assert after[0].tolist() == [path.stat().st_size, 123_456_789]
    assert after[0, 0] != before[0, 0]
    assert (after[1] == before[1]).all()


def test_split_layout(tmp_path: Path) -> None:
    _img(tmp_path / "train" / "cat" / "1.png")
    _img(tmp_path / "train" / "dog" / "1.png")
    _img(tmp_path / "train" / "owl" / "sub" / "1.png")  # only in train
    _img(tmp_path / "valid" / "cat" / "2.png")
    _img(tmp_path / "test" / "dog" / "3.png")
    _img(tmp_path / "test" / "stray.png")  # no class
    _img(tmp_path / "root.png")
    _touch(tmp_path / "train" / "dog" / "info.txt")
    index = scan_folder(tmp_path, require_labels=True)
    _check_arrays(index)
    assert index.layout == "splits"
    assert index.classes == ["cat", "dog", "owl"]
    assert index.paths == [
        "test/dog/3.png", "train/cat/1.png", "train/dog/1.png", "train/owl/sub/1.png", "valid/cat/2.png"
    ]  # fmt: skip
    assert index.labels.tolist() == [1, 0, 1, 2, 0]
    assert [SPLIT_NAMES[s] for s in index.splits] == ["test", "train", "train", "train", "val"]
    assert index.ignored == ["root.png", "test/stray.png", "train/dog/info.txt"]


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "Validation"])
def test_val_aliases(tmp_path: Path, val_name: str) -> None:
    _img(tmp_path / "train" / "a" / "1.png")
    _img(tmp_path / val_name / "b" / "1.png")
    index = scan_folder(tmp_path)
    assert index.layout == "splits"
    split_of = dict(zip(index.paths, index.splits.tolist()))
    assert split_of == {"train/a/1.png": 0, f"{val_name}/b/1.png": 1}
    assert SPLIT_NAMES == ("train", "val", "test")


def test_a_split_name_beside_a_class_name_is_an_imagefolder(tmp_path: Path) -> None:
    _img(tmp_path / "train" / "1.png")
    _img(tmp_path / "cat" / "1.png")
    index = scan_folder(tmp_path)
    assert index.layout == "imagefolder"
    assert index.classes == ["cat", "train"]
    assert index.splits.tolist() == [-1, -1]


def test_flat_folder(tmp_path: Path) -> None:
    _img(tmp_path / "b.png")
    _img(tmp_path / "a.jpg")
    _touch(tmp_path / "notes" / "readme.txt")  # a sub-folder without images keeps it flat
    _touch(tmp_path / "list.csv")
    index = scan_folder(tmp_path)
    _check_arrays(index)
    assert index.layout == "flat"
    assert index.classes == []
    assert index.paths == ["a.jpg", "b.png"]
    assert index.labels.tolist() == [-1, -1]
    assert index.splits.tolist() == [-1, -1]
    assert index.ignored == ["list.csv", "notes/readme.txt"]


def test_corpus_scans_flat_and_labelled(tmp_path: Path) -> None:
    flat = make_bad_image_corpus(tmp_path / "flat")
    index = scan_folder(tmp_path / "flat")
    assert index.layout == "flat" and index.paths == sorted(flat)
    labelled = make_bad_image_corpus(tmp_path / "labelled", classes=["x", "y"])
    index = scan_folder(tmp_path / "labelled", require_labels=True)
    assert index.layout == "imagefolder" and index.paths == sorted(labelled)
    assert index.labels.tolist() == [0 if p.startswith("x/") else 1 for p in index.paths]


# --------------------------------------------------------------------------- errors


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"'.*nope' does not exist\. Pass the folder") as info:
        scan_folder(tmp_path / "nope")
    assert isinstance(info.value, FeatbankError)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = _img(tmp_path / "one.png")
    with pytest.raises(DatasetError, match=r"'.*one\.png' is not a directory.*not a single file"):
        scan_folder(path)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path)
    msg = str(info.value)
    assert "No images found" in msg and str(tmp_path) in msg
    assert "saw 0 file(s)" in msg
    assert "DATA/<class>/<image>" in msg and ".png" in msg


def test_folder_without_images(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "x.txt")
    _touch(tmp_path / "b" / "y.csv")
    _touch(tmp_path / "c.md")
    with pytest.raises(DatasetError) as info:
        scan_folder(tmp_path)
    msg = str(info.value)
    assert "saw 3 file(s), none of them usable" in msg
    assert "'a/x.txt'" in msg and "DATA/<class>/<image>" in msg


def test_split_folders_without_class_folders(tmp_path: Path) -> None:
    _img(tmp_path / "train" / "1.png")
    _img(tmp_path / "test" / "2.png")
    with pytest.raises(
        DatasetError,
        match=r"saw 2 file\(s\).*'test/2\.png'.*DATA/\{train,val,test\}/<class>/<image>",
    ):
        scan_folder(tmp_path)


def test_single_class(tmp_path: Path) -> None:
    _img(tmp_path / "only" / "1.png")
    _img(tmp_path / "only" / "2.png")
    for require_labels in (False, True):
        with pytest.raises(DatasetError) as info:
            scan_folder(tmp_path, require_labels=require_labels)
        msg = str(info.value)
        assert "found only one class 'only'" in msg.lower()
        assert "2 image(s)" in msg
        assert (
            "add a folder per class, or put images directly in data for unlabelled extraction"
            in msg.lower()
        )


def test_single_class_across_splits(tmp_path: Path) -> None:
    _img(tmp_path / "train" / "cat" / "1.png")
    _img(tmp_path / "test" / "cat" / "1.png")
    with pytest.raises(DatasetError, match="only one class 'cat'"):
        scan_folder(tmp_path)


def test_require_labels_refuses_a_flat_folder(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    assert scan_folder(tmp_path).layout == "flat"
    with pytest.raises(
        DatasetError, match=r"1 image\(s\) but no class folders.*DATA/<class>/<image>"
    ):
        scan_folder(tmp_path, require_labels=True)


def test_unreadable_sub_folder_is_listed(tmp_path: Path) -> None:
    if IS_ROOT:
        pytest.skip("root reads folders whatever their mode")
    _img(tmp_path / "a" / "1.png")
    _img(tmp_path / "b" / "1.png")
    _img(tmp_path / "b" / "locked" / "2.png")
    (tmp_path / "b" / "locked").chmod(0)
    try:
        index = scan_folder(tmp_path)
    finally:
        (tmp_path / "b" / "locked").chmod(0o755)
    assert index.paths == ["a/1.png", "b/1.png"]
    assert index.ignored == ["b/locked/"]
