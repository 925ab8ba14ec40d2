"""The native few-row kernel computes F.linear, and is used exactly where it applies."""

import pytest
import torch
import torch.nn.functional as F

from modlm import ModelConfig, MoDTransformer
from modlm.inference.calibrate import calibrate_thresholds
from modlm.inference.generate import generate
from modlm.kernels import fewrow as kernels

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="native kernel not built or CPU lacks AVX2/FMA")


class _Spy:
    """Stands in for the extension module and counts kernel calls."""

    def __init__(self, ext):
        self.ext, self.calls = ext, []

    def sgemm_nt(self, *args):
        self.calls.append(args[3:6])  # (M, N, K)
        return self.ext.sgemm_nt(*args)


@pytest.fixture
def spy(monkeypatch):
    s = _Spy(kernels._fewrow)
    monkeypatch.setattr(kernels, "_fewrow", s)
    prev = kernels.set_enabled(True)
    yield s
    kernels.set_enabled(prev)


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("N,K", [(96, 64), (37, 29), (4, 8), (1, 3), (1536, 512)])
def test_kernel_equals_f_linear(spy, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    for bias in (None, b):
        torch.testing.assert_close(kernels.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5 * K**0.5)
    assert spy.calls == [(M, N, K)] * 2


@needs_kernel
def test_kernel_takes_any_leading_shape_and_strided_input(spy):
    w = torch.randn(24, 16)
    x = torch.randn(2, 3, 32)[..., ::2]  # (2, 3, 16), not contiguous
    y = kernels.linear(x, w)
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert spy.calls == [(6, 24, 16)]


@needs_kernel
def test_kernel_threads_give_identical_results():
    # Threads split the weight rows; each output is summed by one thread in the same order.
    x, w = torch.randn(5, 200), torch.randn(301, 200)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.linear(x, w)
        torch.set_num_threads(2)
        two = kernels.linear(x, w)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, two)


@needs_kernel
def test_kernel_is_used_only_where_it_applies(spy):
    w = torch.randn(8, 16, requires_grad=True)
    x = torch.randn(3, 16)
    kernels.linear(x, w)  # w needs a gradient: autograd's path
    assert spy.calls == []
    with torch.no_grad():
        kernels.linear(x, w)
    assert len(spy.calls) == 1
    wd = w.detach()
    cases = [
        (torch.randn(kernels.MAX_ROWS + 1, 16), wd),  # too many rows: torch's mm is as fast
        (x.double(), wd.double()),  # not fp32
        (x.bfloat16(), wd.bfloat16()),
        (x, torch.randn(16, 8).t()),  # weight not contiguous
        (torch.randn(0, 16), wd),  # no rows
    ]
    for xi, wi in cases:
        torch.testing.assert_close(kernels.linear(xi, wi), F.linear(xi, wi))
    assert len(spy.calls) == 1
    b64 = torch.randn(8, dtype=torch.float64)  # F.linear rejects the mix; so must we, the same way
    with pytest.raises(RuntimeError):
        F.linear(x, wd, b64)
    with pytest.raises(RuntimeError):
        kernels.linear(x, wd, b64)
    assert len(spy.calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.linear(x, wd).dtype == torch.bfloat16  # autocast semantics kept
    kernels.set_enabled(False)
    kernels.linear(x, wd)
    assert len(spy.calls) == 1
    assert kernels.describe().startswith("torch (native kernel turned off)")


def test_describe_and_enabled_agree():
    assert kernels.enabled() == (kernels.available() and kernels.describe().startswith("native"))


@needs_kernel
def test_training_never_uses_the_kernel(spy):
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny"))
    idx = torch.randint(0, 256, (1, 8))  # 8 rows: small enough for the kernel, but gradients flow
    out = model(idx, targets_BT=idx)
    out.loss.backward()
    assert spy.calls == []


@needs_kernel
def test_fp32_decoding_with_and_without_kernel_agree(spy):
    """Greedy decoding of an fp32 MoD model: same tokens, same routing, logits to fp32 rounding."""
    torch.manual_seed(0)
    model = MoDTransformer(ModelConfig.from_name("tiny", max_seq_len=96)).eval()
    calibrate_thresholds(model, torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3)), 0.5)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12, 9)]
    native = generate(model, prompts, 32, temperature=0, return_logits=True, trace=True)
    assert spy.calls, "decoding should use the kernel"
    kernels.set_enabled(False)
    reference = generate(model, prompts, 32, temperature=0, return_logits=True, trace=True)
    assert native.tokens == reference.tokens
    assert native.routing == reference.routing
    torch.testing.assert_close(native.logits, reference.logits, rtol=1e-4, atol=1e-4)


def test_without_the_extension_everything_is_f_linear(monkeypatch):
    monkeypatch.setattr(kernels, "_fewrow", None)
    monkeypatch.setattr(kernels, "_AVAILABLE", False)
    assert not kernels.available() and not kernels.enabled()
    assert kernels.describe() == "torch (native kernel not built)"
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with torch.no_grad():
        assert torch.equal(kernels.linear(x, w), F.linear(x, w))
