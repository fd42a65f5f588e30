"""Plain-text paragraphs from a MediaWiki XML dump (gensim's shortened enwiki test dump).

We parse the dump ourselves instead of importing gensim: gensim is installed with
--no-deps (its scipy/smart_open stack is not needed) and only its data file is used.
The cleaner is deliberately simple; paragraphs that still look like markup are dropped
rather than repaired.
"""
from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gere_ds.errors import InputError


@dataclass(frozen=True)
class Article:
    title: str
    paragraphs: list[str]


# Blocks whose content is never prose (formulae, galleries, references).
_DROP_BLOCKS = re.compile(
    r"<(ref|math|gallery|timeline|score|syntaxhighlight|source|pre|code|imagemap|table|chem)\b[^>]*?"
    r"(/>|>.*?</\1\s*>)", re.S | re.I)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")           # innermost {{...}}; applied until stable
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)        # innermost {| ... |}
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")      # innermost [[...]]
_EXT_LINK_LABEL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]")
_EXT_LINK_BARE = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\]")
_HEADING = re.compile(r"^=+.*=+\s*$")
_BOLD_ITALIC = re.compile(r"'{2,}")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACES = re.compile(r"[ \t\u00a0]+")
# Namespaced links that are not part of the running text (files, categories, interwiki).
_NON_TEXT_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|wikipedia|wp|[a-z]{2,3}(-[a-z]+)?):", re.I)
_LEFTOVER_MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "|", "<", ">", "==", "__", "http://", "https://")


def _until_stable(pattern: re.Pattern[str], repl: str, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


# A few inline templates carry running text; dropping them would leave holes in sentences
# ("reached {{convert|100|km}} in altitude"). All other templates are dropped.
_TEXT_TEMPLATES = {"nowrap", "nobr", "lang", "math", "mvar", "sic", "nihongo", "transl", "small", "em"}
_RANGE_WORDS = {"-", "\u2013", "to", "and", "or", "x", "by", "+/-"}


def _render_template(match: re.Match[str]) -> str:
    parts = [p.strip() for p in match.group(0)[2:-2].split("|")]
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p]  # named arguments are formatting options
    if name in ("convert", "cvt") and len(args) >= 2:
        if len(args) >= 4 and args[1] in _RANGE_WORDS:
            return f"{args[0]} {args[1]} {args[2]} {args[3]}"
        return f"{args[0]} {args[1]}"
    if name == "as of" and args:
        return f"As of {args[0]}"
    if name.startswith("lang-") and args:
        return args[0]
    if name == "lang" and len(args) >= 2:
        return args[1]
    if name in _TEXT_TEMPLATES and args:
        return args[0]
    return ""


def _until_stable_fn(pattern: re.Pattern[str], repl: Callable[[re.Match[str]], str], text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _replace_link(match: re.Match[str]) -> str:
    inner = match.group(1)
    if _NON_TEXT_LINK.match(inner):
        return ""
    return inner.split("|")[-1]  # [[target|label]] -> label; [[target]] -> target


def clean_wikitext(text: str) -> str:
    """Strip templates, tables, refs, tags and link syntax; keep paragraph breaks."""
    text = _COMMENT.sub("", text)
    text = html.unescape(text)  # the dump escapes once inside XML; &nbsp; etc. remain
    text = _COMMENT.sub("", text)
    text = _DROP_BLOCKS.sub("", text)
    text = _until_stable_fn(_TEMPLATE, _render_template, text)
    text = _until_stable(_TABLE, "", text)
    # innermost-first, so [[File:x|caption with [[link]]]] is removed whole
    text = _until_stable_fn(_INNER_LINK, _replace_link, text)
    text = _EXT_LINK_LABEL.sub(r"\1", text)
    text = _EXT_LINK_BARE.sub("", text)
    text = _TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    return text


def split_paragraphs(clean: str, min_words: int) -> list[str]:
    """Paragraphs = runs of prose lines; headings, lists and indents end a paragraph."""
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            para = _tidy(" ".join(current))
            if _is_prose(para, min_words):
                paragraphs.append(para)
            current.clear()

    for line in clean.splitlines():
        stripped = line.strip()
        if not stripped or _HEADING.match(stripped) or stripped[0] in "*#:;|!{}":
            flush()
            continue
        current.append(stripped)
    flush()
    return paragraphs


def _tidy(text: str) -> str:
    text = _SPACES.sub(" ", text)
    text = _EMPTY_PARENS.sub("", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    return _SPACES.sub(" ", text).strip()


def _is_prose(text: str, min_words: int) -> bool:
    if len(text.split()) < min_words:
        return False
    if any(mark in text for mark in _LEFTOVER_MARKUP):
        return False
    # A paragraph starting in lower case or with punctuation lost its opening to markup.
    if not (text[0].isupper() or text[0].isdigit() or text[0] in "\"'("):
        return False
    # The shortened dump cuts articles mid-sentence; keep only finished paragraphs.
    return text[-1] in '.!?"\u201d)'


def iter_articles(dump: Path, min_words: int) -> Iterator[Article]:
    """Main-namespace, non-redirect articles of a .xml.bz2 dump with their paragraphs."""
    try:
        with bz2.open(dump, "rb") as stream:
            for _, elem in ET.iterparse(stream, events=("end",)):
                if elem.tag.rsplit("}", 1)[-1] != "page":
                    continue
                title = elem.findtext("./{*}title") or ""
                namespace = elem.findtext("./{*}ns") or "0"
                text = elem.findtext("./{*}revision/{*}text") or ""
                redirect = elem.find("./{*}redirect") is not None
                elem.clear()
                if namespace != "0" or redirect or text.lstrip().upper().startswith("#REDIRECT"):
                    continue
                paragraphs = split_paragraphs(clean_wikitext(text), min_words)
                if paragraphs:
                    yield Article(title, paragraphs)
    except (OSError, EOFError, ET.ParseError) as err:
        raise InputError(f"cannot read the Wikipedia dump ({err}); reinstall gensim==4.4.0",
                         file=str(dump)) from None
