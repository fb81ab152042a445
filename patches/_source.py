"""Read a vLLM source tree without importing it: the code a patch target names, and the
names a module binds.

The patch guard fingerprints upstream code from the installed vLLM's files (so the check
sees upstream's code even after a patch replaced the object), and `check_wheels` reads
the same way the Python sources of CUDA wheels that cannot be imported here.

A path is 'pkg.module:Qual.name'. Lookup follows what Python would find statically: a
class's own body first, then its bases (resolved through the module's imports), and
re-exports (`from .x import Name`) for module-level names.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

FINGERPRINT_DIGITS = 16
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class Found:
    """A definition found in the tree: its module, its node and its source text."""

    module: str
    node: ast.AST
    text: str


class SourceTree:
    """The Python sources under `root` (the directory holding the `vllm` package)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    @functools.lru_cache(maxsize=None)
    def _parsed(self, module: str) -> tuple[str, ast.Module] | None:
        path = self.module_file(module)
        if path is None:
            return None
        text = path.read_text()
        return text, ast.parse(text)

    def has_module(self, module: str) -> bool:
        return self.module_file(module) is not None

    def find(self, path: str) -> Found | None:
        """The definition `path` names, or None when the tree has none."""
        module, _, qualname = path.partition(":")
        parts = [p for p in qualname.split(".") if p]
        if not parts:
            return None
        found = self._module_name(module, parts[0], depth=0)
        for part in parts[1:]:
            if found is None or not isinstance(found.node, ast.ClassDef):
                return None
            found = self._class_member(found, part, depth=0)
        return found

    def source(self, path: str) -> str | None:
        found = self.find(path)
        return None if found is None else found.text

    def fingerprint(self, path: str) -> str | None:
        """First 16 hex digits of the sha256 of the target's source (as inspect gives it)."""
        text = self.source(path)
        if text is None:
            return None
        return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_DIGITS]

    def binds(self, module: str, name: str) -> bool:
        """Whether `from module import name` would find something (a name or a submodule)."""
        return (self._module_name(module, name, depth=0) is not None
                or self.has_module(f"{module}.{name}")
                or self._assigns(module, name))

    # -- lookup -------------------------------------------------------------------------

    def _found(self, module: str, node: ast.AST) -> Found:
        text, _ = self._parsed(module)
        lines = text.splitlines(keepends=True)
        decorators = getattr(node, "decorator_list", [])
        start = min([node.lineno] + [d.lineno for d in decorators])
        return Found(module, node, "".join(lines[start - 1:node.end_lineno]))

    def _assigns(self, module: str, name: str) -> bool:
        parsed = self._parsed(module)
        if parsed is None:
            return False
        for node in parsed[1].body:
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        return False

    def _module_name(self, module: str, name: str, depth: int) -> Found | None:
        """A def or class bound at module level, following `from ... import` re-exports."""
        parsed = self._parsed(module)
        if parsed is None or depth > 8:
            return None
        for node in parsed[1].body:
            if isinstance(node, _DEFINITIONS) and node.name == name:
                return self._found(module, node)
        for node in ast.walk(parsed[1]):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        source = self._absolute(module, node)
                        found = self._module_name(source, alias.name, depth + 1)
                        if found is not None:
                            return found
        return None

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        is_package = self.module_file(module).name == "__init__.py"
        package = module.split(".")
        package = package if is_package else package[:-1]
        package = package[:len(package) - (node.level - 1)]
        return ".".join(package + ([node.module] if node.module else []))

    def _class_member(self, cls: Found, name: str, depth: int) -> Found | None:
        """A member defined in the class body or, failing that, in one of its bases."""
        if depth > 16:
            return None
        for node in cls.node.body:
            if isinstance(node, _DEFINITIONS) and node.name == name:
                return self._found(cls.module, node)
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return self._found(cls.module, node)
        for base in cls.node.bases:
            base_cls = self._resolve_expression(cls.module, base)
            if base_cls is not None and isinstance(base_cls.node, ast.ClassDef):
                found = self._class_member(base_cls, name, depth + 1)
                if found is not None:
                    return found
        return None

    def _resolve_expression(self, module: str, expression: ast.expr) -> Found | None:
        """A base-class expression (Name, module.Name, or Generic[...]) as a definition."""
        if isinstance(expression, ast.Subscript):
            expression = expression.value
        if isinstance(expression, ast.Name):
            return self._module_name(module, expression.id, depth=0)
        return None
