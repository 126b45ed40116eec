"""Study texts, written in Markdown, as HTML: CommonMark plus pipe tables, rendered by markdown-it-py.

Raw HTML in a text is shown as text (``html`` off), and links with unsafe schemes such as
``javascript:`` are not made into links, so a report never runs what a text contains.
"""
from __future__ import annotations

from markdown_it import MarkdownIt

__all__ = ["markdown_to_html", "inline"]

_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown_to_html(text: str) -> str:
    """Render a Markdown document (paragraphs, lists, tables, code, quotes, headings) to an HTML fragment."""
    return _MARKDOWN.render(text)


def inline(text: str) -> str:
    """Render one line of Markdown (code, emphasis, links) to HTML without a surrounding paragraph."""
    return _MARKDOWN.renderInline(text)
