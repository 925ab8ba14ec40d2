import random

import pytest

WORDS = ["the", "of", "depth", "router", "token", "block", "mixture", "model", "a", "is", "and", "compute"]


@pytest.fixture
def make_corpus(tmp_path):
    """Writes tmp_path/corpus.txt and returns its path: paragraphs of random words, a text whose
    statistics a tiny model learns within the few steps of a test run."""

    def make(seed: int, paragraphs: int, words: int) -> str:
        rng = random.Random(seed)
        path = tmp_path / "corpus.txt"
        path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(paragraphs)))
        return str(path)

    return make
