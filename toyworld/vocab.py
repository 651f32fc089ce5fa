"""The toy world's CLIP-style tokenizer: a tiny byte-pair vocabulary in which every word is one token.

:func:`write_tokenizer` writes ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` that
``transformers.CLIPTokenizer.from_pretrained`` loads offline. The vocabulary holds the special
tokens, every letter (with and without the ``</w>`` end-of-word mark, so any lowercase word still
tokenizes), and the merges that build each toy word into a single token. The merges are learned
by the ordinary BPE procedure on the toy words, so applying them in rank order rebuilds each word.

:class:`WordTokenizer` is the same mapping for toy prompts in pure Python, so the reward files
carry their vocabulary and need no tokenizer folder; a test checks both give the same ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .world import (
    BACKGROUNDS,
    COUNT_WORDS,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # as SD1.5: every prompt embedding is (b, 77, width)
END = "</w>"


def toy_words() -> list[str]:
    words = list(COUNT_WORDS.values()) + list(SIZES) + list(BACKGROUNDS) + ["background"]
    words += list(SHAPES) + [s + "s" for s in SHAPES]
    for phrase in POSITION_PHRASES.values():
        words += phrase.split()
    return sorted(set(words))


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    pieces = {w: list(w[:-1]) + [w[-1] + END] for w in words}
    merges = []
    while any(len(p) > 1 for p in pieces.values()):
        counts: dict[tuple[str, str], int] = {}
        for parts in pieces.values():
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(sorted(counts), key=lambda pair: counts[pair])  # ties broken by sorted order
        merges.append(best)
        joined = best[0] + best[1]
        for word, parts in pieces.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            pieces[word] = out
    return merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [","]
    merges = _learn_merges(toy_words())
    tokens = letters + [c + END for c in letters] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(folder: Path) -> dict[str, int]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return vocab


class WordTokenizer:
    """Toy prompts -> (b, 77) ids, as CLIPTokenizer pads them: BOS, words, EOS, EOS padding."""

    def __init__(self, vocab: dict[str, int], max_length: int = MAX_LENGTH):
        self.vocab, self.max_length = vocab, max_length
        self.bos, self.eos = vocab[BOS], vocab[EOS]

    def ids(self, prompt: str) -> list[int]:
        words = re.findall(r"[a-z]+|[^\sa-z]", prompt.lower())
        unknown = [w for w in words if w + END not in self.vocab]
        if unknown:
            raise ValueError(
                f"HyperAlign: the toy reward does not know the word(s) {unknown} in {prompt!r}. "
                "HINT: toy rewards score toy-world prompts only (toyworld/assets/prompts/*.txt)."
            )
        ids = [self.bos] + [self.vocab[w + END] for w in words][: self.max_length - 2] + [self.eos]
        return ids + [self.eos] * (self.max_length - len(ids))

    def __call__(self, prompts: list[str]):
        import torch

        return torch.tensor([self.ids(p) for p in prompts], dtype=torch.long)
