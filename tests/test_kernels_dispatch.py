"""Backend selection of `kernels.span_attention`, the availability probes and the flash-attn layout.

The tests that run the Triton kernel put its tensors on TEST_DEVICE (tests/conftest.py: the GPU, compiled,
with TRANSFUSION_TEST_DEVICE=cuda); the others check CPU behaviour and stay on the CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import dispatch, flex  # noqa: E402
from kernels.flash import cu_seqlens_from_spans, flash_unavailable  # noqa: E402
from kernels.spans import is_document_causal, spans_from_documents  # noqa: E402
from tests.conftest import TEST_DEVICE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def spans(rows: list[list[tuple[int, list[tuple[int, int]]]]], S: int):
    built = [spans_from_documents(docs, S) for docs in rows]
    return torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])


def inputs(S=48, H=2, H_kv=1, D=16, grad=False, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, S, h, D, generator=gen).to(device).requires_grad_(grad) for h in (H, H_kv, H_kv))
    lo, hi = spans([[(20, [(3, 10)]), (20, [])], [(48, [(0, 30)])]], S)
    return q, k, v, lo.to(device), hi.to(device)


def test_auto_order_and_cpu_choice():
    assert dispatch._AUTO_ORDER == ["flash", "triton", "flex", "sdpa"]
    q, k, v, lo, hi = inputs(grad=True)
    assert dispatch.resolve_backend("auto", q, lo, hi) == "sdpa"
    with torch.no_grad():
        assert dispatch.resolve_backend("auto", q, lo, hi) == "sdpa"  # no interpreter/eager flex in auto


def test_triton_needs_gpu_or_interpreter(monkeypatch):
    q, k, v, lo, hi = inputs()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = kernels.backend_unavailable("triton", q)
    assert reason is not None and "needs a CUDA GPU or TRITON_INTERPRET=1" in reason
    assert "triton" not in kernels.available_backends(q)
    assert dispatch.resolve_backend("auto", q) == "sdpa"
    with pytest.raises(RuntimeError, match="needs a CUDA GPU or TRITON_INTERPRET=1"):
        kernels.span_attention(q, k, v, lo, hi, backend="triton")


def test_named_triton_runs_under_interpreter_with_grads():
    q, k, v, lo, hi = inputs(grad=True, device=TEST_DEVICE)
    assert kernels.backend_unavailable("triton", q) is None
    out = kernels.span_attention(q, k, v, lo, hi, backend="triton")
    ref = kernels.span_attention(q, k, v, lo, hi, backend="sdpa")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_named_flex_inference_only_on_cpu(monkeypatch):
    monkeypatch.setattr(flex, "COMPILE", False)
    q, k, v, lo, hi = inputs(grad=True)
    with pytest.raises(RuntimeError, match="'flex' cannot run here: FlexAttention has no backward on CPU"):
        kernels.span_attention(q, k, v, lo, hi, backend="flex")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = kernels.span_attention(q, k, v, lo, hi, backend="flex")
        torch.testing.assert_close(out, kernels.span_attention(q, k, v, lo, hi, backend="sdpa"),
                                   atol=1e-5, rtol=1e-5)


def test_flash_unavailable_with_clear_message():
    q, k, v, lo, hi = inputs()
    reason = flash_unavailable(q, lo, hi)
    assert reason is not None and "CUDA" in reason
    with pytest.raises(RuntimeError, match="'flash' cannot run here: flash-attn needs a CUDA GPU"):
        kernels.span_attention(q, k, v, lo, hi, backend="flash")


def test_unknown_backend():
    q, k, v, lo, hi = inputs()
    with pytest.raises(ValueError, match="known:"):
        kernels.span_attention(q, k, v, lo, hi, backend="nope")


def test_register_backend_priority_and_auto_devices(monkeypatch):
    monkeypatch.setattr(dispatch, "_BACKENDS", dict(dispatch._BACKENDS))
    monkeypatch.setattr(dispatch, "_AUTO_ORDER", list(dispatch._AUTO_ORDER))
    q, k, v, lo, hi = inputs()
    calls = []

    def fake(q, k, v, kv_lo, kv_hi, scale=None):
        calls.append(scale)
        return torch.zeros_like(q)

    dispatch.register_backend("fake", fake, lambda q, lo=None, hi=None: None, 0, auto_devices=("cuda",))
    assert dispatch.resolve_backend("auto", q) == "sdpa"  # not allowed in auto on CPU
    assert kernels.available_backends(q)[0] == "fake"
    dispatch.register_backend("fake", fake, lambda q, lo=None, hi=None: None, 0)
    kernels.span_attention(q, k, v, lo, hi, scale=0.5)
    assert calls == [0.5]


def test_document_causal_detection_and_cu_seqlens():
    S = 16
    lo, hi = spans([[(5, []), (7, [])], [(16, [])], []], S)  # padding 4, none, the whole row
    assert is_document_causal(lo, hi)
    token_index, cu, max_len = cu_seqlens_from_spans(lo, hi)
    assert token_index.tolist() == list(range(12)) + list(range(16, 32))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 12, 28]
    assert max_len == 16
    img_lo, img_hi = spans([[(6, [(1, 3)]), (6, [])]], S)
    assert not is_document_causal(img_lo, img_hi)
    q = torch.randn(1, S, 2, 16)
    assert "CUDA" in flash_unavailable(q, img_lo, img_hi)


def test_flash_layout_round_trip_with_a_stand_in_flash_attn(monkeypatch):
    """flash_span_attention's gather / cu_seqlens / scatter vs the reference, with a CPU stand-in
    for flash_attn_varlen_func (causal attention inside each cu_seqlens segment)."""
    from kernels import flash

    _stand_in_flash_attn(monkeypatch)
    S = 24
    lo, hi = spans([[(5, []), (7, []), (9, [])], [(24, [])], [(3, [])]], S)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, S, h, 16, generator=gen) for h in (4, 2, 2))
    out = flash.flash_span_attention(q, k, v, lo, hi, scale=0.3)
    torch.testing.assert_close(out, kernels.sdpa_span_attention(q, k, v, lo, hi, scale=0.3),
                               atol=1e-5, rtol=1e-5)


def test_import_does_not_load_triton_kernels():
    """`import kernels` must leave the @triton.jit modules unimported (TRITON_INTERPRET is read
    when they are decorated), and auto picks sdpa on a CPU without the interpreter."""
    code = (
        "import sys, torch, kernels\n"
        "assert 'kernels.triton_span_fwd' not in sys.modules\n"
        "q = torch.randn(1, 4, 2, 16)\n"
        "print(kernels.resolve_backend('auto', q), kernels.backend_unavailable('triton', q))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("sdpa needs a CUDA GPU or TRITON_INTERPRET=1")


def _stand_in_flash_attn(monkeypatch):
    """A CPU stand-in for flash_attn_varlen_func (causal attention inside each cu_seqlens segment)."""
    import types

    import torch.nn.functional as F

    from kernels import flash

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
        out = torch.empty_like(q)  # [N, H, D]
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            seg = [x[a:b].transpose(0, 1) for x in (q, k, v)]  # [H, L, D]
            out[a:b] = F.scaled_dot_product_attention(
                *seg, is_causal=True, scale=softmax_scale, enable_gqa=True).transpose(0, 1)
        return out

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=varlen))
    monkeypatch.setattr(flash, "flash_unavailable", lambda q, lo=None, hi=None: None)
    monkeypatch.setitem(dispatch._BACKENDS, "flash", dispatch.Backend(flash.flash_span_attention,
                                                                      lambda q, lo=None, hi=None: None, ("cuda",)))


@pytest.mark.parametrize("name", ["flash", "flex", "sdpa", "triton"])
def test_named_backends_survive_shape_changes(name, monkeypatch):
    """Each backend named on its own, fed three (batch, length) shapes in a row, matches the
    reference every time (gradients too where the backend has a backward here). flex runs eager
    here: its compiled path is test_kernels_flex::test_compiled_forward_survives_shape_changes;
    flash runs its gather/scatter around a CPU stand-in of flash-attn (document-causal rows only)."""
    assert sorted(dispatch._BACKENDS) == ["flash", "flex", "sdpa", "triton"], "a new backend needs a case here"
    if name == "flash":
        _stand_in_flash_attn(monkeypatch)
    monkeypatch.setattr(flex, "COMPILE", False)
    grad = name in ("sdpa", "triton")
    device = TEST_DEVICE if name == "triton" else "cpu"  # the others' cases are CPU by design
    for B, S in [(2, 48), (3, 40), (1, 57)]:
        rows = []
        for r in range(B):
            third = S // 3
            if name == "flash":  # text documents only
                rows.append([(third, []), (S - third - r, [])])
            else:
                rows.append([(third, [(1, third // 2)]), (S - third - r, [(0, 5 + r)])])
        lo, hi = (x.to(device) for x in spans(rows, S))
        gen = torch.Generator().manual_seed(S)
        q, k, v = (torch.randn(B, S, h, 16, generator=gen).to(device).requires_grad_(grad) for h in (4, 2, 2))
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = kernels.span_attention(q, k, v, lo, hi, backend=name)
            ref = kernels.sdpa_span_attention(q, k, v, lo, hi)  # for sdpa: only that it runs
        assert out.shape == (B, S, 4, 16)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        if grad:
            g = torch.randn_like(out)
            for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
