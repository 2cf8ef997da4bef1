"""benchmarks/gpu_run.sh's CPU part: `prepare` packs the wheels, the split SmolLM2 file and a run's
inputs into the two carries, and `check` reassembles the model and lists them (no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from persona_tune.cli import main as cli_main
from persona_tune.runfolder import PORTABLE_INPUTS
from tests.fixtures_runs import make_persona_run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"
WHEELS = ("torchtune-0.6.1", "torchao-0.15.0", "omegaconf-2.3.0", "antlr4_python3_runtime-4.9.3")
CARRY_LIMIT = 64 * 2**20


def test_prepare_packs_two_carries_under_the_limit_and_check_reassembles_them(tmp_path):
    run = make_persona_run(tmp_path / "runs", n_users=4, k=2)
    assert cli_main(["baselines", "--run", str(run)]) == 0
    carries = tmp_path / "gpu"
    env = {**os.environ, "GPU_RUN_DIR": str(carries),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)

    prepared = script("prepare", str(run))
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    for part in ("a", "b"):
        size = sum(f.stat().st_size for f in (carries / part).rglob("*") if f.is_file())
        assert 0 < size < CARRY_LIMIT, (part, size)
    wheels = sorted(p.name for p in (carries / "a" / "wheels").glob("*.whl"))
    for name in WHEELS:
        assert any(w.startswith(name) for w in wheels), (name, wheels)
    packed = carries / "b" / "run"
    for rel in PORTABLE_INPUTS:
        assert (packed / rel).exists(), rel
    assert sorted(p.name for p in packed.glob("*.parquet")) == sorted(p.name for p in run.glob("*.parquet"))

    checked = script("check")
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "model parts reassemble: ok" in checked.stdout
    assert f"run inputs: {sum(1 for f in packed.rglob('*') if f.is_file())} files" in checked.stdout
    (carries / "b" / "model.sha256").write_text("0" * 64 + "\n")  # a corrupted part is refused
    broken = script("check")
    assert broken.returncode == 2 and "do not reassemble" in broken.stderr
