"""The version check of the compat modules (parallel/deepspeed_compat.py, data/streaming_compat.py),
which use another library's private names as of the releases they were read from."""
from __future__ import annotations

from importlib.metadata import version

from packaging.version import Version


def require_version(package: str, written_for: tuple[str, str], module: str) -> None:
    """Refuse, in one line naming both, an installed ``package`` outside ``[low, high)``."""
    installed, (low, high) = version(package), written_for
    if not Version(low) <= Version(installed) < Version(high):
        raise ImportError(f"{package} {installed} is installed, but {module} uses its private names as of "
                          f">={low},<{high}; install a version in that range")
