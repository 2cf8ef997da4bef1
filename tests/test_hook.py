"""The start-up hook: registers our configs with torchtune's CLI, CPU patches only in recipe processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from persona_tune import cpu_distributed
from persona_tune._hook import LORA_RECIPES, persona_configs
from persona_tune.resources import resource_dirs

REPO = Path(__file__).resolve().parent.parent
TUNE = str(Path(sys.executable).with_name("tune"))


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_TUNE_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


REGISTRY_PROBE = """
    import json, sys
    from torchtune._recipe_registry import get_all_recipes
    finders = [type(f).__name__ for f in sys.meta_path]
    print(json.dumps({"finders": finders,
                      "recipes": {r.name: {c.name: c.file_path for c in r.configs} for r in get_all_recipes()}}))
"""

# One process for two checks (each torchtune import costs seconds): registry entries, and the
# CPU patches in a process that counts as a recipe process.
RECIPE_PROCESS_PROBE = """
    import json, sys, torch
    import torch.distributed as dist
    from torchtune._recipe_registry import get_all_recipes
    result = {"finders": [type(f).__name__ for f in sys.meta_path],
              "recipes": {r.name: {c.name: c.file_path for c in r.configs} for r in get_all_recipes()},
              "patched": hasattr(dist.init_process_group, "_persona_tune_cpu_patch"),
              "destroy_patched": hasattr(dist.destroy_process_group, "_persona_tune_cpu_patch"),
              "nccl": dist.is_nccl_available()}
    if result["patched"]:
        from torchtune import training
        dist.init_process_group("cuda:nccl,cpu:gloo", init_method="file://%s/pg", rank=0, world_size=1)
        result["backend"] = dist.get_backend()
        result["stats"] = training.get_memory_stats(device=torch.device("cpu"))
        training.cleanup_before_training()
        dist.destroy_process_group()
    print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def recipe_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recipe_process")
    return last_json(run_python(RECIPE_PROCESS_PROBE % tmp, cwd=tmp, PERSONA_TUNE_CPU_DISTRIBUTED="1"))


def test_installed_pth_is_the_source_pth():
    """The .pth that site-packages runs is this checkout's (re-install after editing it)."""
    installed = Path(sysconfig.get_paths()["purelib"]) / "persona_tune_tune_hook.pth"
    source = REPO / "persona_tune" / "_hook" / "persona_tune_tune_hook.pth"
    assert installed.read_text() == source.read_text()


def test_registry_has_every_config_from_any_cwd(recipe_process):
    out = recipe_process
    assert out["finders"][0] == "PostImportFinder"
    expected = persona_configs(resource_dirs()[0])
    files = sorted((REPO / "configs").glob("*_persona/*.yaml"))
    assert len(files) >= 18
    for recipe in LORA_RECIPES:
        configs = out["recipes"][recipe]
        for path in files:
            if path.stem.startswith("eval"):
                continue
            name = f"{path.parent.name}/{path.stem}"
            assert configs[name] == str(path.resolve())
            assert Path(configs[name]).is_absolute()
        assert [n for n, _ in expected[recipe]] == [n for n in configs if "_persona/" in n]
    # our own recipes, with the eval configs
    eval_recipe = out["recipes"]["persona_eval"]
    assert eval_recipe["tiny_persona/eval"] == str((REPO / "configs/tiny_persona/eval.yaml").resolve())
    assert not [n for n in out["recipes"]["lora_finetune_single_device"] if n.endswith("/eval")]
    # torchtune's own entries are still there
    assert "llama3_2/1B_lora_single_device" in out["recipes"]["lora_finetune_single_device"]


def test_hook_switched_off_by_env(tmp_path):
    out = last_json(run_python(REGISTRY_PROBE, cwd=tmp_path, PERSONA_TUNE_NO_TUNE_HOOK="1"))
    assert "PostImportFinder" not in out["finders"]
    assert not [n for r in out["recipes"].values() for n in r if "_persona/" in n]


def test_unrelated_process_is_untouched(tmp_path):
    """A plain `import torch.distributed` keeps torch's own init_process_group, imports nothing of ours."""
    out = last_json(run_python(
        """
        import json, sys
        import torch.distributed as dist
        print(json.dumps({
            "finder": type(sys.meta_path[0]).__name__,
            "init_module": dist.init_process_group.__module__,
            "patched": hasattr(dist.init_process_group, "_persona_tune_cpu_patch"),
            "loaded": sorted(m for m in sys.modules if m.startswith(("persona_tune.", "torchtune"))),
        }))
        """,
        cwd=tmp_path,
    ))
    assert out["finder"] == "PostImportFinder"  # the hook is active, and still did nothing here
    assert out["init_module"] == "torch.distributed.distributed_c10d"
    assert out["patched"] is False
    assert not [m for m in out["loaded"] if m.startswith("torchtune")]
    assert set(out["loaded"]) <= {"persona_tune._hook", "persona_tune.cpu_distributed", "persona_tune.resources"}  # stdlib-only


