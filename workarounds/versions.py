"""The check every workaround makes before it reaches into a private internal: is the installed version one it
was verified against?"""

from __future__ import annotations

import importlib.metadata
import platform


class UnverifiedVersion(RuntimeError):
    """A workaround meets a version of the library it mends that nobody has verified it against."""


def installed_version(distribution: str) -> str:
    """The installed version of a distribution ("grpcio", "jina"), or of the interpreter ("python")."""
    if distribution == "python":
        return platform.python_version()
    return importlib.metadata.version(distribution)


def series_of(version: str, series: str) -> bool:
    """Whether `version` belongs to `series`: "1.68.0" and "1.68.2" to "1.68", not "1.680.0" nor "1.69.0"."""
    return version == series or version.startswith(series + ".")


def require_verified(workaround: str, verified: dict[str, tuple[str, ...]], test: str) -> None:
    """Raise UnverifiedVersion unless every distribution in `verified` is installed in one of its series.

    `workaround` is the module's name, `test` the test that proves it on a new version."""
    for distribution, series in verified.items():
        installed = installed_version(distribution)
        if not any(series_of(installed, one) for one in series):
            known = ", ".join(f"{one}.x" for one in series)
            raise UnverifiedVersion(
                f"{workaround} was verified against {distribution} {known}; {installed} is installed: "
                f"re-run {test} and extend VERIFIED"
            )
