"""Lexing of rule text: logical lines, shell-like words, and the ``Bad`` refusal.

A rules file is a shell script reduced to what the HOWTO's scripts used:
backslash-newline continues a line, words split on blanks, single and double
quotes, backslash escapes and ``#`` comments at the start of a word. Nothing
is expanded (``$WAN`` stays a word; the forwarders know that symbol). Also
the small helpers every dialect shares to describe a bad word.
"""

from __future__ import annotations

from collections.abc import Iterator


class Bad(Exception):
    """One refused line; the message is the reason."""


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, text) per command: backslash-newline joins lines."""
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw.rstrip("\r")
        if not buf:
            start = n
        stripped = line.rstrip()
        if stripped.endswith("\\") and not stripped.lstrip().startswith("#"):
            buf.append(stripped[:-1] + " ")
            continue
        buf.append(line)
        yield start, "".join(buf)
        buf = []
    if buf:
        yield start, "".join(buf)


def split_words(line: str) -> list[str]:
    """Shell-like words: quotes, backslash escapes, ``#`` comments at a word start."""
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t\v\f\r":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
            i += 1
        elif c == "#" and not in_word:
            break
        elif c == "'":
            j = line.find("'", i + 1)
            if j < 0:
                raise Bad("unterminated ' quote")
            cur.append(line[i + 1 : j])
            in_word, i = True, j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= n:
                    raise Bad('unterminated " quote')
                d = line[i]
                if d == '"':
                    break
                if d == "\\" and i + 1 < n and line[i + 1] in '"\\$`':
                    i += 1
                    d = line[i]
                cur.append(d)
                i += 1
            in_word, i = True, i + 1
        elif c == "\\":
            if i + 1 < n:
                cur.append(line[i + 1])
            in_word, i = True, i + 2
        else:
            cur.append(c)
            in_word, i = True, i + 1
    if in_word:
        words.append("".join(cur))
    return words


def printable(s: str) -> str:
    """A word as quoted in a message, cut to 40 characters."""
    s = s if len(s) <= 40 else s[:37] + "..."
    return repr(s)


def is_option(tok: str) -> bool:
    return len(tok) > 1 and tok[0] == "-"


def suggest(opt: str, valid: set[str]) -> str:
    """``-0`` -> ``: did you mean -O (letter O)?``"""
    for a, b, what in (("0", "O", "letter O, not zero"), ("1", "l", "letter l"), ("1", "I", "letter I")):
        alt = opt.replace(a, b)
        if alt != opt and alt in valid:
            return f" (a {'zero' if a == '0' else 'digit one'}): did you mean {alt} ({what})?"
    return ""


def not_a_mask(tok: str) -> str:
    """A port word read after an address; ``/8`` there is a mask cut off by a stray space."""
    if tok.startswith("/"):
        raise Bad(f"{printable(tok)} after an address: a stray space? write ADDR/MASK as one word")
    return tok
