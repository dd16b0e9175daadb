"""Training through our Triton flash-attention kernel (in Triton's interpreter on CPU) gives the same
losses as training through PyTorch's SDPA: the kernel is wired into every attention variant."""

import pytest

import train
from conftest import compose_config, tiny_overrides
from scripts.gpu_check import losses


@pytest.mark.parametrize("attention", ["mha", "gqa", "mqa", "mla"])
def test_triton_backend_matches_sdpa(attention, corpus, data_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import kernels

    calls = []
    real = kernels.flash_attention
    monkeypatch.setattr(kernels, "flash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    common = tiny_overrides(corpus, data_cache, tmp_path) + [
        f"attention={attention}", "train.max_steps=3", "train.eval_every=3", "train.save_every=3",
        "train.batch_size=4", "train.sample_tokens=0"]
    results = {}
    for backend in ("sdpa", "triton"):
        out = tmp_path / backend
        train.run(compose_config(common + [f"attention.backend={backend}", f"out_dir={out}"]))
        results[backend] = losses(out)
    (train_sdpa, val_sdpa), (train_triton, val_triton) = results["sdpa"], results["triton"]
    assert len(train_sdpa) == 3 and len(val_sdpa) == 1
    assert len(calls) >= 3 * 2, "the triton backend did not run our kernel"  # at least steps x layers
    assert train_triton == pytest.approx(train_sdpa, abs=1e-4)
    assert val_triton == pytest.approx(val_sdpa, abs=1e-4)
