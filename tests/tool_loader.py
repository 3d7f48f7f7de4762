"""Load a command-line tool (or its ``main``) from tools/ (a script folder, not a package on sys.path)."""
import importlib.util
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def tool_module(name: str):
    """tools/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def tool_main(name: str):
    """``main`` of tools/<name>.py."""
    return tool_module(name).main
