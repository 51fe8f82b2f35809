"""Token bookkeeping: which token positions of a prompt are the concept, which the instruction.

A prompt is split into words (letters/digits with inner apostrophes, or one punctuation mark);
each word maps to the positions of its tokens in the sequence the text encoder sees (start token
at 0; start/end tokens and padding belong to no word). With a fast tokenizer the character offsets
of each token give the mapping; with a slow one each word is tokenized on its own and the pieces
must reproduce the prompt's tokens exactly, else the prompt is refused.

Concept tokens are the tokens of the concept's content words (articles and prepositions of the
concept phrase left out) wherever the concept phrase occurs; instruction tokens are the remaining
words that are not articles, prepositions, framing words (photo, picture, ...) or punctuation.
So in "Please forget anything about the flag of japan", "flag" and "japan" are concept tokens and
"please", "forget", "anything", "about" instruction tokens; a prompt without the concept phrase
(an implicit description) has no concept tokens at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from unlearn_core.errors import InvalidInput

STOPWORDS = frozenset("a an the of and or to in on at for with by from is are be this that these those".split())
FRAMING_WORDS = STOPWORDS | frozenset("photo photograph picture image drawing painting illustration render".split())
WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class Word:
    text: str
    start: int
    end: int
    positions: tuple[int, ...]  # token positions in the encoder input (start token = 0)


@dataclass(frozen=True)
class TokenMap:
    """A prompt's words and the token positions each one occupies."""

    prompt: str
    input_ids: tuple[int, ...]  # with start/end tokens, without padding
    tokens: tuple[str, ...]
    words: tuple[Word, ...]
    max_length: int

    @property
    def word_positions(self) -> tuple[int, ...]:
        return tuple(sorted({p for w in self.words for p in w.positions}))

    def positions(self, word_indices: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted({p for i in word_indices for p in self.words[i].positions}))

    def find(self, phrase: str) -> list[int]:
        """Start indices (in words) of each occurrence of `phrase`'s words, case-insensitive."""
        target = [w.lower() for w, _, _ in split_words(phrase)]
        words = [w.text.lower() for w in self.words]
        n = len(target)
        return [i for i in range(len(words) - n + 1) if n and words[i : i + n] == target]


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Words (letters/digits with inner apostrophes) and single punctuation marks, with spans."""
    return [(m.group(0), m.start(), m.end()) for m in WORD_RE.finditer(text)]


def _special_ids(tokenizer) -> set[int]:
    return {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}


def map_words(tokenizer, prompt: str) -> TokenMap:
    """Map each word of `prompt` to its token positions with the model's tokenizer.

    Raises InvalidInput if the prompt does not fit the tokenizer's length or cannot be aligned.
    """
    max_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
    ids = list(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)
    if len(ids) > max_length:
        raise InvalidInput(f"prompt {prompt!r} is {len(ids)} tokens; this model's tokenizer takes at most {max_length} (start/end included)")
    special = _special_ids(tokenizer)
    words = split_words(prompt)
    content = [i for i, t in enumerate(ids) if t not in special]
    try:
        encoded = tokenizer(prompt, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
        offsets = encoded.get("offset_mapping")
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers have no offsets
        offsets = None
    mapped: list[Word] = []
    if offsets is not None and len(offsets) == len(ids):
        for text, start, end in words:
            pos = tuple(i for i in content if offsets[i][1] > offsets[i][0] and offsets[i][0] < end and offsets[i][1] > start)
            mapped.append(Word(text, start, end, pos))
    else:  # slow tokenizer: tokenize word by word and check that this reproduces the prompt's tokens
        pieces = [list(tokenizer(text, add_special_tokens=False).input_ids) for text, _, _ in words]
        if [t for piece in pieces for t in piece] != [ids[i] for i in content]:
            raise InvalidInput(f"cannot align the words of {prompt!r} with its tokens")
        cursor = 0
        for (text, start, end), piece in zip(words, pieces):
            mapped.append(Word(text, start, end, tuple(content[cursor : cursor + len(piece)])))
            cursor += len(piece)
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
    return TokenMap(prompt, tuple(int(i) for i in ids), tokens, tuple(mapped), max_length)


@dataclass(frozen=True)
class TokenSets:
    concept: tuple[int, ...]
    instruction: tuple[int, ...]


def token_sets(tmap: TokenMap, concept: str) -> TokenSets:
    """Concept tokens (content words of each occurrence of the concept) and instruction tokens."""
    concept_words = [w.lower() for w, _, _ in split_words(concept)]
    content = [k for k, w in enumerate(concept_words) if w not in STOPWORDS and any(c.isalnum() for c in w)]
    content = content or list(range(len(concept_words)))
    inside, concept_idx = set(), set()
    for start in tmap.find(concept):
        inside.update(range(start, start + len(concept_words)))
        concept_idx.update(start + k for k in content)
    instruction_idx = [
        i for i, w in enumerate(tmap.words) if i not in inside and w.text.lower() not in FRAMING_WORDS and any(c.isalnum() for c in w.text)
    ]
    return TokenSets(tmap.positions(sorted(concept_idx)), tmap.positions(instruction_idx))


def padded(tokenizer, ids: Sequence[int], max_length: int) -> list[int]:
    """Unpadded ids padded to `max_length` as the pipeline's own tokenizer call pads them."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[-1]
    return list(ids)[:max_length] + [int(pad)] * (max_length - len(ids))


def without_positions(tmap: TokenMap, drop: Sequence[int]) -> list[int]:
    """The prompt's token ids (start/end kept, no padding) with the positions in `drop` removed."""
    drop = set(drop)
    return [t for i, t in enumerate(tmap.input_ids) if i not in drop]
