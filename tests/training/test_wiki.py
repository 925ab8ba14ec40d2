"""The bundled Wikipedia sample: wikitext cleanup and finding the file."""

from __future__ import annotations

import bz2
from pathlib import Path

import pytest

from modlm.training.wiki import clean_wikitext, default_corpus_path, iter_enwiki_documents


def test_clean_wikitext_constructs() -> None:
    raw = (
        "{{Infobox thing|name={{nested|x}}|y=1}}\n"
        "'''Alpha''' is a [[Greek alphabet|letter]] of the [[alphabet]].<ref>Cite {{cite book|t=x}}</ref>"
        ' It is common.<ref name="a"/> See [http://example.org the site] and [http://bare.example].\n'
        "<!-- hidden comment -->\n"
        "[[File:Alpha.png|thumb|An [[alpha]] in a [http://x.org caption] [sic]]]\n"
        "== History ==\n"
        "Used in ''antiquity'' &amp; today&nbsp;too.\n"
        "{| class=wikitable\n|-\n| a || b\n{| \n| nested\n|}\n|}\n"
        "\n\n\n\n"
        "* A list <small>item</small>.\n"
        "== References ==\n"
        "* Some book.\n"
        "[[Category:Letters]]\n[[de:Alpha]]\n"
    )
    text = clean_wikitext(raw)
    assert text == (
        "Alpha is a letter of the alphabet. It is common. See the site and.\n\n"
        "History\nUsed in antiquity & today too.\n\nA list item."
    )


def test_clean_wikitext_drops_only_the_listed_section_and_its_subsections() -> None:
    raw = "Intro.\n== Notes ==\nn1\n=== Sub ===\nn2\n== Legacy ==\nKept.\n"
    assert clean_wikitext(raw) == "Intro.\nLegacy\nKept."


def test_missing_gensim_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim==4.4.0"):
        default_corpus_path()


def _page(title: str, ns: int, text: str, redirect: bool = False) -> str:
    tag = '<redirect title="X"/>' if redirect else ""
    return f"<page><title>{title}</title><ns>{ns}</ns>{tag}<revision><text>{text}</text></revision></page>"


def test_iter_enwiki_documents_keeps_long_articles_only(tmp_path: Path) -> None:
    body = "'''Alpha''' is a [[letter]]. " * 30
    pages = [
        _page("Alpha", 0, body),
        _page("Talk:Alpha", 1, body),  # not an article
        _page("Alfa", 0, body, redirect=True),
        _page("Beta", 0, "#REDIRECT [[Alpha]] " + body),
        _page("Stub", 0, "Too short."),
    ]
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    docs = list(iter_enwiki_documents(path))
    assert docs == [f"Alpha\n\n{clean_wikitext(body)}"]
    assert docs[0].startswith("Alpha\n\nAlpha is a letter.")
    assert len(list(iter_enwiki_documents(path, min_chars=1))) == 2  # the stub too
