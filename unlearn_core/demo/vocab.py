"""Build a CLIP tokenizer (vocab.json + merges.txt) for the demo model's small vocabulary.

CLIP's BPE works on byte-mapped characters with a `</w>` end-of-word marker and reads merges in
rank order. We learn merges on our caption corpus until every corpus word is one token; any other
word still tokenizes, as several byte-level pieces. Written by hand because the corpus is a few
hundred words and the merges must follow CLIP's exact pre-tokenization, which `transformers`
applies when it loads the files — the `tokenizers` trainer uses a different word-boundary scheme.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

# CLIP's pre-tokenization pattern (transformers' CLIPTokenizer), letters-only variant of \p{L}.
_WORD_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)
START, END = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def _words(lines: list[str]) -> Counter:
    table = bytes_to_unicode()
    counts: Counter = Counter()
    for line in lines:
        for word in _WORD_PATTERN.findall(line.lower()):
            symbols = [table[b] for b in word.encode("utf-8")]
            symbols[-1] = symbols[-1] + "</w>"
            counts[tuple(symbols)] += 1
    return counts


def learn_merges(lines: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair until every word is a single symbol."""
    words = _words(lines)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged


def write_clip_tokenizer_files(lines: list[str], folder: Path, model_max_length: int) -> int:
    """Write vocab.json, merges.txt and the tokenizer configs; return the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(lines)
    base = list(bytes_to_unicode().values())
    tokens = base + [token + "</w>" for token in base] + ["".join(pair) for pair in merges] + [START, END]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": START,
        "eos_token": END,
        "unk_token": END,
        "pad_token": END,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)
