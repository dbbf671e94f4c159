"""Error text for people: an exception's message on one line, as commands and batch error records show it."""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most 400 characters (transformers' loading errors span several); the
    exception's type name when it has no message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."
