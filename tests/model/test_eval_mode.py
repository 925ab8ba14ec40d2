"""eval_mode puts a model back in the mode it found it in, exception or not."""

import pytest
from torch import nn

from modlm.model.eval_mode import eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_even_when_the_block_raises(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model) as m:
        assert m is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not model.training
        raise RuntimeError("boom")
    assert model.training is training and model[1].training is training
