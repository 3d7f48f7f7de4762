"""torchvision's transforms without torchvision's package init, which the package runs on its first use.

``torchvision/__init__.py`` imports every sub-package: ``models`` (each architecture's module),
``ops`` (whose ``roi_align`` imports ``torch._dynamo``), ``datasets``, ``io`` and the compiled ops:
~1.3 s of CPU and ~100 MB in every training rank and evaluation tool, for the three transform modules
they use. :func:`import_torchvision` registers the package without running that file; the first
access to a name the file defines (``torchvision.get_image_backend``, ``__version__``, ...) runs it then,
in the same module object, so code that needs all of torchvision gets all of it, and ``import
torchvision.models`` & co. import as usual. Nothing is skipped for good: the file runs at most once.
"""
from __future__ import annotations

import importlib.util
import sys
import threading
from types import ModuleType

_init_lock = threading.Lock()


def import_torchvision() -> ModuleType:
    """The ``torchvision`` package: as it is if already imported, else registered with its init deferred."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")
    package = importlib.util.module_from_spec(spec)
    initialised = False

    def attribute(name: str):
        # ``from torchvision import transforms`` asks for the attribute before importing the submodule
        if not name.startswith("__") and importlib.util.find_spec(f"torchvision.{name}") is not None:
            return importlib.import_module(f"torchvision.{name}")
        nonlocal initialised
        with _init_lock:
            if not initialised:
                initialised = True
                del package.__getattr__  # the file's own names from now on
                spec.loader.exec_module(package)
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'torchvision' has no attribute {name!r}") from None

    package.__getattr__ = attribute
    sys.modules["torchvision"] = package
    return package
