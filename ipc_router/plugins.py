"""Plugins by import string (``"package.module:attr"``) or by entry-point short name.

Errors say precisely what failed: the module cannot be found, importing it raised, the attribute is missing, or
the object is not callable.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from importlib.metadata import entry_points
from typing import Any

__all__ = ["METRICS_GROUP", "ROUTERS_GROUP", "PluginError", "add_app_dir", "load_plugin"]

ROUTERS_GROUP = "ipc_router.routers"
METRICS_GROUP = "ipc_router.metrics"


class PluginError(ImportError):
    """A plugin could not be loaded; the message says why."""


def add_app_dir(app_dir: str) -> str:
    """Put ``app_dir`` (made absolute) first on ``sys.path``, as uvicorn's ``--app-dir`` does, so that
    ``my_router:factory`` finds ``my_router.py`` there before anywhere else. Returns the absolute path."""
    path = os.path.abspath(app_dir)
    if sys.path[:1] != [path]:
        with contextlib.suppress(ValueError):
            sys.path.remove(path)
        sys.path.insert(0, path)
    return path


def load_plugin(spec: str, group: str, app_dir: str | None = None) -> Any:
    """Resolve ``"module:attr"`` (``attr`` may be dotted), or a short name registered in entry-point ``group``.

    ``app_dir``: a directory searched first for the module (see :func:`add_app_dir`); the CLI passes its
    ``--app-dir``, the working directory by default. The result must be callable (a factory).
    """
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr_path = spec.partition(":")
        if not module_name or not attr_path:
            raise PluginError(f"plugin {spec!r}: expected 'module:attribute'")
        searched = add_app_dir(app_dir) if app_dir is not None else None
        obj = _import_attr(spec, module_name, attr_path, searched)
    else:
        found = [ep for ep in entry_points(group=group) if ep.name == spec]
        if not found:
            names = sorted(ep.name for ep in entry_points(group=group))
            known = f"; known names: {', '.join(names)}" if names else f"; no plugins are registered in {group!r}"
            raise PluginError(f"plugin {spec!r}: not 'module:attribute' and not an entry point name{known}")
        try:
            obj = found[0].load()
        except Exception as e:
            raise PluginError(f"plugin {spec!r} (entry point {found[0].value!r}) failed to load: {e}") from e
    if not callable(obj):
        raise PluginError(f"plugin {spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def _import_attr(spec: str, module_name: str, attr_path: str, app_dir: str | None) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise PluginError(_not_found(spec, module_name, app_dir)) from e
        raise PluginError(f"plugin {spec!r}: importing module {module_name!r} failed: {e}") from e
    except Exception as e:
        raise PluginError(f"plugin {spec!r}: importing module {module_name!r} raised {type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginError(f"plugin {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    return obj


def _not_found(spec: str, module_name: str, app_dir: str | None) -> str:
    where = module_name.replace(".", os.sep)
    first = f"{app_dir} (--app-dir), then " if app_dir is not None else ""
    rest = [p or os.getcwd() for p in sys.path if p != app_dir]
    return (
        f"plugin {spec!r}: module {module_name!r} not found; looked for {where}.py or {where}/__init__.py in "
        f"{first}the Python path ({', '.join(rest)}). Run from the directory that holds it, pass --app-dir DIR, "
        f"or add the directory to PYTHONPATH"
    )
