"""What counts as one line of plain text: the rule every free-text field (spec names, descriptions,
tuning-database strings) must pass before kernelgen uses it.

Generated files quote free text (templating.py), so this is the second wall: a character that some
reader treats as a line break or a control code (Python's tokenizer, str.splitlines, a terminal, a
diff) is refused where the data is read, with a message naming it.
"""

from __future__ import annotations

import unicodedata

# Cc: C0/C1 control codes (\n \r \t \x0b \x0c \x1c-\x1f \x85 ...); Zl/Zp: U+2028, U+2029;
# Cs: lone surrogates (JSON can spell them, UTF-8 cannot store them).
_REFUSED_CATEGORIES = {"Cc": "a control character", "Zl": "a line separator", "Zp": "a paragraph separator",
                       "Cs": "a lone surrogate"}


def describe(ch: str) -> str:
    """U+000A (LINE FEED): the code point and its name, for messages."""
    name = unicodedata.name(ch, None)
    if name is None and unicodedata.category(ch) == "Cc":
        name = _CONTROL_NAMES.get(ord(ch), "control")
    return f"U+{ord(ch):04X}" + (f" ({name})" if name else "")


_CONTROL_NAMES = {0x09: "TAB", 0x0A: "LINE FEED", 0x0B: "LINE TABULATION", 0x0C: "FORM FEED",
                  0x0D: "CARRIAGE RETURN", 0x1C: "FILE SEPARATOR", 0x1D: "GROUP SEPARATOR",
                  0x1E: "RECORD SEPARATOR", 0x85: "NEXT LINE", 0x00: "NUL", 0x1B: "ESCAPE", 0x7F: "DELETE"}


def clean(text: str) -> str:
    """`text` with every refused character replaced by a space: for text kernelgen records itself
    (a compiler's error message), so that what it writes it can read back."""
    return "".join(" " if problem(ch) else ch for ch in text)


def problem(text: str, allow: str = "") -> str | None:
    """None if `text` is one line of printable text, else what is wrong with it (naming the first
    offending character). `allow`: characters accepted anyway (an expression may span lines)."""
    for ch in text:
        if ch in allow:
            continue
        kind = _REFUSED_CATEGORIES.get(unicodedata.category(ch))
        if kind is None and ch.splitlines() != [ch]:
            kind = "a line break"  # belt and braces: whatever str.splitlines splits on
        if kind:
            return f"contains {describe(ch)}, {kind}; only one line of printable text is allowed"
    return None
