"""README.md runs as written: every ```python block executes, every ```bash block parses.

The Python blocks run in a folder laid out like the one README command (1) leaves behind, in
miniature: ``data/elpv/{train,test}/<class>/`` (PIL images, the quickstart's classes),
``runs/elpv.h5`` (a real cache of it) and ``models/quickstart-linear.onnx`` (a real export), made
with the tiny ``test_tiny`` backbone. A block that embeds images itself runs the real
EfficientNet-Lite0 weights and is marked slow.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

try:  # tests/ may or may not be a package
    from .conftest import make_image_folder
except ImportError:
    from conftest import make_image_folder

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.usefixtures("one_thread")
#: The quickstart's classes (ELPV defect probability 0, 1/3, 2/3, 1), which README comments show.
CLASSES = ("p000", "p033", "p067", "p100")


def _blocks(language: str) -> list[tuple[int, str]]:
    """(line number of the first code line, code) of every fenced block in ``language``."""
    text = README.read_text(encoding="utf-8")
    return [
        (text[: m.start()].count("\n") + 2, m.group(1))
        for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.M | re.S)
    ]


def _needs_export(code: str) -> bool:
    return "OnnxClassifier(" in code


def _is_slow(code: str) -> bool:
    """Embedding with the real weights, fitting with the full protocol (plots), or an ONNX export."""
    return "featbank.extract(" in code or "featbank.fit(" in code or "featbank.compare(" in code or _needs_export(code)


def _python_params() -> list:
    """One param per Python block."""
    return [pytest.param(code, id=f"README.md:{line}", marks=[pytest.mark.slow] if _is_slow(code) else [])
            for line, code in _blocks("python")]


def _featbank_commands() -> list:
    """Every ``featbank ...`` line of the bash blocks, continuation lines joined."""
    commands = []
    for line, code in _blocks("bash"):
        for offset, text in enumerate(code.replace("\\\n", " \n").splitlines()):
            if text.strip().startswith("featbank "):
                commands.append(pytest.param(text.strip(), id=f"README.md:{line + offset}"))
    return commands


def test_readme_has_blocks_to_check() -> None:
    assert len(_blocks("python")) >= 4 and len(_featbank_commands()) >= 30


@pytest.fixture(scope="module")
def quickstart_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/elpv and runs/elpv.h5, as after README command (1) and the README's extract example."""
    import featbank

    root = tmp_path_factory.mktemp("readme")
    make_image_folder(root / "data" / "elpv", classes=CLASSES, n_per_class=6, splits=("train", "test"))
    featbank.extract(root / "data" / "elpv", root / "runs" / "elpv.h5", backbone="test_tiny", engine="torch",
                     num_workers=0, progress=False)
    return root


@pytest.fixture(scope="module")
def quickstart_onnx(quickstart_like: Path, onnx_cache_dir: Path) -> Path:
    """Adds models/quickstart-linear.onnx: a linear probe on runs/elpv.h5, exported (seconds to minutes)."""
    import featbank

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATBANK_CACHE_DIR", str(onnx_cache_dir))  # the embedder's ONNX, shared with other tests
        result = featbank.fit(quickstart_like / "runs" / "elpv.h5", "linear",
                              out=quickstart_like / "models" / "quickstart-linear")
        featbank.export_model(result.path, quickstart_like / "models" / "quickstart-linear.onnx")
    return quickstart_like


@pytest.mark.parametrize("code", _python_params())
def test_readme_python_block_runs(code: str, request: pytest.FixtureRequest, tmp_path: Path, _isolated_cache_dir: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    shutil.copytree(request.getfixturevalue("quickstart_onnx" if _needs_export(code) else "quickstart_like"), work)
    if "featbank.extract(" in code or "featbank.compare(" in code:  # the block writes caches itself, as a reader would
        for name in ("elpv.h5", "elpv.h5.lock"):
            (work / "runs" / name).unlink(missing_ok=True)
        # The backbone's ONNX export (a minute for Lite0) is shared with the other tests, as in test_extract.
        (_isolated_cache_dir / "onnx").symlink_to(request.getfixturevalue("onnx_cache_dir"), target_is_directory=True)
    monkeypatch.chdir(work)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    if "clf.classes" in code:  # the comment beside it shows the quickstart's classes
        assert str(list(CLASSES)) in out


@pytest.mark.parametrize("code", [pytest.param(code, id=f"README.md:{line}") for line, code in _blocks("bash")])
def test_readme_bash_block_parses(code: str) -> None:
    """bash -n: unquoted parentheses (--param hidden_sizes=(512,)) or <placeholders> are syntax errors."""
    r = subprocess.run(["bash", "-n"], input=code, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", _featbank_commands())
def test_readme_featbank_command_parses(command: str) -> None:
    """Each example's options exist and its values pass click's checks (the command itself is not run)."""
    import click

    from featbank.cli.main import cli

    name, *args = shlex.split(command, comments=True)[1:]
    ctx = cli.make_context("featbank", [name])
    sub = cli.get_command(ctx, name)
    assert sub is not None, f"{command!r}: there is no 'featbank {name}' command"
    try:
        sub.make_context(name, args, parent=ctx)
    except click.exceptions.Exit:  # --help and the like
        pass
    except click.UsageError as e:
        pytest.fail(f"{command!r}: {e.format_message()}")
