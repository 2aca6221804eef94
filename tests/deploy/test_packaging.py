"""The package as users install it: a wheel built from the source tree, installed (not editable) into a fresh venv.

`pip install -e` serves files from the checkout, so it hides anything the wheel leaves out; a non-editable install
(`pip install .`, the images) only has what the wheel carries. The fresh venv reuses this venv's packages (torch,
ninja) through a `.pth` line instead of installing them again, so the test takes seconds plus the kernel build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _source_copy(dest: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files, so no stale build/ or egg-info feeds the wheel."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are the source")
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (found,) = out.glob("remix_serve-*.whl")
    return found


def test_wheel_carries_every_file_of_the_package(wheel: Path):
    """Every tracked file under remix_serve/ (sources, C++ kernels, data) is in the wheel."""
    tracked = subprocess.run(
        ["git", "ls-files", "remix_serve"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted(name for name in tracked if name not in in_wheel)
    assert not missing, f"{wheel.name} leaves out {missing} (package data in pyproject.toml)"


def test_installed_wheel_builds_and_loads_the_cpu_kernels(wheel: Path, tmp_path: Path):
    """From the installed copy, not the checkout: cpu_kernels.available() builds csrc/remix_cpu.cpp and runs it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # This venv's packages (torch, ninja, ...) after the fresh venv's own, so remix_serve comes from the wheel.
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "zz_project_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    check = (
        "import remix_serve, torch\n"
        "from remix_serve.vllm_plugin import cpu_kernels as k\n"
        "print(remix_serve.__file__)\n"
        "assert k.available(), 'CPU kernels unavailable'\n"
        "x = torch.randn(3, 8); router = torch.randn(4, 8)\n"
        "mask, ids = k.route(x, router, 2)\n"
        "assert mask.shape == (3, 4) and ids.shape == (3, 2) and mask.sum().item() == 6\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "REMIX_CPU_KERNELS": "1"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(python), "-c", check], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert Path(proc.stdout.splitlines()[0]).is_relative_to(site), proc.stdout
    assert list((tmp_path / "ext").glob("remix_cpu/remix_cpu*.so")), "no kernel library was built"
