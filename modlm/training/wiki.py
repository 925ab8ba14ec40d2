"""The default corpus: the English Wikipedia sample shipped inside the gensim wheel, as plain text.

``iter_enwiki_documents`` streams the MediaWiki XML dump and yields one cleaned article at a time;
``clean_wikitext`` is the markup-to-prose cleanup it applies (regex-based, tuned on that sample).
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["ENWIKI_FILENAME", "MIN_DOC_CHARS", "clean_wikitext", "default_corpus_path", "iter_enwiki_documents"]

ENWIKI_FILENAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_INSTALL_HINT = "run `pip install --no-deps gensim==4.4.0` (or `make install`)"

# Articles shorter than this after cleanup are stubs, disambiguation lists or leftovers of markup.
MIN_DOC_CHARS = 500


def default_corpus_path() -> Path:
    """Path of gensim's bundled enwiki XML sample, found without importing gensim.

    gensim's own dependencies (scipy, smart_open...) are deliberately not installed, so importing
    it would fail; ``find_spec`` only locates the package folder.
    """
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "test" / "test_data" / ENWIKI_FILENAME
        if path.is_file():
            return path
    where = f" (gensim found at {', '.join(locations)} but without the file)" if locations else ""
    raise FileNotFoundError(f"default corpus {ENWIKI_FILENAME} not found{where}: {_INSTALL_HINT}")


# Innermost constructs only (no nested opener inside), so repeating the substitution until nothing
# changes peels nested templates/tables/links from the inside out.
_TEMPLATE_RE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*?\}\}", re.S)
_TABLE_RE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*?\|\}", re.S)
# Single brackets are allowed inside a link ("Bicyclo[1.1.0]butane" in a caption), double ones are
# not; captions of [[File:...]] may span lines.
_LINK_RE = re.compile(r"\[\[((?:(?!\[\[|\]\]).)*)\]\]", re.S)
_COMMENT_RE = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_SELF_CLOSING_RE = re.compile(r"<ref\b[^>]*/\s*>", re.I)
_REF_RE = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
# Tags whose *content* is not prose either (formulas, galleries, code, charts).
_DROP_CONTENT_TAGS = "math|chem|ce|gallery|timeline|imagemap|syntaxhighlight|source|score|hiero|graph|mapframe"
_DROP_TAG_RE = re.compile(rf"<({_DROP_CONTENT_TAGS})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_HTML_TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>")
_EXTERNAL_LINK_RE = re.compile(r"\[(?:(?:https?|ftp)://|//|mailto:)[^\s\]]*(?:\s+([^\]]*))?\]", re.I)
_HEADING_RE = re.compile(r"^(={1,6})[ \t]*(.*?)[ \t]*\1[ \t]*$", re.M)
_NON_PROSE_NAMESPACES = {"file", "image", "category", "media"}
_LANGUAGE_LINK_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:")
# Sections that are lists of citations or links, not prose.
_DROP_SECTIONS = {
    "see also", "references", "notes", "external links", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "external links and references", "other", "gallery",
}  # fmt: skip


def _sub_until_stable(pattern: re.Pattern[str], repl: Any, text: str) -> str:
    """Apply ``pattern.sub`` until the text stops changing (one pass per nesting level)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(match: re.Match[str]) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; media/category/language links -> ''."""
    target, _, label = match.group(1).partition("|")
    target = target.strip()
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _NON_PROSE_NAMESPACES:
        return ""
    if not label and _LANGUAGE_LINK_RE.match(target):  # [[de:Anarchismus]] interlanguage link
        return ""
    if label.strip():
        return label
    # [[:Category:X]] shows "Category:X"; [[#Section]] shows "Section"; the pipe trick [[a (b)|]] shows "a".
    target = re.sub(r"^(?:wikt|wiktionary):", "", target.lstrip(":").lstrip("#"), flags=re.I)
    return re.sub(r"\s*\([^)]*\)$", "", target) if "|" in match.group(1) else target


def _drop_sections(text: str, titles: set[str]) -> str:
    """Remove each section whose heading is in ``titles`` (lowercase), with its subsections."""
    out: list[str] = []
    skip_level = 0  # level of the section being dropped; 0 = keeping
    pos = 0
    for m in _HEADING_RE.finditer(text):
        if not skip_level:
            out.append(text[pos : m.start()])
        level = len(m.group(1))
        if skip_level and level > skip_level:
            pos = m.end()
            continue
        skip_level = level if m.group(2).strip().lower() in titles else 0
        if not skip_level:
            out.append(m.group(0))
        pos = m.end()
    if not skip_level:
        out.append(text[pos:])
    return "".join(out)


def clean_wikitext(text: str) -> str:
    """MediaWiki markup -> readable plain text (headings become their own lines, links their labels).

    Regex-based, so it is an approximation tuned on the gensim sample, not a full wikitext parser:
    templates, references, tables, media and category links are dropped rather than rendered.
    """
    text = _COMMENT_RE.sub("", text)
    text = _REF_SELF_CLOSING_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _DROP_TAG_RE.sub("", text)
    text = _sub_until_stable(_TEMPLATE_RE, "", text)
    text = _sub_until_stable(_TABLE_RE, "", text)
    # Leftovers of unbalanced braces (truncated articles, stray "}}" in a template argument).
    text = re.sub(r"\{\{[^\n]*|^[ \t]*(?:\}\}|\|\})[ \t]*$", "", text, flags=re.M)
    text = _HTML_TAG_RE.sub("", text)
    # External links first: in "[[File:x|a [http://y caption]]]" the link pattern would otherwise
    # end at the external link's "]" + the first "]" of the closing pair.
    text = _EXTERNAL_LINK_RE.sub(lambda m: m.group(1) or "", text)
    text = _sub_until_stable(_LINK_RE, _link_text, text)
    text = re.sub(r"\[\[|\]\]", "", text)  # unbalanced link brackets
    text = re.sub(r"'{2,}", "", text)  # ''italic'', '''bold''', '''''both'''''
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and other behaviour switches
    text = _drop_sections(text, _DROP_SECTIONS)
    text = _HEADING_RE.sub(lambda m: m.group(2), text)
    text = re.sub(r"^-{4,}\s*$", "", text, flags=re.M)  # horizontal rules
    text = re.sub(r"^[*#:;]+[ \t]*", "", text, flags=re.M)  # list and indent markers
    text = re.sub(r"^\|.*$", "", text, flags=re.M)  # stray table rows
    # Entities last, so an escaped "&lt;tag&gt;" in the article text survives as literal text.
    text = html.unescape(text).replace("\xa0", " ").replace("\u200e", "").replace("\u200b", "")
    # Removed templates/refs leave "( )", "(; )", double spaces and spaces before punctuation.
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"[ \t]+([,.;:])", r"\1", text)
    text = re.sub(r"\([ \t]*[,;:]*[ \t]*", "(", text)  # "( , Phoibos" -> "(Phoibos"
    text = re.sub(r"[,;: \t]+\)", ")", text)  # "(Akhilleus, )" -> "(Akhilleus)"
    text = re.sub(r" ?\(\)", "", text)
    text = re.sub(r"([,;:])(?:[ \t]*[,;])+", r"\1", text)  # ",," or ":," left by removed items
    text = "\n".join(line.strip() for line in text.split("\n"))
    # A line that is only punctuation is what is left of a removed list item or infobox.
    text = re.sub(r"^[\W_]+$", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _local(tag: str) -> str:
    """'{http://www.mediawiki.org/xml/export-0.10/}page' -> 'page' (the namespace URI varies by dump)."""
    return tag.rsplit("}", 1)[-1]


def iter_enwiki_documents(path: str | Path, min_chars: int = MIN_DOC_CHARS) -> Iterator[str]:
    """Stream a MediaWiki XML dump (``.bz2``) and yield ``"Title\\n\\nclean text"`` per article.

    Only non-redirect pages in namespace 0 (articles) whose cleaned body has at least
    ``min_chars`` characters are yielded.
    """
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if _local(elem.tag) != "page":
                continue
            fields = {_local(child.tag): child for child in elem}
            title = (fields["title"].text or "").strip() if "title" in fields else ""
            ns = (fields["ns"].text or "").strip() if "ns" in fields else ""
            revision = fields.get("revision")
            raw = ""
            if revision is not None:
                text_el = next((c for c in revision if _local(c.tag) == "text"), None)
                raw = (text_el.text or "") if text_el is not None else ""
            # Free the page subtree now: a real dump is far larger than memory.
            elem.clear()
            if ns != "0" or "redirect" in fields or raw.lstrip()[:9].upper() == "#REDIRECT":
                continue
            body = clean_wikitext(raw)
            if len(body) >= min_chars:
                yield f"{title}\n\n{body}"
