"""The kernels' first-use self-check (kernels/self_check.py) and the training side's fallback.

No GPU here: the check runs our Triton kernels in Triton's CPU interpreter, and "broken" kernels
are simulated by patching the launchers to return wrong values or to raise like a failed compile.
The references are PyTorch's SDPA and gather path, never the kernels under test.
"""

import sys

import pytest
import torch

import model.attention as attention
from builders import tiny_model
from kernels import paged_attention_decode, self_check

flash_module = sys.modules["kernels.flash_attention"]  # `kernels.flash_attention` is the function


@pytest.fixture(autouse=True)
def interpreter_and_fresh_cache(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(self_check, "_results", {})  # every test checks afresh
    monkeypatch.setattr(attention, "_chosen", {})  # and chooses the training attention afresh


def wrong_forward(real):
    """The launcher with a subtly wrong output (as a miscompiled kernel would give)."""
    def forward(*args):
        o, lse = real(*args)
        return o * 1.05, lse
    return forward


def compile_error(*args, **kwargs):
    raise RuntimeError("PTX assembly failed: ptxas fatal: unsupported gpu architecture")


def test_real_kernels_pass():
    cpu = torch.device("cpu")
    assert self_check.check_flash_attention(cpu) is None
    assert self_check.check_paged_decode(cpu) is None


def test_wrong_forward_fails(monkeypatch):
    monkeypatch.setattr(flash_module, "_forward", wrong_forward(flash_module._forward))
    assert "output differs" in self_check.check_flash_attention(torch.device("cpu"))


def test_wrong_backward_fails(monkeypatch):
    """A kernel whose forward is right but whose dK is off: the check runs the backward too."""
    real = flash_module._backward

    def backward(*args):
        dq, dk, dv = real(*args)
        return dq, dk * 0.9, dv
    monkeypatch.setattr(flash_module, "_backward", backward)
    assert "dk differs" in self_check.check_flash_attention(torch.device("cpu"))


def test_wrong_split_k_fails():
    """A paged kernel right with one split but wrong with several: both paths are checked."""
    def kernel(*args, num_splits, **kwargs):
        out = paged_attention_decode(*args, num_splits=num_splits, **kwargs)
        return out if num_splits == 1 else out.flip(0)  # split-K hands sequences each other's output
    problem = self_check.check_paged_decode(torch.device("cpu"), kernel=kernel)
    assert "3 splits" in problem


@pytest.mark.parametrize("which", ["flash", "paged"])
def test_failure_warns_one_line_once_and_is_cached(which, monkeypatch):
    calls = []
    name = "check_flash_attention" if which == "flash" else "check_paged_decode"
    monkeypatch.setattr(self_check, name, lambda device: calls.append(device) or compile_error())
    is_ok = self_check.flash_attention_ok if which == "flash" else self_check.paged_decode_ok
    with pytest.warns(UserWarning) as caught:
        assert is_ok("cpu") is False
    assert is_ok(torch.device("cpu")) is False  # cached: no second run, no second warning
    assert len(calls) == 1 and len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "failed its self-check on cpu" in message
    assert "RuntimeError: PTX assembly failed" in message
    assert ("SDPA" if which == "flash" else "gather path") in message


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_callers_context_does_not_change_the_check(context):
    """The first use may come while evaluating (no_grad), generating (inference_mode) or training
    under autocast; the check still runs its backward and its fp32 reference, so it passes."""
    mode = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
            "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[context]()
    with mode:
        assert self_check.flash_attention_ok("cpu")


def test_passing_check_is_cached(monkeypatch):
    calls = []
    monkeypatch.setattr(self_check, "check_paged_decode", lambda device: calls.append(device))
    assert self_check.paged_decode_ok("cpu") and self_check.paged_decode_ok("cpu")
    assert len(calls) == 1


@pytest.mark.filterwarnings("ignore:User provided device_type of 'cuda'")  # autocast off, no GPU here
def test_cuda_and_its_index_are_one_device(monkeypatch):
    """"cuda" is the current GPU: checking it and "cuda:0" must not run (and warn) twice."""
    calls = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(self_check, "check_paged_decode", lambda device: calls.append(str(device)))
    assert self_check.paged_decode_ok("cuda") and self_check.paged_decode_ok("cuda:0")
    assert calls == ["cuda:0"]


# ------------------------------------------------------------------------------------------
# The training side: model/attention.py's backend choice
# ------------------------------------------------------------------------------------------
def logits(backend, x):
    model = tiny_model("gqa")
    for layer in model.layers:
        layer.attn.backend = backend
    return model(x)[0]


@pytest.mark.parametrize("break_with", ["wrong-values", "compile-error"])
def test_auto_falls_back_to_sdpa_when_the_check_fails(break_with, monkeypatch):
    """`auto` on a device where our kernel is tried (CUDA; here the CPU interpreter stands in):
    a kernel failing the check is never used, training gets SDPA's results and one warning."""
    monkeypatch.setattr(attention, "AUTO_TRITON_DEVICES", ("cpu",))
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = logits("sdpa", x)
    assert attention.choose_backend("auto", "cpu", torch.float32) == "triton"
    torch.testing.assert_close(logits("auto", x), expected, atol=1e-4, rtol=1e-4)  # the real kernel
    assert self_check._results == {("flash_attention", "cpu"): True}

    monkeypatch.setattr(self_check, "_results", {})
    monkeypatch.setattr(attention, "_chosen", {})
    broken = wrong_forward(flash_module._forward) if break_with == "wrong-values" else compile_error
    monkeypatch.setattr(flash_module, "_forward", broken)
    with pytest.warns(UserWarning, match="failed its self-check on cpu"):
        assert attention.choose_backend("auto", "cpu", torch.float32) == "sdpa"
    torch.testing.assert_close(logits("auto", x), expected, atol=1e-5, rtol=1e-5)


def test_explicit_triton_refuses_a_failed_kernel(monkeypatch):
    monkeypatch.setattr(flash_module, "_forward", compile_error)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="failed its self-check") as err:
        attention.choose_backend("triton", "cpu", torch.float32)
    assert "\n" not in str(err.value) and "attention.backend=sdpa" in str(err.value)


