"""The one device resolver: every command's --device and TrainConfig.device."""

import pytest
import torch

from modlm.devices import parse_device


@pytest.mark.parametrize("local_rank", [None, 0, 3])
def test_cpu_and_auto_resolve_on_a_machine_without_cuda(local_rank, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_device("cpu", local_rank=local_rank) == torch.device("cpu")
    assert parse_device("auto", local_rank=local_rank) == torch.device("cpu")


@pytest.mark.parametrize(
    "flag, name, fragment",
    [
        ("--device", "cuda", "--device='cuda' is invalid: CUDA is not available here (use cpu or auto)"),
        ("TrainConfig.device", "cuda:1", "TrainConfig.device='cuda:1' is invalid: CUDA is not available here"),
        ("--device", "gpu", "--device='gpu' is invalid: must be one of auto | cpu | cuda | cuda:N | mps"),
    ],
)
def test_a_device_this_machine_lacks_names_the_flag_and_the_value(flag, name, fragment, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        parse_device(name, flag, local_rank=0 if flag.startswith("Train") else None)
    assert fragment in str(err.value)


def test_a_training_process_gets_its_own_gpu_and_makes_it_current(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert parse_device("cuda") == torch.device("cuda") and not current  # a command: no rank, no side effect
    assert parse_device("auto", "TrainConfig.device", local_rank=2) == torch.device("cuda", 2)
    assert parse_device("cuda", "TrainConfig.device", local_rank=3) == torch.device("cuda", 3)
    assert parse_device("cuda:1", "TrainConfig.device", local_rank=3) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 2), torch.device("cuda", 3), torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="has 4 CUDA device"):
        parse_device("cuda:7", "TrainConfig.device", local_rank=0)
