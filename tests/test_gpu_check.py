"""scripts/gpu_check.py: the report a GPU owner pastes into the README. Without a GPU: its refusal,
its report writing (parts faked, one failing), and the whole script in its --smoke form."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def run_script(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_without_cuda_one_error_line(tmp_path):
    result = run_script("--out", str(tmp_path / "r.md"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: no CUDA device") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and not (tmp_path / "r.md").exists()


def test_missing_report_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "kernel_tests", lambda *a: pytest.fail("worked before checking --out"))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path / "no" / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the report") and err.count("\n") == 1


def test_report_lists_every_part_and_flags_a_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # main sets it for --smoke
    for name, result in (("kernel_tests", (True, "KT-TEXT")), ("self_check", (True, "SC-TEXT")),
                         ("training", (False, "TR-TEXT")), ("benchmark", (True, "BM-TEXT"))):
        monkeypatch.setattr(gpu_check, name, lambda device, workdir, result=result: result)
    out = tmp_path / "report.md"
    assert gpu_check.main(["--smoke", "--out", str(out)]) == 1
    report = out.read_text()
    assert "- Training: attention.backend=sdpa vs triton: **FAILED**" in report
    assert "- Kernel tests on the GPU: passed" in report and "- Kernel benchmark (TFLOP/s): passed" in report
    for text in ("KT-TEXT", "SC-TEXT", "TR-TEXT", "BM-TEXT"):
        assert text in report
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow  # ~100 s on 2 busy cores: real pytest, self-check, two trainings, benchmark
def test_smoke_run_writes_a_passing_report(tmp_path):
    result = run_script("--smoke", "--out", "report.md", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert report.count(": passed") == 4 and "FAILED" not in report
    assert "| flash attention, forward + backward | SDPA | ok |" in report
    assert "| gqa | 2 |" in report and "ok (tolerance" in report
    assert "passed" in report.split("## Kernel tests on the GPU")[1].split("##")[0]
    assert "ours fwd" in report  # the benchmark's table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # nothing else left behind
