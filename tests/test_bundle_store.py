"""No bundle is ever lost: --overwrite to replace, atomic swap, recovery after SIGKILL, one writer, disk errors.

The kills are real: a child process saves a bundle and SIGKILLs itself at the dangerous moment
(a deterministic point reached by wrapping one step of the save in the child only).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from featbank.bundles import load_bundle, save_bundle
from featbank.errors import BundleError

REPO = Path(__file__).resolve().parents[1]

MANIFEST = {"kind": "head", "classes": ["a", "b"], "backbone": {"backbone": "test_tiny", "embed_dim": 2},
            "head": {"type": "sklearn", "file": "head.skops"}}


def _save(path: Path, content: bytes, overwrite: bool = False) -> Path:
    return save_bundle(path, json.loads(json.dumps(MANIFEST)), {"head.skops": content}, overwrite=overwrite)


def _child(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    prelude = textwrap.dedent("""
        import json, os, signal, sys, time
        from pathlib import Path
        import featbank.bundles.store as store
        from featbank.bundles import save_bundle
        from featbank.errors import FeatbankError
        MANIFEST = json.loads(sys.argv[1])
        def save(path, content, overwrite=True):
            try:
                save_bundle(Path(path), json.loads(json.dumps(MANIFEST)), {"head.skops": content}, overwrite=overwrite)
            except FeatbankError as e:
                print(f"Error: {e}", file=sys.stderr)
                sys.exit(e.exit_code)
    """)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code), json.dumps(MANIFEST), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_killed_between_the_two_renames_the_old_bundle_comes_back(tmp_path):
    """Where no atomic exchange exists, a SIGKILL between 'old aside' and 'new in' loses nothing."""
    path = _save(tmp_path / "victim", b"old")
    proc = _child("""
        store._exchange = lambda a, b: False          # the two-rename fallback
        real = os.rename
        def rename(a, b):
            real(a, b)
            if ".old-" in str(b):                     # the old bundle is aside, the new one not yet in
                os.kill(os.getpid(), signal.SIGKILL)
        os.rename = rename
        save(sys.argv[2], b"new")
    """, str(path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not path.exists() and any(".victim.old-" in n for n in _listing(tmp_path))
    assert load_bundle(path).read_weights() == b"old"  # recovered on open
    _save(path, b"newer", overwrite=True)
    assert (path / "head.skops").read_bytes() == b"newer"
    assert _listing(tmp_path) == ["victim"]  # the killed writer's temporary folder is gone too


def test_killed_right_after_the_exchange_the_new_bundle_is_there(tmp_path):
    path = _save(tmp_path / "victim", b"old")
    proc = _child("""
        real = store._exchange
        def exchange(a, b):
            ok = real(a, b)
            os.kill(os.getpid(), signal.SIGKILL)
        store._exchange = exchange
        save(sys.argv[2], b"new")
    """, str(path))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_bundle(path).read_weights() == b"new"
    _save(path, b"newer", overwrite=True)
    assert _listing(tmp_path) == ["victim"]


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_sigkill_at_any_moment_leaves_a_whole_bundle(tmp_path, delay):
    path = _save(tmp_path / "victim", b"old")
    big = 8 << 20
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import json, sys
        from pathlib import Path
        from featbank.bundles import save_bundle
        m = json.loads(sys.argv[1])
        for i in range(50):
            save_bundle(Path(sys.argv[2]), json.loads(json.dumps(m)), {"head.skops": bytes([i % 250]) * int(sys.argv[3])},
                        overwrite=True)
    """), json.dumps(MANIFEST), str(path), str(big)], cwd=REPO)
    time.sleep(1.5 + delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    data = load_bundle(path).read_weights()  # sha256-checked: a whole bundle, old or new
    assert data in (b"old", *(bytes([i]) * big for i in range(50)))


def test_second_writer_is_refused_naming_the_first(tmp_path):
    path = _save(tmp_path / "victim", b"old")
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import json, sys, time
        from pathlib import Path
        import featbank.bundles.store as store
        from featbank.bundles import save_bundle
        real = store.swap_in
        def swap_in(tmp, path):
            Path(sys.argv[3]).touch()
            while not Path(sys.argv[4]).exists():
                time.sleep(0.02)
            real(tmp, path)
        store.swap_in = swap_in
        import featbank.bundles
        featbank.bundles.swap_in = swap_in
        save_bundle(Path(sys.argv[2]), json.loads(sys.argv[1]), {"head.skops": b"first"}, overwrite=True)
    """), json.dumps(MANIFEST), str(path), str(ready), str(go)], cwd=REPO)
    try:
        for _ in range(1500):
            if ready.exists():
                break
            time.sleep(0.02)
        assert ready.exists(), "the first writer never reached its swap"
        second = _child("save(sys.argv[2], b'second')", str(path))
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "victim" in second.stderr
    finally:
        go.touch()
        first.wait(timeout=120)
    assert first.returncode == 0
    assert load_bundle(path).read_weights() == b"first"
    assert _listing(tmp_path) == ["go", "ready", "victim"]


def test_disk_error_while_saving_keeps_the_old_bundle(tmp_path):
    """A write the OS refuses (file size limit, as a full disk would) -> exit 2 naming the path."""
    path = _save(tmp_path / "victim", b"old")
    proc = _child("""
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        save(sys.argv[2], b"x" * (1 << 20))
    """, str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Cannot write bundle" in proc.stderr and str(path) in proc.stderr and "unchanged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert load_bundle(path).read_weights() == b"old"
    assert _listing(tmp_path) == ["victim"]


def test_fit_does_not_replace_a_finetuned_bundle_without_overwrite(tmp_path, tiny_cache):
    """`fit --name X` over an existing bundle used to delete it with rc 0."""
    from featbank.cli.main import cli
    from featbank.fitting import fit

    ft = _save(tmp_path / "models" / "keep", b"precious")
    res = CliRunner().invoke(cli, ["fit", str(tiny_cache), "--head", "linear",
                                   "--out", str(tmp_path / "models" / "keep")])
    assert res.exit_code == 2, res.output
    assert "already exists" in res.output and "--overwrite" in res.output
    assert load_bundle(ft).read_weights() == b"precious"
    with pytest.raises(BundleError, match="already exists"):
        fit(tiny_cache, "linear", out=tmp_path / "models" / "keep")
    assert load_bundle(ft).read_weights() == b"precious"
