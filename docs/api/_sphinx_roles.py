"""Griffe extension for the API reference: Sphinx cross-reference roles become links.

refcond's docstrings refer to other objects with Sphinx roles (``:class:`Condition```,
``:meth:`detach```, ``:func:`refcond.load```). griffe's Sphinx parser reads the field lists
(``:param x:``, ``:returns:``) but leaves those roles as text. This extension resolves each role's
target in the scope of the documented object, as Sphinx does, and writes an optional
cross-reference in its place: a link where the target is rendered in the site, plain code where it
is not (a private helper, another library), never a build warning.

mkdocs.yml loads it as an extension of the mkdocstrings Python handler; it is not a page of the
site (``exclude_docs``).
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|meth|func|data|attr|mod|exc|obj|const|type):`(?P<text>[^`]+)`")
TITLED = re.compile(r"(?P<title>.*?)\s*<(?P<target>[^<>]+)>\s*$", re.DOTALL)


def _target_path(obj: griffe.Object | griffe.Alias, name: str) -> str | None:
    """The full path ``name`` refers to from ``obj``'s docstring, or None when it cannot be resolved."""
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head)
    except (griffe.NameResolutionError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        path = None
    if path is None:
        modules = obj.modules_collection if hasattr(obj, "modules_collection") else None
        if modules is not None and head in modules.members:
            path = head  # a fully qualified name: refcond.Condition, refcond_easyref.official
        else:
            return None
    return f"{path}.{rest}" if rest else path


def _replace_roles(obj: griffe.Object | griffe.Alias, text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        raw = match["text"].strip()
        titled = TITLED.fullmatch(raw)
        title, target = (titled["title"], titled["target"]) if titled else (None, raw)
        short = target.startswith("~")
        target = target.lstrip("~!.")
        if title is None:
            title = target.rsplit(".", 1)[-1] if short else target
        path = _target_path(obj, target)
        code = f"<code>{html.escape(title)}</code>"
        if path is None:
            return f"`{title}`"
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return ROLE.sub(replace, text)


def _walk(obj: griffe.Object, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.docstring is not None and ":" in obj.docstring.value:
        new = _replace_roles(obj, obj.docstring.value)
        if new != obj.docstring.value:
            obj.docstring.value = new
            obj.docstring.__dict__.pop("parsed", None)  # re-parse the rewritten text
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, seen)


class SphinxRoles(griffe.Extension):
    """Rewrite ``:class:`X```-style roles in every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, set())
