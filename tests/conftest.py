from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The suite runs tiny models: their small matmuls gain nothing from threads, and on a busy
    # 2-core machine OpenMP spin-waits make them many times slower. Subprocesses started by the
    # tests get OMP_NUM_THREADS=1 for the same reason.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# A few KB of text for a tiny tokenizer: English prose plus accented, CJK and emoji characters,
# so that some characters become single tokens and others stay split over several byte tokens.
_BPE_TEXT = [
    "The history of the city begins with a small village on the river bank.",
    "Mixture-of-Depths models route only some of the tokens through each routed block.",
    "A naïve café owner in Zürich sold crème brûlée and déjà vu to the tourists.",
    "東京 and 北京 are capitals; 東京 is in Japan and 北京 is in China.",
    "Numbers like 1234, 56.78 and 9e10 appear in tables, lists and footnotes.",
    'She said: "the quick brown fox jumps over the lazy dog" and then laughed.',
]


@pytest.fixture(scope="session")
def bpe_tokenizer_file(tmp_path_factory) -> Path:
    """tokenizer.json of a byte-level BPE (vocab 400) trained here on a few KB of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The byte alphabet makes every text encodable (no unknown token), as in GPT-2's tokenizer.
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_BPE_TEXT * 10, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return path
