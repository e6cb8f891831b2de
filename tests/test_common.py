"""The ground floor: atomic writes with the user's umask, and no upward imports."""

import json
import os
import subprocess
import sys

import pytest

from common.io import atomic_write, write_json_atomic
from tests.conftest import REPO


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_json_keeps_non_ascii_readable(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"class": "Dyskératotic"})
    assert "Dyskératotic" in path.read_text(encoding="utf-8")
    assert json.loads(path.read_text())["class"] == "Dyskératotic"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"old": True})

    def broken(tmp):
        tmp.write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("package", ["common", "datasets", "models", "lora"])
def test_lower_packages_do_not_import_the_engine(package):
    code = (f"import sys, {package}; bad = sorted(m for m in sys.modules if m == 'utils' or m.startswith('utils.')); "
            "print(','.join(bad))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