def test_recipe_process_gets_gloo_and_cpu_memory_stats(recipe_process):
    """In a recipe process without NCCL, torchtune's backend string and memory helpers work on CPU."""
    out = recipe_process
    if out["nccl"]:
        assert out["patched"] is False  # inert where NCCL exists
        return
    assert out["patched"] is True
    assert out["destroy_patched"] is True
    assert out["backend"] == "gloo"
    assert set(out["stats"]) == {"peak_memory_active", "peak_memory_alloc", "peak_memory_reserved"}
    assert 0.05 < out["stats"]["peak_memory_alloc"] < 64  # GiB: the process's peak RSS


class FakeDist:
    """The four torch.distributed calls the barrier wrapper makes, recording their order."""

    def __init__(self, backend="gloo", world_size=2, barrier_error=None):
        self.calls, self.backend, self.world_size, self.barrier_error = [], backend, world_size, barrier_error

    def is_initialized(self):
        return True

    def get_backend(self):
        return self.backend

    def get_world_size(self):
        return self.world_size

    def barrier(self):
        self.calls.append("barrier")
        if self.barrier_error:
            raise RuntimeError(self.barrier_error)


@pytest.mark.parametrize("backend, world_size, group, expected", [
    ("gloo", 2, None, ["barrier", "destroy"]),   # every rank waits, then all tear down together
    ("gloo", 1, None, ["destroy"]),              # nobody to wait for
    ("nccl", 2, None, ["destroy"]),              # untouched where NCCL runs
    ("gloo", 2, "subgroup", ["destroy"]),        # only the default group
])
def test_destroy_waits_for_every_rank_on_gloo(backend, world_size, group, expected):
    fake = FakeDist(backend, world_size)
    destroy = cpu_distributed.barrier_before_destroy(fake, lambda group=None: fake.calls.append("destroy"))
    destroy(group)
    assert fake.calls == expected


def test_destroy_still_tears_down_when_a_peer_is_gone(caplog):
    fake = FakeDist(barrier_error="Connection closed by peer")
    destroy = cpu_distributed.barrier_before_destroy(fake, lambda group=None: fake.calls.append("destroy"))
    destroy()
    assert fake.calls == ["barrier", "destroy"]
    assert "Connection closed by peer" in caplog.text


def test_cpu_backend_mapping():
    assert cpu_distributed.cpu_backend("cuda:nccl,cpu:gloo") == "gloo"
    assert cpu_distributed.cpu_backend("nccl") == "gloo"
    assert cpu_distributed.cpu_backend("gloo") == "gloo"
    assert cpu_distributed.cpu_backend(None) is None


def test_is_recipe_process(monkeypatch):
    monkeypatch.delenv(cpu_distributed.FORCE_ENV, raising=False)
    torchtune_recipes = cpu_distributed.recipe_dirs()[0]
    assert cpu_distributed.is_recipe_process(str(torchtune_recipes / "lora_finetune_distributed.py"))
    assert cpu_distributed.is_recipe_process("/some/venv/bin/tune")
    assert not cpu_distributed.is_recipe_process("-c")
    assert not cpu_distributed.is_recipe_process("/home/me/train.py")
    assert not cpu_distributed.is_recipe_process("")
    monkeypatch.setenv(cpu_distributed.FORCE_ENV, "1")
    assert cpu_distributed.is_recipe_process("-c")


def test_tune_ls_and_cp_from_another_directory(tmp_path):
    ls = subprocess.run([TUNE, "ls"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ls.returncode == 0, ls.stderr
    for name in ("phi3_persona/persona_0", "smollm2_persona/single_max", "tiny_persona/single_min"):
        assert name in ls.stdout
    cp = subprocess.run([TUNE, "cp", "phi3_persona/persona_0", "./mine.yaml"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "mine.yaml").read_text() == (REPO / "configs/phi3_persona/persona_0.yaml").read_text()


def test_wheel_ships_configs_and_pth(tmp_path):
    """A built wheel carries the .pth at top level and the configs inside the package, where the hook looks."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("persona_tune-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "persona_tune_tune_hook.pth" in names
    assert "persona_tune/_configs/tiny_persona/persona_0.yaml" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # -S: no site-packages, so the editable checkout is not importable; addsitedir runs the wheel's .pth
    probe = subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(f"""
            import site, sys
            site.addsitedir({str(target)!r})
            from persona_tune._hook import PostImportFinder; from persona_tune.resources import resource_dirs
            print(resource_dirs()[0], isinstance(sys.meta_path[0], PostImportFinder))
        """)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(target / "persona_tune" / "_configs"), "True"]
