"""Character classes as Rust defines them, and GPT-2's byte <-> character table.

The `tokenizers` library tests characters with Rust's `char` methods and the `regex` crate,
whose classes are not Python's: `str.isspace()` is true for U+001C..U+001F (not White_Space),
`str.isnumeric()` for CJK numerals like 五 (Lo, not N*), and `re`'s `\\w` differs from Rust's
Unicode `\\w`. So every test here is spelled as a Unicode property for the `regex` module.
"""

import regex

WHITESPACE = r"\p{White_Space}"                                        # char::is_whitespace, regex's \s
WORD = r"[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]"            # the regex crate's Unicode \w
NUMERIC = r"[\p{Nd}\p{Nl}\p{No}]"                                      # char::is_numeric
PUNCTUATION = r"[\p{P}!-/:-@\[-`{-~]"                                  # is_punctuation or is_ascii_punctuation

WHITESPACE_CHAR = regex.compile(WHITESPACE)
NUMERIC_CHAR = regex.compile(NUMERIC)
PUNCTUATION_CHAR = regex.compile(PUNCTUATION)


def _bytes_char() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (tokenizers' bytes_char)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTES_CHAR = _bytes_char()
CHAR_BYTES = {c: b for b, c in BYTES_CHAR.items()}
# str.translate table: a text's UTF-8 bytes, read as latin-1, -> their byte-level characters
_LATIN1_TO_BYTE_LEVEL = {b: c for b, c in BYTES_CHAR.items()}


def to_byte_level(text: str) -> str:
    """Each UTF-8 byte of text as its byte-level character (what ByteLevel pre-tokenizes to)."""
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)


def lowercase(text: str) -> str:
    """Rust's per-character to_lowercase: Python's str.lower() but without the final-sigma rule."""
    if "Σ" not in text:
        return text.lower()
    return "".join(c.lower() for c in text)
