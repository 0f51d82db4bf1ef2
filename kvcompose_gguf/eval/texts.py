"""Long real text that ships with what is already installed, for KL divergence and chat filler.

- "python-docs": the Python Language Reference topics that CPython's standard
  library ships as `pydoc_data.topics` (about 465k characters on 3.11; the text
  differs between Python versions, so results record the version).
- "gpl-3": the GNU GPL v3 from Debian's `base-files` package
  (/usr/share/common-licenses/GPL-3, about 35k characters, identical everywhere).
"""

from __future__ import annotations

import platform
from pathlib import Path

TEXT_SOURCES = {
    "python-docs": "Python Language Reference topics (stdlib pydoc_data.topics)",
    "gpl-3": "GNU GPL v3, /usr/share/common-licenses/GPL-3 (Debian base-files)",
}


class TextNotAvailableError(FileNotFoundError):
    pass


def long_text(name: str = "python-docs") -> str:
    if name == "python-docs":
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise TextNotAvailableError("this Python has no pydoc_data (stripped standard library)") from None
        # Sorted keys: the dict's order is an implementation detail of the generator script.
        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    if name == "gpl-3":
        path = Path("/usr/share/common-licenses/GPL-3")
        if not path.is_file():
            raise TextNotAvailableError(f"{path} is missing (Debian's base-files package provides it)")
        return path.read_text(encoding="utf-8")
    raise KeyError(f"unknown text {name!r}; known: {', '.join(TEXT_SOURCES)}")


def text_description(name: str) -> str:
    suffix = f", Python {platform.python_version()}" if name == "python-docs" else ""
    return TEXT_SOURCES[name] + suffix
