"""benchmarks/bench_vllm_serving.py: without a GPU or vllm it says why and records "not run"; its
`vllm serve` command names every adapter of the bundles with a rank limit that fits them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from persona_tune.runfolder import RunFolder
from tests.fixtures_runs import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_vllm_serving", REPO / "benchmarks" / "bench_vllm_serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_skips_cleanly_and_records_not_run(tmp_path):
    bench = _bench()
    reason = bench.why_not()
    if reason is None:  # a GPU machine with vllm: the benchmark would run for real
        return
    out = tmp_path / "vllm.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_vllm_serving.py"), str(tmp_path),
                           "--variants", "persona", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not run" in proc.stdout
    assert json.loads(out.read_text()) | {"command": None} == {"status": "not run", "reason": reason, "command": None}


def test_the_vllm_command_serves_every_adapter_with_a_rank_that_fits(tmp_path):
    run = RunFolder(tmp_path)
    specs = []
    for variant, names, rank in (("persona", ["persona_0", "persona_1"], 16), ("trunk-x", ["trunk-x"], 21)):
        adapters = []
        for name in names:
            folder = tmp_path / "serving" / variant / name
            folder.mkdir(parents=True)
            (folder / "adapter_config.json").write_text(json.dumps({"r": rank}))
            adapters.append({"model": name, "peft": f"serving/{variant}/{name}"})
        specs.append({"base": {"hf_model_dir": "/models/smollm2"}, "adapters": adapters})
    cmd = _bench().vllm_command(run, specs, 8000, 0.8)
    assert cmd[:3] == ["vllm", "serve", "/models/smollm2"] and "--enable-lora" in cmd
    assert cmd[cmd.index("--max-loras") + 1] == "3" and cmd[cmd.index("--max-lora-rank") + 1] == "32"
    modules = cmd[cmd.index("--lora-modules") + 1:]
    assert modules == [f"persona_0={tmp_path}/serving/persona/persona_0", f"persona_1={tmp_path}/serving/persona/persona_1",
                       f"trunk-x={tmp_path}/serving/trunk-x/trunk-x"]
