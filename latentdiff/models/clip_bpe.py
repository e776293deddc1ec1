"""CLIP's byte-level BPE tokenizer, without importing open_clip: the same ids as open_clip.SimpleTokenizer.

    bpe = clip_bpe()                 # the vocabulary is read once per process
    bpe.encode("a red circle")       # [320, 736, 7117]: no start/end tokens (bpe.start_id, bpe.end_id)

The text is cleaned as open_clip cleans it (ftfy, HTML unescaped twice, whitespace collapsed, lower case),
split into words by CLIP's regex, and each word's UTF-8 bytes, one character per byte, are merged pair by
pair in the order the vocabulary file ranks the pairs.

The vocabulary file ships inside the open_clip package; it is found without importing the package (that
import pulls torchvision, transformers and timm: seconds), so a text-only load stays quick.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import regex

from ..errors import CheckpointError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2         # the merges CLIP uses: the file's first lines after its header
START_OF_TEXT, END_OF_TEXT = "<start_of_text>", "<end_of_text>"
CLIP_VOCAB_SIZE = 49408          # 2 x 256 byte symbols (plain and word-final), the merges, start (49406), end
WORD_END = "</w>"                # marks a word's last symbol, so "red" at a word's end is its own token

# Words: a special token, an English contraction, a run of letters, one digit, or a run of other non-space
# characters (open_clip's pattern; the special tokens match as words, so a prompt can spell one out).
WORD_PATTERN = regex.compile(
    rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE)
# Text that ftfy.fix_text leaves alone up to line breaks (which the whitespace collapse erases anyway):
# printable ASCII without '&' (ftfy unescapes HTML entities until none is left, open_clip only twice), plus
# tab and line breaks; other control characters (ftfy removes them, and terminal escapes) are not plain.
PLAIN_TEXT = regex.compile(r"[\t\n\r\x20-\x25\x27-\x7e]*")


def byte_symbols() -> dict[int, str]:
    """byte -> the character standing for it: printable Latin-1 bytes stand for themselves, the other 68
    (control characters, space, ...) for chr(256), chr(257), ... in byte order, so no symbol is whitespace.
    The dict's order (printable bytes first) is the order of the first 256 token ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def vocab_path() -> Path:
    """open_clip's bundled vocabulary file, found without importing open_clip."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / VOCAB_FILE).is_file():
            return Path(folder) / VOCAB_FILE
    where = f"not in {', '.join(folders)}" if folders else "the open_clip package (open_clip_torch) is not installed"
    raise CheckpointError(f"CLIP's tokenizer vocabulary {VOCAB_FILE} not found ({where}); it ships with "
                          f"open_clip_torch: pip install open_clip_torch")


def clean(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy.fix_text, HTML unescaped twice, whitespace collapsed, lower case."""
    if not PLAIN_TEXT.fullmatch(text):
        import ftfy  # only for text ftfy could change (tested: clean is the same without it on plain text)

        text = ftfy.fix_text(text)
    return " ".join(html.unescape(html.unescape(text)).split()).lower()


class CLIPBPE:
    """The tokenizer of one vocabulary file: `encode(text)` -> token ids, `decode(ids)` -> text."""

    def __init__(self, path: str | Path):
        with gzip.open(path) as file:
            lines = file.read().decode("utf-8").split("\n")[1:MERGES + 1]  # line 0: a version header
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != MERGES or any(len(pair) != 2 for pair in merges):
            raise CheckpointError(f"{path}: not CLIP's BPE vocabulary (expected {MERGES} merge lines)")
        self.byte_char = byte_symbols()
        symbols = list(self.byte_char.values())
        vocab = [*symbols, *(s + WORD_END for s in symbols), *("".join(pair) for pair in merges),
                 START_OF_TEXT, END_OF_TEXT]
        self.ids = {token: i for i, token in enumerate(vocab)}  # a repeated token keeps its last id, as open_clip
        self.tokens = vocab
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}  # lower rank: merged first
        self.start_id, self.end_id = self.ids[START_OF_TEXT], self.ids[END_OF_TEXT]  # 49406, 49407
        self.word_symbols = lru_cache(maxsize=1 << 16)(self._word_symbols)  # prompts repeat their words

    def encode(self, text: str) -> list[int]:
        """The token ids of `text` (without start and end)."""
        return [self.ids[symbol] for word in WORD_PATTERN.findall(clean(text)) for symbol in self.word_symbols(word)]

    def decode(self, ids: list[int]) -> str:
        """The text of token ids (cleaned, as encode saw it), as open_clip decodes: each word-final token ends
        with a space, start/end tokens are their names. The bytes are joined before decoding: one character's
        UTF-8 bytes may lie in two tokens."""
        raw = bytearray()
        for i in ids:
            token = self.tokens[i]
            if token in (START_OF_TEXT, END_OF_TEXT):
                raw += token.encode()
                continue
            end = token.endswith(WORD_END)
            raw += bytes(self.char_byte[c] for c in (token[:-len(WORD_END)] if end else token))
            raw += b" " if end else b""
        return raw.decode("utf-8", errors="replace")

    def _word_symbols(self, word: str) -> tuple[str, ...]:
        """A word's BPE symbols: one per UTF-8 byte (the last one word-final), then, again and again, every
        occurrence of the best-ranked adjacent pair merged (left to right), until no adjacent pair is a merge."""
        if word in (START_OF_TEXT, END_OF_TEXT):
            return (word,)
        parts = [self.byte_char[b] for b in word.encode("utf-8")]
        parts[-1] += WORD_END
        while len(parts) > 1:
            best = min(pairwise(parts), key=lambda pair: self.ranks.get(pair, MERGES))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if parts[i] == best[0] and i + 1 < len(parts) and parts[i + 1] == best[1]:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)


@lru_cache(maxsize=None)
def clip_bpe() -> CLIPBPE:
    """The tokenizer of open_clip's bundled vocabulary, read once per process."""
    return CLIPBPE(vocab_path())
