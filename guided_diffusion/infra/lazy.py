"""Package attributes loaded on first access (PEP 562), so light commands skip heavy imports.

A package lists which of its public names live in which submodule; importing the package then
costs nothing for them, and ``package.name`` imports the submodule the first time it is used.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping


def lazy_attributes(package: str, namespace: dict, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for ``package`` whose ``names`` map public name -> submodule.

    Assign the pair to the package's ``__getattr__`` and ``__dir__``; ``namespace`` is the
    package's ``globals()`` (a loaded name is cached there, so the lookup runs once per name).
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list:
        return sorted(set(_public(namespace)) | set(names))

    return __getattr__, __dir__


def _public(namespace: dict) -> Iterable[str]:
    return (n for n, v in namespace.items() if not n.startswith("_") and not _is_module(v))


def _is_module(value: Any) -> bool:
    return type(value).__name__ == "module"
