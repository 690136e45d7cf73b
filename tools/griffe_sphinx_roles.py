"""Griffe extension for the API docs: render the Sphinx roles of our docstrings as Markdown.

The docstrings use reStructuredText roles (``:func:`hvp.eigsh```, ``:math:`\\lambda```), which
Markdown would show verbatim. This turns ``:func:``/``:class:``/... into inline code (``~x.y``
shows ``y``) and ``:math:`` into ``$...$`` (rendered by ``pymdownx.arithmatex``). Loaded by
mkdocstrings (``extensions`` in mkdocs.yml); the docstrings themselves are unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj|const):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")


def _role(m: re.Match) -> str:
    short, target = m.group(1), m.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def convert(text: str) -> str:
    """Sphinx roles in ``text`` as Markdown (inline code and ``$math$``)."""
    return _ROLE.sub(_role, _MATH.sub(lambda m: f"${m.group(1)}$", text))


class SphinxRoles(griffe.Extension):
    """Rewrite each docstring's Sphinx roles when griffe loads an object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        """Convert the roles of ``obj``'s docstring."""
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
