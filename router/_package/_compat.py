"""The old import names (extractors, router, heads, train), deprecated: one more release, then removed (issue 27).

An old name is the same module object as the new one (``router is backbone_router.router``, ``router.model is
backbone_router.router.model``): nothing runs twice and isinstance holds across the names. How:

* ``import router`` runs the folder's ``__init__`` under the name ``router`` (the installed deprecated copy, or the
  folder itself where the repository root is on sys.path). Its first lines call :func:`alias_old_name`, which warns,
  imports ``backbone_router.router`` and puts it in ``sys.modules["router"]``; the import system then hands out
  that module (it reads sys.modules after the ``__init__`` ran). The rest of that ``__init__`` runs once more in a
  throwaway namespace, importing names that already exist.
* ``import router.model`` (or ``from .config import ...`` in that throwaway ``__init__``) then finds, first on
  sys.meta_path, :class:`OldNameFinder`: for a submodule of an old name that is aliased, it imports the new module
  and returns that very object. A user's own ``router.py`` is left alone: the finder acts only while
  ``sys.modules["router"]`` is ``backbone_router.router``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

OLD_NAMES = ("extractors", "heads", "router", "train")
PACKAGE = "backbone_router"


def alias_old_name(name: str) -> None:
    """Make the old top-level name ``name`` the module ``backbone_router.<name>``, with a DeprecationWarning."""
    warnings.warn(f"'import {name}' is deprecated and goes in the next release: use "
                  f"'import {PACKAGE}.{name}' (or 'from {PACKAGE}.{name} import ...')", DeprecationWarning,
                  stacklevel=3)  # the importing line (the import system's own frames are skipped)
    if not any(isinstance(f, OldNameFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, OldNameFinder())
    sys.modules[name] = importlib.import_module(f"{PACKAGE}.{name}")


class OldNameFinder(importlib.abc.MetaPathFinder):
    """``<old name>.x.y`` -> the module ``backbone_router.<old name>.x.y`` itself, while the old name is aliased."""

    def find_spec(self, fullname, path=None, target=None):
        top, dot, _ = fullname.partition(".")
        if not dot or top not in OLD_NAMES:
            return None
        old, new = sys.modules.get(top), sys.modules.get(f"{PACKAGE}.{top}")
        if old is None or old is not new:
            return None  # not aliased (a user's own module of that name, say): not ours
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"{PACKAGE}.{fullname}"))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self.spec  # the import system set it to the alias's spec: the module keeps its own
