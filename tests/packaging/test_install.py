"""``pip install .`` (a real, non-editable install) ships ``fastjax``, ``fastjax.models`` and
``fastjax.pallas_kernels`` from the top-level folders, nothing else. CI's own install is
editable (``pip install -e``), so without this test a broken package-dir mapping would go unseen."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


@pytest.mark.slow
def test_non_editable_install_ships_every_package(tmp_path):
    src, site = tmp_path / "src", tmp_path / "site"
    src.mkdir()
    # a copy of the sources, so setuptools' in-tree build folders never land in the checkout
    for name in ("pyproject.toml", "README.md", "fastjax", "models", "pallas_kernels"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, src / name, **({"ignore": IGNORE} if copy is shutil.copytree else {}))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    for module in (
        "models/llama.py",
        "models/decoder.py",
        "pallas_kernels/attention.py",
        "loading.py",
        "cli.py",
    ):
        assert (site / "fastjax" / module).is_file(), module
    assert not (site / "models").exists() and not (site / "pallas_kernels").exists()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "import fastjax, fastjax.models.llama as m, fastjax.pallas_kernels.rms_norm as k; "
        "from fastjax.models import decoder; "
        "assert all(x.__file__.startswith(sys.argv[1]) for x in (fastjax, m, k, decoder)), "
        "[x.__file__ for x in (fastjax, m, k)]"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe, str(site)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
