"""Register zarrckpt's zarr data types as soon as zarr-python is imported.

zarr-python 3.1 collects ``zarr.data_type`` entry points but never loads them,
so plain ``zarr.open()`` of a ``bfloat16``/``float8_*`` array fails unless the
plug-in was registered by hand.  The ``zarrckpt_zarr_dtypes.pth`` file that the
zarrckpt wheel installs into site-packages runs :func:`install` at interpreter
start.  It only puts a small finder on :data:`sys.meta_path`; when (and only
when) the top-level ``zarr`` package is imported, the finder lets the regular
finders locate it, and once ``zarr/__init__`` has run it calls
``_zarrckpt_zarr_dtypes.register_zarr_dtypes()``.

This module uses only ``os`` and ``sys`` (both loaded at start-up anyway); it
never imports zarr, numpy, ml_dtypes, torch or the ``zarrckpt`` package.  Set
the environment variable ``ZARRCKPT_NO_ZARR_AUTOLOAD=1`` to disable it.
"""

import os
import sys

# Not ``typing.TYPE_CHECKING``, and string annotations instead of
# ``from __future__ import annotations``: this module runs at every interpreter
# start and imports nothing beyond os and sys.  Type checkers treat this name
# like ``typing.TYPE_CHECKING``.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

__all__ = ["DISABLE_ENV_VAR", "ZarrDtypesAutoloader", "install"]

#: Environment variable that, when non-empty, turns the hook off.
DISABLE_ENV_VAR = "ZARRCKPT_NO_ZARR_AUTOLOAD"

_TARGET = "zarr"


def _register() -> None:
    """Register the plug-in's data types; never let a failure break ``import zarr``.

    If zarr is being imported *by* ``_zarrckpt_zarr_dtypes`` (that module was
    imported first), the module is only half initialized here: nothing is done,
    and whoever imported it calls ``register_zarr_dtypes()`` (``zarrckpt`` does).
    """
    plugin = sys.modules.get("_zarrckpt_zarr_dtypes")
    if plugin is not None and not hasattr(plugin, "register_zarr_dtypes"):
        return
    try:
        from _zarrckpt_zarr_dtypes import register_zarr_dtypes

        register_zarr_dtypes()
    except Exception as exc:  # pragma: no cover - depends on a broken install
        import warnings

        warnings.warn(
            "zarrckpt could not register its zarr data types (bfloat16, float8_e4m3fn, "
            f"float8_e5m2) with zarr-python: {exc!r}. Call "
            "_zarrckpt_zarr_dtypes.register_zarr_dtypes() by hand.",
            RuntimeWarning,
            stacklevel=2,
        )


class ZarrDtypesAutoloader:
    """Meta path finder that runs :func:`_register` right after ``zarr`` is imported.

    It never finds a module itself: for the name ``zarr`` it asks the finders
    after it for the spec and wraps that spec's loader's ``exec_module`` (on
    the loader instance, so ``module.__loader__`` stays the original loader).
    For every other name it returns ``None`` at once.
    """

    def __init__(self) -> None:
        self._busy = False

    def find_spec(
        self,
        fullname: str,
        path: "Sequence[str] | None" = None,
        target: "ModuleType | None" = None,
    ) -> "ModuleSpec | None":
        """Locate ``zarr`` through the other finders and hook its loader.

        Parameters
        ----------
        fullname : str
            The module name being imported.
        path : sequence of str, optional
            The parent package's ``__path__`` (None for top-level modules).
        target : module, optional
            The module being reloaded, if any.

        Returns
        -------
        ModuleSpec or None
            The spec of ``zarr`` found by the other finders, with its loader
            hooked, or None for any other module.
        """
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec: ModuleSpec | None = None
            for finder in sys.meta_path:
                if finder is self:
                    continue
                find_spec = getattr(finder, "find_spec", None)
                if find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy = False
        if spec is None:
            return None
        loader: Any = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        original = loader.exec_module
        if getattr(original, "_zarrckpt_hooked", False):
            return spec

        def exec_module(module: "ModuleType") -> None:
            original(module)
            if getattr(module, "__name__", None) == _TARGET:
                _register()

        exec_module._zarrckpt_hooked = True  # type: ignore[attr-defined]
        try:  # noqa: SIM105 - contextlib is not worth importing here
            loader.exec_module = exec_module
        except (AttributeError, TypeError):  # pragma: no cover - exotic loaders
            pass
        return spec


def install(force: bool = False) -> None:
    """Install the finder (idempotent); register at once if zarr is already imported.

    Parameters
    ----------
    force : bool
        Install even when the environment variable ``ZARRCKPT_NO_ZARR_AUTOLOAD``
        is set. Without it (the ``.pth`` file at interpreter start) the variable
        set to a non-empty value turns the hook off; ``import zarrckpt`` passes
        ``force=True``, since importing zarrckpt asks for the data types.
    """
    if not force and os.environ.get(DISABLE_ENV_VAR):
        return
    if _TARGET in sys.modules:
        _register()
    if not any(type(f).__name__ == ZarrDtypesAutoloader.__name__ for f in sys.meta_path):
        sys.meta_path.insert(0, ZarrDtypesAutoloader())
