"""Reading SQL text the way PostgreSQL's lexer does (``src/backend/parser/scan.l``).

The PostgreSQL engine reads each statement a plan sends before it is sent:
how many statements the text holds, and which words begin it. A reading that
differs from the server's is a way out of the plan's transaction (a
``COMMIT`` the server sees and the guard does not), so the rules here are the
server's, not a regular expression's:

* ``--`` comments end at a line feed *or* a carriage return;
* ``/* */`` comments nest;
* ``'...'`` doubles a quote to escape it, and also reads backslash escapes
  when ``standard_conforming_strings`` is off; ``E'...'`` always does, and a
  string continued on the next line (``'a'`` newline ``'b'``) keeps the
  rules it began with;
* ``B'...'`` and ``X'...'`` end at the next quote; ``U&'...'`` reads like a
  standard string; ``"..."`` and ``U&"..."`` double a quote to escape it;
* ``$tag$...$tag$`` ends at the same delimiter, and ``$`` inside a name or a
  ``$1`` parameter starts nothing;
* names are ASCII letters, digits, ``_``, ``$`` and every non-ASCII
  character, so ``E'`` starts an escape string only where a token starts.

What the server would refuse to read (an unterminated comment, string or
delimiter, a NUL character) raises :class:`Unreadable`: the guard refuses it
rather than guess. Where this reading can only differ from the server's in
the safe direction (it sees *more* statements than there are, e.g. in a
``BEGIN ATOMIC`` body, or a PostgreSQL 16 ``0b1E'...'`` literal), the
statement is refused too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Literal

# Character classes of scan.l, on decoded text: every non-ASCII character is a
# name character there (the server reads its encoding's high bytes).
_NAME_START = r"A-Za-z_\u0080-\U0010FFFF"
_NAME_REST = _NAME_START + r"0-9$"
_DOLLAR_TAG = rf"[{_NAME_START}][{_NAME_START}0-9]*"
#: The characters that go on a name, for a regular expression's character class.
NAME_CHARS = _NAME_REST

# One token at a time; the kinds whose end needs more than a pattern (nested
# comments, strings, dollar quotes) only match their opening here.
_TOKEN = re.compile(
    rf"""
      (?P<space>[ \t\n\r\f\v]+)
    | (?P<line>--[^\n\r]*)
    | (?P<block>/\*)
    | (?P<estring>[eE]')
    | (?P<bits>[bBxX]')
    | (?P<ustring>[uU]&')
    | (?P<uname>[uU]&")
    | (?P<string>')
    | (?P<qname>")
    | (?P<dollar>\$(?:{_DOLLAR_TAG})?\$)
    | (?P<param>\$[0-9]+)
    | (?P<word>[{_NAME_START}][{_NAME_REST}]*)
    | (?P<number>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)
    | (?P<semicolon>;)
    | (?P<other>[^\x00])
    """,
    re.VERBOSE,
)
# Many tokens at once, for stretches that hold no semicolon and start no
# /* comment, dollar quote, or string with a prefix (a name is not taken where
# E'...', B'...', X'...', U&'...' or U&"..." starts). Cut as _TOKEN would cut
# them (standard strings continued on the next line read the same as two), a
# stretch only saves time on long statements. Two kinds: for counting
# statements, with -- comments, quoted names and (while standard_conforming_strings
# is on) standard strings; for finding placeholders, code only.
_CODE_TOKEN = rf"""
      (?![eEbBxX]')(?![uU]&['"])[{_NAME_START}][{_NAME_REST}]*
    | (?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?
    | \$[0-9]+
    | -(?!-)
    | /(?!\*)
    | [^'"$;\-/\x00 \t\n\r\f\v{_NAME_START}0-9]
"""
_QUOTED_NAME = r'| "(?:[^"]+|"")*+"'
_STANDARD_STRING = "| '(?:[^']+|'')*+'"


def _plain(token: str, comments: bool) -> re.Pattern[str]:
    # A token first (never whitespace or a comment alone), then more, with whitespace.
    more = f"{token}|--[^\n\r]*" if comments else token
    return re.compile(rf"(?:{token})(?:[ \t\n\r\f\v]*(?:{more}))*", re.VERBOSE)


_PLAIN = {
    ("statements", True): _plain(_CODE_TOKEN + _QUOTED_NAME + _STANDARD_STRING, comments=True),
    ("statements", False): _plain(_CODE_TOKEN + _QUOTED_NAME, comments=True),
    ("code", True): _plain(_CODE_TOKEN, comments=False),
    ("code", False): _plain(_CODE_TOKEN, comments=False),
}

# The rest of a string or quoted name after its opening quote, closing quote
# included. Possessive: the server never reads a doubled quote as two.
_STANDARD_REST = re.compile(r"(?:[^']+|'')*+'")
_BITS_REST = re.compile(r"[^']*'")
_ESCAPE_REST = re.compile(r"(?:[^'\\]+|\\.|'')*+'", re.DOTALL)
_NAME_QUOTE_REST = re.compile(r'(?:[^"]+|"")*+"')
_BLOCK_EDGE = re.compile(r"/\*|\*/")
# Whitespace holding a newline, then a quote: the string goes on (scan.l's quotecontinue).
_CONTINUE = re.compile(r"(?:[ \t\f\v]|--[^\n\r]*)*[\n\r](?:[ \t\n\r\f\v]+|--[^\n\r]*[\n\r])*'")

TokenKind = Literal[
    "space", "comment", "string", "name", "param", "word", "number", "semicolon", "other", "plain"
]
Token = tuple[TokenKind, int, int]  # kind, start, end (a slice of the text)


class Unreadable(ValueError):
    """The text is one PostgreSQL would refuse to read; the reason says where."""


def tokens(
    sql: str,
    *,
    standard_strings: bool = True,
    start: int = 0,
    plain: Literal["", "statements", "code"] = "",
) -> Iterator[Token]:
    """Yield *sql*'s tokens from *start* on, as PostgreSQL's lexer cuts them.

    *standard_strings* is the session's ``standard_conforming_strings``. With
    *plain*, a stretch comes as one ``"plain"`` token (never whitespace or a
    comment alone): with ``"statements"`` one that also holds ``--`` comments,
    quoted names and standard strings, with ``"code"`` one of code only. The
    same cuts, fewer tokens.

    :raises Unreadable: an unterminated comment, string, quoted name or
        dollar quote, or a NUL character.
    """
    position, length = start, len(sql)
    match_token = _TOKEN.match
    match_plain = _PLAIN[plain, standard_strings].match if plain else None
    while position < length:
        if match_plain is not None and (stretch := match_plain(sql, position)) is not None:
            yield "plain", position, stretch.end()
            position = stretch.end()
            continue
        match = match_token(sql, position)
        if match is None:
            raise Unreadable("a NUL character")
        group = match.lastgroup
        end = match.end()
        kind: TokenKind
        if group == "line":
            kind = "comment"
        elif group == "block":
            kind, end = "comment", _block_end(sql, end)
        elif group in {"string", "estring", "ustring", "bits"}:
            kind, end = "string", _string_end(sql, end, group, standard_strings)
        elif group in {"qname", "uname"}:
            rest = _NAME_QUOTE_REST.match(sql, end)
            if rest is None:
                raise Unreadable('an unterminated quoted name (")')
            kind, end = "name", rest.end()
        elif group == "dollar":
            close = sql.find(match[0], end)
            if close < 0:
                raise Unreadable(f"an unterminated dollar quote ({match[0]})")
            kind, end = "string", close + len(match[0])
        else:
            kind = group  # type: ignore[assignment]  # the other group names are kinds
        yield kind, position, end
        position = end


def _block_end(sql: str, start: int) -> int:
    """Return where the ``/*`` comment whose body begins at *start* ends (they nest)."""
    depth = 1
    for edge in _BLOCK_EDGE.finditer(sql, start):
        depth += 1 if edge[0] == "/*" else -1
        if depth == 0:
            return edge.end()
    raise Unreadable("an unterminated /* comment")


def _string_end(sql: str, start: int, group: str, standard_strings: bool) -> int:
    """Return where the string whose body begins at *start* ends, continuations included."""
    if group == "ustring" and not standard_strings:
        raise Unreadable("a U&'...' string while standard_conforming_strings is off")
    if group == "bits":
        rest = _BITS_REST
    elif group == "estring" or (group == "string" and not standard_strings):
        rest = _ESCAPE_REST
    else:
        rest = _STANDARD_REST
    while True:
        match = rest.match(sql, start)
        if match is None:
            raise Unreadable("an unterminated quoted string (')")
        more = _CONTINUE.match(sql, match.end())
        if more is None:
            return match.end()
        start = more.end()  # 'a' NEWLINE 'b' is one string, read by the first one's rules


def outline(sql: str, *, standard_strings: bool = True) -> tuple[int, list[str]]:
    """Return how many statements *sql* holds, and the first two tokens of the first one.

    Empty statements (``;;``) do not count, as the server skips them. Words
    come upper-cased when they are ASCII (only those can be keywords).

    :raises Unreadable: see :func:`tokens`.
    """
    first: list[str] = []
    resume, inside = len(sql), False
    for kind, start, end in tokens(sql, standard_strings=standard_strings):
        if kind in {"space", "comment"}:
            continue
        if kind == "semicolon":
            if first:
                resume = end
                break
            continue
        text = sql[start:end]
        first.append(text.upper() if kind == "word" and text.isascii() else text)
        if len(first) == 2:
            resume, inside = end, True
            break
    count = 1 if first else 0
    rest = tokens(sql, standard_strings=standard_strings, start=resume, plain="statements")
    for kind, _, _ in rest:
        if kind in {"space", "comment"}:
            continue
        if kind == "semicolon":
            inside = False
        elif not inside:
            inside = True
            count += 1
    return count, first
