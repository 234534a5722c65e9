"""Generated sections of a Markdown file, kept between a start and an end marker comment."""

from __future__ import annotations

__all__ = ["replace_section"]


def replace_section(text: str, start: str, end: str, section: str, heading: str | None = None) -> str:
    """``text`` with the part from ``start`` to ``end`` (markers included) replaced by ``section``.

    ``section`` holds its own markers. Without the markers in ``text`` it is appended, under
    ``## heading`` when one is given.
    """
    section = section.rstrip("\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        return head + section + tail
    title = f"## {heading}\n\n" if heading else ""
    return text.rstrip("\n") + "\n\n" + title + section + "\n"
