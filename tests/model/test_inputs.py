"""The input checks of MoDTransformer.forward: what passes, what is refused, and when the range is read."""

import pytest
import torch

from modlm.config import ModelConfig
from modlm.model.inputs import check_inputs, check_token_ids
from modlm.model.transformer import MoDTransformer


def test_valid_inputs_pass_int64_and_int32_ids_and_ignored_targets():
    model = MoDTransformer(ModelConfig.from_name("tiny")).eval()
    idx = torch.randint(0, 256, (2, 8))
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1  # the ignore index
    ref = model(idx, targets)
    out = model(idx.to(torch.int32), targets)
    torch.testing.assert_close(out.logits, ref.logits)
    assert torch.isfinite(ref.loss)
    check_inputs(256, torch.tensor([[0, 255]]), torch.tensor([[255, -1]]))  # both ends of the range


@pytest.mark.parametrize(
    "ids,fragment",
    [
        (torch.tensor([[1, 256]]), "token id 256"),
        (torch.tensor([[-1, 2]]), "token id -1"),
        (torch.tensor([[1.0, 2.0]]), "torch.float32"),
        (torch.tensor([1, 2]), "shape (2,)"),
        ([[1, 2]], "got list"),
    ],
)
def test_bad_ids_are_refused_by_name(ids, fragment):
    with pytest.raises(ValueError) as e:
        check_token_ids(ids, 256, "idx_BT")
    assert fragment in str(e.value) and str(e.value).startswith("idx_BT ")


def test_targets_must_match_the_ids_shape_so_nothing_is_silently_reshaped():
    idx = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match=r"targets_BT has shape \(2, 8, 1\): it must match idx_BT's \(2, 8\)"):
        check_inputs(256, idx, idx[..., None])
    with pytest.raises(ValueError, match="token id -2 .*-1 marks an ignored position"):
        check_inputs(256, idx, torch.full((2, 8), -2))


def test_range_is_read_on_cpu_only_and_never_while_compiling(monkeypatch):
    bad = torch.tensor([[1, 999]])
    # Off the CPU (CUDA in practice; meta here) reading values would be a host sync per step: skipped.
    check_token_ids(bad.to("meta"), 256)
    check_token_ids(bad, 256, check_range=False)
    with pytest.raises(ValueError, match="dtype torch.float32"):  # metadata checks still run
        check_token_ids(bad.float().to("meta"), 256)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check_token_ids(bad, 256)  # a traced graph must not read values
    with pytest.raises(ValueError, match="token id 999"):  # unless asked (calibration: off the hot path)
        check_token_ids(bad, 256, check_range=True)
