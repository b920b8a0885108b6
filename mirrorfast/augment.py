"""Input augmentation of Mirror-BERT: random span masking of the second view.

Feature augmentation (dropout, drophead) lives with the encoder in mirrorfast.model.
"""

import random

# The paper leaves strings shorter than this unmasked: a 5-character hole would erase most of them.
MIN_LENGTH_TO_MASK = 30


def mask_span(text: str, k: int, mask_token: str, rng: random.Random) -> str:
    """Replace a random span of k characters of `text` with `mask_token` (once).

    The span starts uniformly in [0, len(text) - k]. Strings shorter than 30 characters, k = 0, and (for a
    large --mask-span) strings no longer than k, which the span would erase whole, are left unchanged.
    (The authors' code joins " [MASK] " with spaces and always the literal BERT token; for WordPiece
    tokenizers that gives the same tokens as this, for byte-level BPE ones the tokenizer's own mask token is
    the one it knows.)
    """
    if not maskable(text, k):
        return text
    start = rng.randint(0, len(text) - k)
    return text[:start] + mask_token + text[start + k :]


def maskable(text: str, k: int) -> bool:
    return k > 0 and len(text) >= MIN_LENGTH_TO_MASK and len(text) > k


def masked_views(texts: list[str], k: int, mask_token: str, rng: random.Random) -> list[str]:
    return [mask_span(t, k, mask_token, rng) for t in texts]
