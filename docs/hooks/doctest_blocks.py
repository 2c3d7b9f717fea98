"""griffe extension: show doctest blocks (``>>>`` ... up to a blank line) as code.

Many docstrings here give a short interactive example outside any section; Markdown would
read its ``>>>`` lines as a quotation. Each such block is fenced as ``pycon`` for the API
reference, leaving the sources as they are (``python -m doctest`` style stays readable).
"""

from __future__ import annotations

from typing import Any

import griffe


def fence_doctests(text: str) -> str:
    out: list[str] = []
    inside = False
    fence_indent = ""
    for line in text.splitlines():
        stripped = line.lstrip()
        if not inside and stripped.startswith(">>>"):
            inside, fence_indent = True, line[: len(line) - len(stripped)]
            out.append(f"{fence_indent}```pycon")
        elif inside and not stripped:
            inside = False
            out.append(f"{fence_indent}```")
        out.append(line)
    if inside:
        out.append(f"{fence_indent}```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