def test_training_on_a_failed_kernel_stops_before_it_starts(corpus, data_cache, tmp_path, monkeypatch):
    """train.py chooses the backend while it builds the Trainer: attention.backend=triton on a kernel that
    fails its check stops there, in one line (train.py prints it as `error: ...`), with nothing written."""
    import train
    from conftest import compose_config, tiny_overrides
    from training.errors import TrainConfigError

    monkeypatch.setattr(flash_module, "_forward", compile_error)
    cfg = compose_config(tiny_overrides(corpus, data_cache, tmp_path / "run") + ["attention.backend=triton"])
    with pytest.warns(UserWarning), pytest.raises(TrainConfigError, match="^attention.backend=triton: our Triton "
                                                                          "kernel failed its self-check") as err:
        train.run(cfg)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("backend,interpret,message", [
    ("foo", "1", "unknown attention backend 'foo': choose one of auto, triton, cpu, sdpa, math"),
    ("triton", "0", "attention.backend=triton: it needs a CUDA GPU, got device cpu"),
])
def test_backend_errors_are_one_line(backend, interpret, message, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with pytest.raises(ValueError) as err:
        attention.choose_backend(backend, "cpu", torch.float32)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_auto_on_cpu_is_the_cpu_kernel_without_a_triton_check(monkeypatch):
    monkeypatch.setattr(self_check, "check_flash_attention", compile_error)
    assert attention.choose_backend("auto", "cpu", torch.float32) == "cpu"
    assert self_check._results == {}



def test_the_forward_only_reads_the_choice(monkeypatch):
    """The backend is chosen once, where the model is built (the self-check runs there). The forward,
    here compiled with fullgraph (no graph break), only reads that choice: no check runs in it, and it
    runs our kernel."""
    monkeypatch.setattr(attention, "AUTO_TRITON_DEVICES", ("cpu",))
    assert attention.choose_backend("auto", "cpu", torch.float32) == "triton"
    monkeypatch.setattr(self_check, "_results", {})  # a check from here on would run again...
    monkeypatch.setattr(self_check, "check_flash_attention", compile_error)  # ...and fail
    calls, real = [], flash_module._forward
    monkeypatch.setattr(flash_module, "_forward", lambda *a: calls.append(1) or real(*a))
    model = tiny_model("gqa")
    x = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)[0]
    assert self_check._results == {} and len(calls) == model.cfg.n_layers
    torch.testing.assert_close(compiled, logits("sdpa", x), atol=1e-4, rtol=1e-4)


def test_failure_names_the_cause_behind_a_wrapper_and_shows_the_traceback_when_asked(monkeypatch, capsys):
    """A compiler's error often wraps the cause (Triton's CompilationError starts with the source position):
    the warning names the wrapped cause too, and SMALL_LLM_DEBUG=1 prints the traceback."""
    def wrapped(device):
        try:
            raise ValueError("out of resource: shared memory, required 98304, limit 65536")
        except ValueError as e:
            raise RuntimeError("at 12:4:\n    acc += tl.dot(p, v)") from e

    monkeypatch.setattr(self_check, "check_flash_attention", wrapped)
    monkeypatch.setenv("SMALL_LLM_DEBUG", "1")
    with pytest.warns(UserWarning) as caught:
        assert self_check.flash_attention_ok("cpu") is False
    message = str(caught[0].message)
    assert "\n" not in message
    assert "(RuntimeError: at 12:4:, caused by ValueError: out of resource: shared memory, required 98304" in message
    err = capsys.readouterr().err
    assert "Traceback" in err and "tl.dot(p, v)" in err
