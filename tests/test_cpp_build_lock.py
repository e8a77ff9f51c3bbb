"""A build lock left by a process stopped while compiling the C++ kernels made every later first CPU call
wait for it forever, silently (torch's FileBaton): lowmem_ops._cpp_backend removes a stale one with a
warning, and names a fresh one it waits for."""

import os
import time

import pytest
from torch.utils import cpp_extension

from lowmem_ops import _cpp_backend


@pytest.fixture
def baton(monkeypatch):
    """torch's existence lock, as up to 2.13 (2.14 holds an OS lock instead)."""
    monkeypatch.setattr(cpp_extension, "FileBaton", object, raising=False)
    monkeypatch.delattr(cpp_extension, "FileLock", raising=False)


@pytest.fixture
def build_dir(tmp_path, monkeypatch, baton):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "lowmem_ops_cpu_test"
    folder.mkdir()
    (folder / "build.ninja").write_text("rule cxx\n")
    return folder


def _age(folder, seconds):
    then = time.time() - seconds
    for p in folder.iterdir():
        os.utime(p, (then, then))


def test_a_stale_lock_is_removed_with_a_warning(build_dir):
    (build_dir / "lock").touch()
    _age(build_dir, _cpp_backend.STALE_LOCK_SECONDS + 60)
    with pytest.warns(UserWarning, match=r"removed .*lock, left 16 min ago by a process stopped while it compiled"):
        _cpp_backend._check_build_lock(build_dir.name)
    assert not (build_dir / "lock").exists() and (build_dir / "build.ninja").exists()


def test_a_fresh_lock_is_another_build_and_stays(build_dir):
    (build_dir / "lock").touch()
    _age(build_dir, 30)
    with pytest.warns(UserWarning, match=r"waiting for another process compiling the C\+\+ kernels .*if none is, delete"):
        _cpp_backend._check_build_lock(build_dir.name)
    assert (build_dir / "lock").exists()


def test_no_lock_no_word(build_dir, recwarn):
    _age(build_dir, _cpp_backend.STALE_LOCK_SECONDS + 60)
    _cpp_backend._check_build_lock(build_dir.name)
    _cpp_backend._check_build_lock("lowmem_ops_cpu_never_built")
    assert not [w for w in recwarn if "lowmem_ops" in str(w.message)]


def test_an_os_lock_file_is_left_alone(build_dir, monkeypatch, recwarn):
    """torch 2.14's FileLock keeps its file; the kernel releases the lock when its holder dies, and
    removing the file could let two builds run at once."""
    monkeypatch.setattr(cpp_extension, "FileLock", object, raising=False)
    (build_dir / "lock").touch()
    _age(build_dir, _cpp_backend.STALE_LOCK_SECONDS + 60)
    _cpp_backend._check_build_lock(build_dir.name)
    assert (build_dir / "lock").exists()
    assert not [w for w in recwarn if "lowmem_ops" in str(w.message)]
