"""Issue 14: bad input and faults give one clear line (exit 2) or a correct result, never a silent
wrong one; finished stages are skipped untouched; stale downstream work is refused or redone."""

from __future__ import annotations

import errno
import importlib.util
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from persona_tune import cli, configgen, train
from persona_tune.configgen import ConfigsConfig
from persona_tune.overrides import apply_overrides
from persona_tune.data.loaders import read_text
from persona_tune.distill.run import DistillConfig, distill
from persona_tune.errors import ConfigError, DataError, LLMError, StageMissingError
from persona_tune.evaluation.run import check_adapters, results_key
from persona_tune.runfolder import RunFolder, atomic_write_json, atomic_write_parquet, file_lock
from tests.fixtures_runs import make_distilled_run, make_prepared_run, with_personas

REPO = Path(__file__).resolve().parent.parent


def error_line(capsys) -> str:
    """The one line a command printed to stderr (asserting it is one line, without a traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------- silent wrong results and escapes


def test_eval_refuses_a_variant_name_outside_the_run(tmp_path, capsys):
    run = make_prepared_run(tmp_path / "a" / "b" / "run")
    assert cli.main(["eval", "--run", str(run), "--variants", "../../pwn", "--family", "tiny"]) == 2
    assert "invalid variant name '../../pwn'" in error_line(capsys)
    assert not (tmp_path / "a" / "pwn").exists() and not (run / "eval").exists()


def fake_tune(tmp_path: Path, body: str) -> str:
    script = tmp_path / "tune"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_reclustering_makes_adapters_stale_and_configs_follow(tmp_path, monkeypatch, caplog):
    run_dir = with_personas(tmp_path, n_personas=3)
    run = RunFolder(run_dir)
    model = ["model_dir=" + str(tmp_path)]  # any existing folder: `tune` is faked
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=model))
    for variant in ("persona_0", "persona_1", "persona_2"):  # as if trained on these assignments
        (run.adapters_dir / variant / "epoch_0").mkdir(parents=True)
        (run.adapters_dir / variant / "epoch_0" / "adapter_model.pt").write_bytes(b"x")
        atomic_write_json(run.adapters_dir / variant / train.SUMMARY, {"inputs": train.variant_inputs(run, variant)})
    assert check_adapters(run, ["persona"])  # current

    # Re-cluster with K = 2: every adapter's users changed.
    users = pd.read_parquet(run.users)["user_id"].sort_values().to_numpy()
    atomic_write_parquet(pd.DataFrame({"user_id": users, "persona": [i % 2 for i in range(len(users))]}),
                         run.path("personas/assignments.parquet"))
    assert "personas/assignments.parquet" in train.stale_inputs(run, "persona_0")
    with pytest.raises(StageMissingError, match=r"persona_0 \(.*personas/assignments.parquet"):
        check_adapters(run, ["persona"])
    with pytest.raises(ConfigError, match="assignments.parquet changed.*--force"):
        configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=model))
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=model, force=True))
    assert not (run.configs_dir / "persona_2.yaml").exists()  # the old K's config is gone
    assert train.select_variants(run, "all") == ["persona_0", "persona_1", "single_max", "single_min"]

    # train redoes the stale ones (here a fake `tune` that fails, so they end "failed", not "skipped").
    monkeypatch.setattr(train, "tune_executable", lambda: fake_tune(tmp_path, "exit 3\n"))
    with caplog.at_level(logging.WARNING):
        results = train.run(RunFolder(run_dir), train.TrainConfig(personas="0,1"))
    assert [r.status for r in results] == ["failed", "failed"]
    assert "persona_0 was trained on other inputs (configs/persona_0.yaml, personas/assignments.parquet changed)" in caplog.text


def test_configs_rerun_is_skipped_untouched(tmp_path):
    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny"))
    manifest = (run_dir / "manifest.json").read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "configs").iterdir()}
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny"))  # no --force needed
    assert (run_dir / "manifest.json").read_bytes() == manifest
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "configs").iterdir()} == mtimes


def test_mixed_encodings_are_decoded_per_line(tmp_path, caplog):
    path = tmp_path / "movies.dat"
    path.write_bytes("1::Amélie (2001)::Comedy\n".encode() + "2::Café (1999)::Drama\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        text = read_text(path)
    assert text == "1::Amélie (2001)::Comedy\n2::Café (1999)::Drama\n"
    assert "1 line(s) read as latin-1 (first: line 2)" in caplog.text
    all_latin1 = tmp_path / "old.dat"
    all_latin1.write_bytes("1::Café::Drama\n".encode("latin-1"))
    assert read_text(all_latin1) == "1::Café::Drama\n"


def test_misspelt_and_fixed_config_keys(tmp_path, capsys):
    run_dir = with_personas(tmp_path)
    assert cli.main(["configs", "--run", str(run_dir), "--family", "tiny", "--", "optimzer.lr=5"]) == 2
    assert "unknown config key 'optimzer.lr'" in (line := error_line(capsys)) and "did you mean optimizer.lr?" in line
    assert cli.main(["configs", "--run", str(run_dir), "--family", "tiny", "--", "output_dir=/tmp/x"]) == 2
    assert "output_dir is fixed by the run folder" in error_line(capsys)
    assert not (run_dir / "configs").exists()
    cfg = OmegaConf.create({"epochs": 1, "batch_size": 4, "optimizer": {"lr": 0.001}, "profiler": {"enabled": False}})
    for bad, message in (("batch_size=abc", "batch_size must be a whole number >= 1"),
                         ("epochs=-1", "epochs must be a whole number >= 1"),
                         ("optimizer.lr=fast", "optimizer.lr must be float")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(cfg, [bad], "x.yaml")
    good = apply_overrides(cfg, ["optimizer.lr=1e-4", "epochs=2", "~profiler"], "x.yaml")
    assert good.optimizer.lr == 1e-4 and good.epochs == 2 and "profiler" not in good


@pytest.mark.parametrize("argv, message", [
    (["personas", "--run", "R", "--top-words", "-1"], "--top-words must be >= 1, got -1"),
    (["personas", "--run", "R", "--k", "0"], "--k must be >= 1, got 0"),
    (["distill", "--run", "R", "--timeout", "0"], "--timeout must be > 0, got 0.0"),
    (["distill", "--run", "R", "--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["prepare", "--dataset", "synthetic", "--out", "R", "--seed", "-3"], "--seed must be >= 0, got -3"),
    (["simulate", "--run", "R", "--n-boot", "0"], "--n-boot must be >= 1, got 0"),
])
def test_numeric_options_are_range_checked(argv, message, capsys, tmp_path, monkeypatch):
    """The CLI checks through the Config's validate: exit 2 and one line naming the option, nothing read."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"persona-tune {argv[0]}: error: {message}\n"
    assert not (tmp_path / "R").exists()


# ---------------------------------------------------------------- tracebacks and misleading messages


def test_id_too_large_for_int64(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("user,item,rating,timestamp\n1,1,4,10\n99999999999999999999,2,3,11\n")
    args = ["prepare", "--dataset", "generic", "--ratings-file", str(tmp_path / "r.csv"), "--out", str(tmp_path / "run"),
            "--columns", "user=user,item=item,rating=rating,timestamp=timestamp"]
    assert cli.main(args) == 2
    line = error_line(capsys)
    assert "r.csv:3:" in line and "too large" in line and "negative" not in line


def test_wrong_run_paths(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["prepare", "--dataset", "synthetic", "--data-dir", str(tmp_path), "--out", str(a_file)]) == 2
    assert "is a file" in error_line(capsys)
    assert cli.main(["distill", "--run", str(a_file)]) == 2
    assert f"{a_file} is a file, not a run folder" in error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert cli.main(["embed", "--run", str(tmp_path / "empty"), "--backend", "hash"]) == 2
    assert f"persona-tune prepare --out {tmp_path / 'empty'}" in error_line(capsys)


def test_eval_before_training_says_train_first(tmp_path, capsys):
    run_dir = with_personas(tmp_path)
    assert cli.main(["eval", "--run", str(run_dir), "--variants", "persona"]) == 2
    assert "persona-tune configs" in (line := error_line(capsys)) and "train" in line
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny"))
    assert cli.main(["eval", "--run", str(run_dir), "--variants", "persona,single_max"]) == 2
    assert "no trained adapter for persona_0, persona_1, single_max" in (line := error_line(capsys))
    assert "persona-tune train" in line


def test_train_checks_before_tune_run(tmp_path, monkeypatch, capsys):
    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path / "kit" / "model")]))
    started = tmp_path / "started"
    monkeypatch.setattr(train, "tune_executable", lambda: fake_tune(tmp_path, f"touch {started}\n"))
    assert cli.main(["train", "--run", str(run_dir), "--personas", "0", "--", "batch_size=abc"]) == 2
    assert "batch_size must be a whole number >= 1" in error_line(capsys)
    assert cli.main(["train", "--run", str(run_dir), "--personas", "0", "--", "epochs=-1"]) == 2
    assert "epochs must be a whole number >= 1" in error_line(capsys)
    assert cli.main(["train", "--run", str(run_dir), "--personas", "0"]) == 2
    assert f"`persona-tune tiny-model {tmp_path / 'kit'}`" in error_line(capsys)
    assert not started.exists() and not (run_dir / "adapters" / "persona_0").exists()


class _FixedBody(BaseHTTPRequestHandler):
    body = b""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("body, message", [
    (b'{"id": "x", "choices": [{"mess', "a body that is not JSON"),
    (b'{"hello": "world"}', "answered without `choices`: not an OpenAI chat-completions endpoint"),
])
def test_broken_server_answers_are_one_line(tmp_path, capsys, body, message):
    run = make_prepared_run(tmp_path, n_users=2)
    handler = type("H", (_FixedBody,), {"body": body})
    server = type("Quiet", (ThreadingHTTPServer,), {"handle_error": lambda *a: None})(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        code = cli.main(["distill", "--run", str(run), "--backend", "openai", "--model", "m", "--base-url", url,
                         "--max-retries", "1", "--backoff-base", "0", "--no-progress"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err and message in err


def test_openai_backend_needs_a_base_url(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    run = make_prepared_run(tmp_path, n_users=2)
    assert cli.main(["distill", "--run", str(run), "--backend", "openai", "--model", "m"]) == 2
    assert "--backend openai needs --base-url" in error_line(capsys)


def test_os_errors_are_one_line_and_tracebacks_stay_under_verbose(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.parquet"))

    monkeypatch.setattr("persona_tune.data.synthetic.main", disk_full)
    assert cli.main(["synth", "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run' / 'x.parquet'}: the disk is full" in error_line(capsys)

    monkeypatch.setattr("persona_tune.data.synthetic.main", lambda args: {}["bug"])
    assert cli.main(["synth", "--out", str(tmp_path / "run")]) == 1
    assert "unexpected KeyError" in error_line(capsys)
    with pytest.raises(KeyError):  # -v before or after the command: the traceback
        cli.main(["-v", "synth", "--out", str(tmp_path / "run")])
    with pytest.raises(KeyError):
        cli.main(["synth", "-v", "--out", str(tmp_path / "run")])
    parser, _ = cli.build_parser("train")
    assert parser.parse_args(["--run", "R", "--verbose", "--", "epochs=1"]).overrides == ["epochs=1"]


# ---------------------------------------------------------------- faults


def test_finished_distill_is_skipped_without_writing(tmp_path):
    run = RunFolder(make_prepared_run(tmp_path, n_users=3))
    distill(run, DistillConfig())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.root.rglob("*") if p.is_file()}
    assert distill(run, DistillConfig())["skipped"] is True
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.root.rglob("*") if p.is_file()} == before


def test_unrecorded_prepare_output_is_not_an_output(tmp_path):
    run = RunFolder(make_prepared_run(tmp_path, n_users=3))
    manifest = json.loads(run.manifest_path.read_text())
    run.manifest_path.unlink()  # killed after the Parquet files, before manifest.json
    leftover = run.root / ".ratings_train.abc123.parquet"
    leftover.write_bytes(b"partial")
    with pytest.raises(StageMissingError, match="not recorded in .*prepare` did not finish"):
        distill(run, DistillConfig())
    assert not (run.root / "distill").exists()
    proto = manifest["stages"]["prepare"]["params"]
    args = ["prepare", "--dataset", "synthetic", "--data-dir", str(tmp_path / "data"), "--out", str(run.root),
            *(f"--{key.replace('_', '-')}={proto[key]}" for key in ("n_users", "min_ratings", "max_ratings", "seed"))]
    assert cli.main(args) == 0  # re-running prepare is not refused, and cleans up
    assert not leftover.exists() and "prepare" in run.read_manifest()["stages"]


def test_partial_distill_is_a_warning_downstream(tmp_path, caplog):
    from persona_tune.memory.stage import EmbedConfig
    from persona_tune.memory.stage import run as embed

    run = RunFolder(make_prepared_run(tmp_path, n_users=6))
    distill(run, DistillConfig())
    profiles = pd.read_parquet(run.path("distill/profiles.parquet"))
    atomic_write_parquet(profiles.iloc[:4], run.path("distill/profiles.parquet"))  # two users failed
    memories = pd.read_parquet(run.path("distill/memories.parquet"))
    atomic_write_parquet(memories[memories["user_id"].isin(profiles["user_id"].iloc[:4])],
                         run.path("distill/memories.parquet"))
    with caplog.at_level(logging.WARNING):
        embed(run, EmbedConfig(backend="hash"))
    assert "covers 4 of the 6 users: 2 are missing" in caplog.text


def test_a_live_writer_is_detected(tmp_path, capsys):
    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path)]))
    with file_lock(RunFolder(run_dir).root / ".train.lock", "training"):
        assert cli.main(["train", "--run", str(run_dir), "--personas", "single_min"]) == 2
    assert f"another process (pid {os.getpid()}) is training adapters" in error_line(capsys)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("command", ["train", "eval"])
def test_tune_run_child_dies_with_its_parent(tmp_path, command):
    """kill -9 of `persona-tune train` or `eval` takes its `tune run` child along (no orphan keeps
    training or writing metrics.json). simulate scores in its own process: it starts no child."""
    from persona_tune.runfolder import TRAIN_SUMMARY, adapter_files

    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path)]))
    if command == "eval":
        folder = _partial_adapter(RunFolder(run_dir), "single_max")
        atomic_write_json(folder / TRAIN_SUMMARY, {"files": adapter_files(folder / "epoch_0" / "adapter_model.pt")})
    pid_file = tmp_path / "child.pid"
    tune = fake_tune(tmp_path, f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}\nexec sleep 600\n")
    module, argv = {"train": ("persona_tune.train", ["train", "--run", str(run_dir), "--personas", "0"]),
                    "eval": ("persona_tune.evaluation.run", ["eval", "--run", str(run_dir), "--variants", "single_max"])
                    }[command]
    code = (f"import sys, importlib; from persona_tune import cli; "
            f"importlib.import_module({module!r}).tune_executable = lambda: {tune!r}; sys.exit(cli.main({argv!r}))")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # wait for the child to start (no timing assertion: the loop only polls)
        if pid_file.exists() or parent.poll() is not None:
            break
        time.sleep(0.1)
    assert pid_file.exists(), "the fake `tune run` never started"
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(600):
        try:
            os.kill(child, 0)
            # a zombie of an exited child counts as dead
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the `tune run` child outlived `persona-tune {command}`")


# ---------------------------------------------------------------- what a new user meets


def test_runtime_keys_do_not_make_results_stale():
    cfg = OmegaConf.create({"num_threads": None, "batching": {"progress": True, "batch_size": 16}, "seed": 0})
    other = OmegaConf.merge(cfg, {"num_threads": 1, "batching": {"progress": False}})
    assert results_key(cfg) == results_key(other)
    assert results_key(cfg) != results_key(OmegaConf.merge(cfg, {"batching": {"batch_size": 8}}))


def test_killed_smollm2_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    from persona_tune.models import smollm2

    leftover = tmp_path / f".{smollm2.CACHE_NAME}.killed"
    (leftover / "model").mkdir(parents=True)
    monkeypatch.setattr(smollm2, "find_gguf", lambda: tmp_path / "x.gguf")

    def convert(gguf, root):
        root.mkdir()
        (root / "source.json").write_text("{}")
        return root

    monkeypatch.setattr(smollm2, "_convert", convert)
    assert smollm2.ensure_smollm2(tmp_path) == tmp_path / smollm2.CACHE_NAME
    assert not leftover.exists()


def test_help_texts(capsys):
    for command in cli.COMMANDS:
        parser, _ = cli.build_parser(command)
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text
        for action in parser._actions:
            assert (action.help or "").count("default") <= 1, (command, action.dest)
    help_ = {a.dest: a.help for a in cli.build_parser("distill")[0]._actions}
    assert all(help_[k] for k in ("backend", "temperature", "seed"))


def test_torchao_noise_is_silenced():
    from persona_tune.noise import silence_known_noise

    silence_known_noise()
    record = logging.LogRecord("torchao", logging.WARNING, __file__, 1,
                               "Skipping import of cpp extensions due to incompatible torch version", None, None)
    assert not logging.getLogger("torchao").filter(record)
    triton = logging.LogRecord("torchao.kernel.intmm", logging.WARNING, __file__, 1,
                               "Warning: Detected no triton, on systems without Triton certain kernels will not work",
                               None, None)
    assert not logging.getLogger("torchao.kernel.intmm").filter(triton)
    other = logging.LogRecord("torchao.kernel.intmm", logging.WARNING, __file__, 1, "another warning", None, None)
    assert logging.getLogger("torchao.kernel.intmm").filter(other)  # only the known message is dropped
    proc = subprocess.run([str(Path(sys.executable).with_name("tune")), "ls"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "Skipping import of cpp extensions" not in proc.stderr + proc.stdout
    # Importing torchtune's training utilities (as every recipe and the CLI's stages do) logs the Triton
    # warning on a machine without Triton, unless the filters are installed.
    def imported(silenced: bool) -> str:
        code = ("import logging; logging.basicConfig(); from persona_tune.noise import silence_known_noise; "
                f"{'silence_known_noise(); ' if silenced else ''}import torchtune.training")
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)}).stderr

    if importlib.util.find_spec("triton") is None:
        assert "Detected no triton" in imported(silenced=False)
    assert "Detected no triton" not in imported(silenced=True)


# ---------------------------------------------------------------- issue 26: total deadlines, no secrets


class _Trickle(BaseHTTPRequestHandler):
    """Answers 200 with a 400-byte body sent one byte every 0.5 s (200 s in all): every single read
    is quick, so only a deadline on the whole request ends it."""

    sent = None  # a list per server: bytes of body sent

    def _trickle(self):
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "400")
        self.end_headers()
        try:
            for _ in range(400):
                self.wfile.write(b" ")
                self.wfile.flush()
                self.sent.append(1)
                time.sleep(0.5)
        except OSError:  # the client gave up
            pass

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._trickle()

    def do_GET(self):  # noqa: N802
        self._trickle()

    def log_message(self, *args):
        pass


@pytest.fixture
def trickle_server():
    handler = type("H", (_Trickle,), {"sent": []})
    server = type("Quiet", (ThreadingHTTPServer,), {"handle_error": lambda *a: None,
                                                     "daemon_threads": True})(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", handler.sent
    server.shutdown()
    server.server_close()


def test_chat_request_has_a_total_deadline(trickle_server):
    import asyncio

    from persona_tune.distill.client import ChatClient, ClientSettings

    url, sent = trickle_server
    client = ChatClient(ClientSettings(base_url=f"http://user:pw@{url[7:]}/v1", model="m", api_key="k",
                                       timeout=1.0, max_retries=0))

    async def ask():
        try:
            return await client.chat([{"role": "user", "content": "hi"}], {})
        finally:
            await client.close()

    with pytest.raises(LLMError) as e:
        asyncio.run(ask())
    # Per-read timeouts would have waited for all 400 bytes (200 s); the deadline stops it after ~2.
    assert "no complete answer within 1 s" in str(e.value) and len(sent) < 40
    assert "pw" not in str(e.value) and "http://***@127.0.0.1" in str(e.value)


def test_embeddings_request_has_a_total_deadline(trickle_server):
    from persona_tune.memory.embeddings import OpenAIEmbedder

    url, sent = trickle_server
    embedder = OpenAIEmbedder("m", base_url=url + "/v1", api_key="k", timeout=1.0, max_retries=0)
    with pytest.raises(LLMError, match=r"no complete answer within 1 s \(--timeout sets the limit\)"):
        embedder.embed(["a"])
    assert len(sent) < 40


def test_embed_cli_has_a_timeout_option(tmp_path):
    from persona_tune.memory.stage import EmbedConfig

    parser, _ = cli.build_parser("embed")
    args = parser.parse_args(["--run", str(tmp_path), "--backend", "openai", "--timeout", "7"])
    assert EmbedConfig(backend="openai", timeout=args.timeout).embedder_kwargs()["timeout"] == 7.0


def test_download_has_a_total_deadline(trickle_server, tmp_path):
    from persona_tune.data.download import DownloadError, _fetch

    url, sent = trickle_server
    with pytest.raises(DownloadError, match="no complete answer within 1 s"):
        _fetch(url + "/ml-1m.zip", tmp_path / "x.zip", timeout=30, offline_hint="x", deadline=1.0)
    assert len(sent) < 40 and not list(tmp_path.iterdir())


def test_url_passwords_are_never_recorded_or_printed(tmp_path, capsys):
    from persona_tune.net import redact

    assert redact("http://user:pw@host:1/v1") == "http://***@host:1/v1"
    assert redact({"a": ["see https://tok@h/x and ftp://u:p@h"], "b": 3}) == {
        "a": ["see https://***@h/x and ftp://***@h"], "b": 3}
    assert redact("/runs/a@b/c http://host/v1") == "/runs/a@b/c http://host/v1"  # no URL credentials
    run = make_prepared_run(tmp_path, n_users=2)
    secret_url = "http://user:s3cret@127.0.0.1:9/v1"  # nothing listens on port 9
    code = cli.main(["distill", "--run", str(run), "--backend", "openai", "--model", "m", "--base-url", secret_url,
                     "--max-retries", "0", "--timeout", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code in (0, 1, 2) and "s3cret" not in err and "http://***@127.0.0.1:9/v1" in err
    assert "s3cret" not in (run / "manifest.json").read_text()
    rf = RunFolder(run)
    rf.record_stage("distill", DistillConfig(backend="openai", base_url=secret_url).params())
    assert rf.stage_record("distill")["params"]["base_url"] == "http://***@127.0.0.1:9/v1"


# ---------------------------------------------------------------- issue 26: complete-or-absent artifacts


def _partial_adapter(run: RunFolder, variant: str, epochs=(0,)) -> Path:
    for e in epochs:
        (run.adapter_dir(variant) / f"epoch_{e}").mkdir(parents=True, exist_ok=True)
        (run.adapter_dir(variant) / f"epoch_{e}" / "adapter_model.pt").write_bytes(b"weights %d" % e)
    return run.adapter_dir(variant)


def test_partial_adapter_is_refused_by_eval_and_the_agent(tmp_path, capsys):
    from persona_tune.evaluation.loading import adapter_path

    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path)]))
    run = RunFolder(run_dir)
    folder = _partial_adapter(run, "single_max")  # kill -9 during `train`: epoch_0 of 2, no marker
    assert cli.main(["eval", "--run", str(run_dir), "--variants", "single_max"]) == 2
    line = error_line(capsys)
    assert f"{folder}: its training did not finish (no train_summary.json; it holds only epoch_0)" in line
    assert "persona-tune train" in line and not (run.eval_dir / "single_max").exists()
    with pytest.raises(StageMissingError, match="its training did not finish"):
        adapter_path(str(folder), 0)  # what simulate, the eval recipe and UserAgent load through


def test_changed_adapter_file_is_named(tmp_path):
    from persona_tune.runfolder import TRAIN_SUMMARY, adapter_files, check_adapter

    folder = _partial_adapter(RunFolder(tmp_path), "v", epochs=(0, 1))
    atomic_write_json(folder / TRAIN_SUMMARY, {"files": adapter_files(folder / "epoch_1" / "adapter_model.pt")})
    assert check_adapter(folder) == folder / "epoch_1" / "adapter_model.pt"
    (folder / "epoch_1" / "adapter_model.pt").write_bytes(b"truncat")
    with pytest.raises(DataError, match=r"epoch_1/adapter_model.pt: changed since its training finished.*--force"):
        check_adapter(folder)


def test_failed_eval_leaves_no_numbers_for_report(tmp_path, monkeypatch, capsys):
    from persona_tune.evaluation import run as eval_run
    from persona_tune.runfolder import TRAIN_SUMMARY, adapter_files

    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path)]))
    run = RunFolder(run_dir)
    folder = _partial_adapter(run, "single_max")
    atomic_write_json(folder / TRAIN_SUMMARY, {"files": adapter_files(folder / "epoch_0" / "adapter_model.pt")})
    out = run.eval_variant_dir("single_max")
    out.mkdir(parents=True)
    (out / "metrics.json").write_text('{"old": "numbers"}')  # from an earlier, successful evaluation
    (out / "predictions.parquet").write_bytes(b"old")
    monkeypatch.setattr(eval_run, "tune_executable", lambda: fake_tune(tmp_path, "echo corrupt adapter; exit 1\n"))
    assert cli.main(["eval", "--run", str(run_dir), "--variants", "single_max"]) == 2
    assert not (out / "metrics.json").exists() and not (out / "predictions.parquet").exists()
    capsys.readouterr()
    # A metrics.json whose evaluation never finished (no eval_inputs.json) is refused by report.
    (out / "metrics.json").write_text('{"old": "numbers"}')
    assert cli.main(["report", "--run", str(run_dir)]) == 2
    assert "the evaluation of single_max in" in error_line(capsys)


def test_report_refuses_results_of_an_interrupted_training(tmp_path):
    from persona_tune.evaluation.run import stale_results
    from persona_tune.runfolder import EVAL_INPUTS, TRAIN_SUMMARY, adapter_files

    run = RunFolder(tmp_path)
    folder = _partial_adapter(run, "single_max", epochs=(0, 1))
    epoch_0 = "adapters/single_max/epoch_0/adapter_model.pt"
    # eval scored epoch_0 before the marker existed; `train` finished later (same epoch_0 bytes)
    atomic_write_json(run.eval_variant_dir("single_max") / EVAL_INPUTS, {"adapters": run.checksums(epoch_0)})
    atomic_write_json(folder / TRAIN_SUMMARY, {"files": adapter_files(folder / "epoch_1" / "adapter_model.pt")})
    assert stale_results(run) == ["single_max"]
    atomic_write_json(run.eval_variant_dir("single_max") / EVAL_INPUTS,
                      {"adapters": run.checksums("adapters/single_max/epoch_1/adapter_model.pt")})
    assert stale_results(run) == []


def test_temp_files_of_dead_writers_are_cleaned(tmp_path):
    from persona_tune.runfolder import atomic_path, atomic_write_text

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    plots = tmp_path / "eval" / "plots"
    plots.mkdir(parents=True)
    orphan = plots / f".calibration.tmp{dead}.x1y2.png"  # kill -9 during `report`: a 0-byte temp PNG
    orphan.touch()
    live = plots / f".other.tmp{os.getppid()}.abcd.png"  # a running writer's temp stays
    live.touch()
    with atomic_path(plots / "calibration.png") as tmp:
        assert f".tmp{os.getpid()}." in tmp.name
        tmp.write_bytes(b"png")
    assert not orphan.exists() and live.exists() and (plots / "calibration.png").read_bytes() == b"png"
    other = tmp_path / "eval" / "persona"  # each folder is cleaned at this process's first write into it
    other.mkdir()
    (other / f".x.json.tmp{dead}.zz.tmp").touch()
    atomic_write_text(other / "x.json", "{}")
    assert sorted(p.name for p in other.iterdir()) == ["x.json"]
    assert sorted(p.name for p in plots.iterdir()) == [live.name, "calibration.png"]


def test_train_force_retrains_with_new_overrides(tmp_path, monkeypatch, caplog):
    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path)]))
    run = RunFolder(run_dir)
    folder = _partial_adapter(run, "single_max")
    atomic_write_json(folder / train.SUMMARY, {"inputs": train.variant_inputs(run, "single_max")})
    monkeypatch.setattr(train, "tune_executable", lambda: fake_tune(tmp_path, "exit 3\n"))
    with caplog.at_level(logging.WARNING):
        [result] = train.run(RunFolder(run_dir), train.TrainConfig(personas="single_max", overrides=("epochs=2",)))
    assert result.status == "skipped" and "single_max already trained: skipped" in caplog.text
    [result] = train.run(run, train.TrainConfig(personas="single_max", overrides=("epochs=2",), force=True))
    assert result.status == "failed"  # it ran `tune run` (the fake one fails)
    assert not (folder / train.SUMMARY).exists()  # the old marker went before training started
    parser, _ = cli.build_parser("train")
    assert parser.parse_args(["--run", "r", "--force"]).force is True


# ---------------------------------------------------------------- issue 26: integrity of what is loaded


def _truncated_torch_file(path: Path, obj) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_truncated_torch_files_are_named(tmp_path, capsys):
    import torch

    from persona_tune.peft_export import load_adapter
    from persona_tune.runfolder import load_torch
    from persona_tune.evaluation.head import load_rating_head

    head = _truncated_torch_file(tmp_path / "epoch_1" / "rating_head.pt", {"weight": torch.zeros(5, 8)})
    with pytest.raises(DataError, match=rf"^{head}: unreadable, truncated or corrupt .*train --force"):
        load_rating_head(head, 8)
    adapter = _truncated_torch_file(tmp_path / "epoch_1" / "adapter_model.pt", {"a": torch.ones(64, 64)})
    with pytest.raises(DataError, match=rf"^{adapter}: unreadable, truncated or corrupt"):
        load_torch(adapter)
    with pytest.raises(DataError, match=rf"^{adapter}: unreadable"):  # peft_export's own load
        load_adapter(adapter)
    (tmp_path / "zero.pt").write_bytes(b"")
    with pytest.raises(DataError, match="zero.pt: unreadable"):
        load_torch(tmp_path / "zero.pt")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"model_type": "phi3"}')
    assert cli.main(["export-peft", "--adapter", str(adapter), "--base", str(tmp_path / "base"), "--out",
                     str(tmp_path / "out")]) == 2
    assert f"{adapter}: unreadable, truncated or corrupt" in error_line(capsys)


def test_truncated_trunk_cache_shard_is_named_and_recomputed(tmp_path, caplog):
    from persona_tune.trunk import TrunkCache

    cache = TrunkCache(tmp_path, {"model": "tiny"}, "fp32")
    shard = _truncated_torch_file(cache._path(7), {"groups": []})
    with caplog.at_level(logging.WARNING):
        assert cache.missing([[1, 2, 3]], [7]) == 1  # computed again by the next build
    assert f"{shard}: unreadable trunk-cache shard" in caplog.text and not shard.exists()


def test_corrupt_parts_are_recomputed(tmp_path, caplog):
    from persona_tune.runfolder import SimulationFolder
    from persona_tune.simulate.scoring import read_parts

    sim = SimulationFolder(tmp_path / "sim")
    sim.parts_dir.mkdir(parents=True)
    atomic_write_json(sim.parts_dir / "part_0.json", {"fingerprint": "f"})
    (sim.parts_dir / "part_0.parquet").write_bytes(b"PAR1 truncated")
    with caplog.at_level(logging.WARNING):
        assert read_parts(sim, "f").empty  # its rows are scored again
    assert "part_0.parquet: unreadable agent scores part" in caplog.text
    assert not (sim.parts_dir / "part_0.parquet").exists()


def test_corrupt_request_store_is_named_not_replaced(tmp_path):
    from persona_tune.distill.store import RequestStore

    store = tmp_path / "requests.sqlite"
    store.write_bytes(b"not a database, but paid for" * 100)
    with pytest.raises(DataError, match=rf"^{store}: not a readable request store .*not replaced"):
        RequestStore(store)
    assert store.read_bytes().startswith(b"not a database")


# ---------------------------------------------------------------- issue 26/27: validation before destruction


STAGE_CONFIGS = [  # (command, module, Config class name): the stages whose CLI is generated from a Config
    ("prepare", "persona_tune.data.prepare", "PrepareConfig"), ("distill", "persona_tune.distill.run", "DistillConfig"),
    ("embed", "persona_tune.memory.stage", "EmbedConfig"), ("personas", "persona_tune.personas", "PersonasConfig"),
    ("configs", "persona_tune.configgen", "ConfigsConfig"), ("train", "persona_tune.train", "TrainConfig"),
    ("eval", "persona_tune.evaluation.run", "EvalConfig"), ("baselines", "persona_tune.evaluation.baselines",
                                                            "BaselinesConfig"),
    ("simulate", "persona_tune.simulate.run", "SimulateConfig"), ("report", "persona_tune.evaluation.report",
                                                                  "ReportConfig"),
    ("grid", "persona_tune.evaluation.grid", "GridConfig"),
]


REQUIRED = {"prepare": ["--dataset", "synthetic", "--out", "R"], "grid": ["--run", "R", "--family", "tiny"]}


def _bad_values(rule: dict) -> list:
    """Values just outside a range rule (persona_tune.stage)."""
    bad = [float("nan")]
    bad += [rule["min"] - 1] if "min" in rule else []
    bad += [rule["gt"]] if "gt" in rule else []
    bad += [rule["max"] + 1] if "max" in rule else []
    bad += [rule["lt"]] if "lt" in rule else []
    return bad


@pytest.mark.parametrize("command, module, name", STAGE_CONFIGS)
def test_every_config_is_checked_alike_by_cli_and_python(command, module, name):
    """One rule per field (its metadata); the CLI's parser and stage.validate refuse the same values."""
    import dataclasses
    import importlib

    from persona_tune.stage import check_fields, config_from_args, range_rule, validate

    config_cls = getattr(importlib.import_module(module), name)
    validate(config_cls())  # the defaults are valid
    parser, _ = cli.build_parser(command)
    flags = {a.dest: a for a in parser._actions}
    checked = 0
    for f in dataclasses.fields(config_cls):
        default = getattr(config_cls(), f.name)
        kind = type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else None
        if kind is None or f.name not in flags:
            continue
        for bad in _bad_values(range_rule(f.metadata)):
            if kind is int and bad != bad:  # nan is no int
                continue
            with pytest.raises(ConfigError, match=f"--{f.name.replace('_', '-')} must be") as python:
                check_fields(dataclasses.replace(config_cls(), **{f.name: kind(bad)}))
            args = parser.parse_args([*REQUIRED.get(command, ["--run", "R"]), flags[f.name].option_strings[0],
                                      str(kind(bad))])
            with pytest.raises(ConfigError) as from_cli:  # the CLI: the same validate, the same line
                config_from_args(config_cls, args)
            assert str(from_cli.value) == str(python.value)
            checked += 1
    assert checked or command in ("eval", "report", "configs")


def test_simulate_n_boot_zero_is_refused_by_python_too(tmp_path, capsys):
    from persona_tune.simulate import run as simulate
    from persona_tune.simulate.run import SimulateConfig
    from persona_tune.stage import validate

    with pytest.raises(ConfigError) as python:
        validate(SimulateConfig(n_boot=0))
    with pytest.raises(ConfigError) as stage_run:  # the stage itself, before it reads anything
        simulate.run(RunFolder(tmp_path / "missing"), SimulateConfig(n_boot=0))
    assert cli.main(["simulate", "--run", str(tmp_path / "missing"), "--n-boot", "0"]) == 2
    cli_line = error_line(capsys)
    assert str(python.value) == str(stage_run.value) == "--n-boot must be >= 1, got 0"
    assert cli_line == f"persona-tune simulate: error: {python.value}"
    with pytest.raises(ConfigError, match="--k must be a whole number, got 2.5"):
        validate(SimulateConfig(k=2.5))
    assert not hasattr(cli, "AT_LEAST_ONE") and not hasattr(cli, "POSITIVE")  # no by-name lists left


def test_stage_run_validates_python_callers(tmp_path):
    from persona_tune.personas import PersonasConfig
    from persona_tune.personas import run as personas_run

    run_dir = make_prepared_run(tmp_path)
    with pytest.raises(ConfigError, match="--k-max must be >= 1, got 0"):
        personas_run(RunFolder(run_dir), PersonasConfig(k_max=0))


@pytest.mark.parametrize("override, message", [
    ("model.lora_rank=-4", "model.lora_rank must be >= 1, got -4"),
    ("model.lora_dropout=7", "model.lora_dropout must be >= 0 and < 1, got 7"),
    ("optimizer.lr=0", "optimizer.lr must be > 0, got 0"),
])
def test_bad_config_values_are_refused_before_anything_is_deleted(tmp_path, capsys, override, message):
    run_dir = with_personas(tmp_path, n_personas=3)
    model = "model_dir=" + str(tmp_path)
    assert cli.main(["configs", "--run", str(run_dir), "--family", "tiny", "--", model]) == 0
    configs = {p.name: p.read_bytes() for p in (run_dir / "configs").iterdir()}
    capsys.readouterr()
    assert cli.main(["configs", "--run", str(run_dir), "--family", "tiny", "--force", "--", model, override]) == 2
    assert message in error_line(capsys)
    assert {p.name: p.read_bytes() for p in (run_dir / "configs").iterdir()} == configs  # untouched
    run = RunFolder(run_dir)  # a trained variant: `train --force` with a bad override keeps it
    folder = _partial_adapter(run, "single_max")
    atomic_write_json(folder / train.SUMMARY, {"inputs": train.variant_inputs(run, "single_max")})
    assert cli.main(["train", "--run", str(run_dir), "--personas", "single_max", "--force", "--", override]) == 2
    assert message in error_line(capsys)
    assert (folder / train.SUMMARY).is_file() and (folder / "epoch_0" / "adapter_model.pt").is_file()


# ---------------------------------------------------------------- issue 26: API and file inputs


@pytest.mark.parametrize("rank, message", [
    (str(10**30), "rank '1000000000000000000000000000000' is out of range (a 64-bit integer"),
    ("18446744073709551615", "out of range"), ("2.5", "rank must be an integer >= 1, got '2.5'"),
])
def test_recs_ranks_are_integers_within_int64(tmp_path, rank, message):
    from persona_tune.simulate.recs import validate_recs

    recs = tmp_path / "recs.csv"
    recs.write_text(f"recommender,user_id,item_id,rank\nA,1,2,1\nA,1,3,{rank}\n")
    with pytest.raises(DataError) as e:
        validate_recs(recs, [1], [2, 3])
    assert f"{recs}:3: " in str(e.value) and message in str(e.value)
    recs.write_text("recommender,user_id,item_id,rank\nA,9223372036854775807,2,1\n")  # int64's largest
    assert validate_recs(recs, [2**63 - 1], [2])["user_id"].tolist() == [2**63 - 1]


def test_one_column_for_two_keys_is_named(tmp_path, capsys):
    (tmp_path / "r.csv").write_text("user,item_id,rating,timestamp\n1,1,4,10\n")
    args = ["prepare", "--dataset", "generic", "--ratings-file", str(tmp_path / "r.csv"), "--out", str(tmp_path / "run"),
            "--columns", "user=item_id"]
    assert cli.main(args) == 2
    assert "--columns maps user and item to the same column 'item_id'" in error_line(capsys)


def test_tune_run_with_a_missing_config_is_one_line(tmp_path, capsys):
    """`tune run R --config X` for an X that is neither a file nor a config name: one line, exit 2
    (persona_tune._hook patches torchtune's `tune run` command when it is imported)."""
    import torchtune._cli.run as tune_run

    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(SystemExit) as exit_:
        tune_run.Run._get_config(None, missing, None)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (f"tune run: error: config '{missing}' does not exist: neither a "
                                               "file nor a config name (`tune ls` lists the names)")
    real = REPO / "configs" / "tiny_persona" / "persona_0.yaml"
    assert tune_run.Run._get_config(None, str(real), None) is None  # a file: torchtune reads it as before


def test_user_agent_refuses_a_partial_adapter_before_loading_the_model(tmp_path):
    from persona_tune.agent import UserAgent

    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path / "no-model")]))
    folder = _partial_adapter(RunFolder(run_dir), "single_max")
    with pytest.raises(StageMissingError, match=rf"{folder}: its training did not finish"):
        UserAgent.from_run(run_dir, variant="single_max", family="tiny")  # the model folder does not even exist


def test_a_remote_eval_writes_no_password(tmp_path, monkeypatch):
    """eval --backend openai: eval_config.yaml holds http://***@host; the `tune run` child gets the
    real URL in its environment, and persona_tune.serving.remote.endpoint resolves it there."""
    from persona_tune.evaluation import run as eval_run
    from persona_tune.runfolder import TRAIN_SUMMARY, adapter_files
    from persona_tune.serving import export as serving_export
    from persona_tune.serving.remote import SECRET_URL_ENV, RemoteOptions, endpoint

    run_dir = with_personas(tmp_path)
    configgen.run(RunFolder(run_dir), ConfigsConfig(family="tiny", overrides=["model_dir=" + str(tmp_path)]))
    folder = _partial_adapter(RunFolder(run_dir), "single_max")
    atomic_write_json(folder / TRAIN_SUMMARY, {"files": adapter_files(folder / "epoch_0" / "adapter_model.pt")})
    seen = {}
    monkeypatch.setattr(serving_export, "read_serving_spec", lambda run, variant: {})
    monkeypatch.setattr(eval_run, "evaluate_variant", lambda run, v, cfg, force, adapters, env: seen.update(
        cfg=cfg, env=env) or "done")
    secret = "http://user:s3cret@127.0.0.1:9/v1"
    eval_run.run(RunFolder(run_dir), eval_run.EvalConfig(variants="single_max", family="tiny", backend="openai",
                                                         base_url=secret))
    assert seen["cfg"].remote.base_url == "http://***@127.0.0.1:9/v1" and "s3cret" not in str(seen["cfg"])
    assert seen["env"][SECRET_URL_ENV] == secret
    monkeypatch.setenv(SECRET_URL_ENV, secret)  # in the child
    assert endpoint(RemoteOptions(backend="openai", base_url="http://***@127.0.0.1:9/v1")) == secret
    assert endpoint(RemoteOptions(backend="openai", base_url="http://***@other:9/v1")) == "http://***@other:9/v1"


def test_report_refuses_results_of_changed_data(tmp_path):
    from persona_tune.evaluation.run import stale_results
    from persona_tune.runfolder import AGENT_INPUTS, EVAL_INPUTS

    run = RunFolder(make_distilled_run(tmp_path, n_users=4))
    atomic_write_json(run.eval_variant_dir("prompted") / EVAL_INPUTS,
                      {"config": "c", "adapters": {}, "data": run.checksums(*AGENT_INPUTS)})
    assert stale_results(run) == []
    profiles = run.read_profiles()
    profiles.loc[0, "profile"] = "another profile"  # `distill` ran again since
    atomic_write_parquet(profiles, run.path("distill/profiles.parquet"))
    assert stale_results(run) == ["prompted"]


# ---------------------------------------------------------------- issue 27: one override syntax


@pytest.mark.parametrize("command, required, old, new", [
    ("configs", ["--run", "R"], ["--set", "epochs=2", "--set", "~profiler"], ["--", "epochs=2", "~profiler"]),
    ("grid", ["--run", "R", "--family", "tiny"],
     ["--train-set", "epochs=2", "--eval-set", "max_rows=5", "--eval-set", "~metrics.n_boot"],
     ["--", "epochs=2", "eval.max_rows=5", "~eval.metrics.n_boot"]),
])
def test_old_override_flags_are_aliases_of_the_one_syntax(command, required, old, new, caplog):
    """`-- KEY=VALUE` in every command; `configs --set` and `grid --train-set/--eval-set` still work for one
    release (a warning names the new spelling) and give the same Config."""
    import importlib

    from persona_tune.stage import config_from_args

    parser, module = cli.build_parser(command)
    config_cls = {"configs": "ConfigsConfig", "grid": "GridConfig"}[command]
    config_cls = getattr(importlib.import_module(module.__name__), config_cls)
    with caplog.at_level(logging.WARNING):
        aliased = config_from_args(config_cls, parser.parse_args([*required, *old]))
    assert aliased == config_from_args(config_cls, parser.parse_args([*required, *new]))
    assert aliased.overrides == tuple(new[1:])
    assert f"{old[0]} {old[1]} is deprecated" in caplog.text and f"write `-- {new[1]}`" in caplog.text
    assert "deprecated alias of `-- " in parser.format_help()


def test_grid_overrides_split_into_training_and_eval_configs():
    from persona_tune.evaluation.grid import GridConfig
    from persona_tune.stage import validate as validate_config

    items = ("epochs=2", "eval.max_rows=5", "~eval.metrics.n_boot", "~profiler")
    stock = GridConfig(family="tiny", overrides=items)
    assert stock.split_overrides() == (["epochs=2", "~profiler"], ["max_rows=5", "~metrics.n_boot"])
    trunk = GridConfig(family="tiny", path="trunk", overrides=items)  # its training config has the eval section
    assert trunk.split_overrides() == (list(items), [])
    with pytest.raises(ConfigError, match="invalid override 'max_rows'"):
        validate_config(GridConfig(family="tiny", overrides=("max_rows",)))


@pytest.mark.parametrize("command, name, values", [
    ("simulate", "SimulateConfig", dict(variant="trunk-demo-persona-ms", family="tiny", users=4, candidates=10,
                                        n_boot=200, progress=False, topk=False, negatives=1,
                                        overrides=("model_dir=/m", "eval.x=1"))),
    ("grid", "GridConfig", dict(family="tiny", path="trunk", label="demo", train_rows="40", n_boot=200,
                                cells="persona-ms", overrides=("head.prior=stated",))),
    ("distill", "DistillConfig", dict(backend="offline", progress=False, users=3)),
    ("configs", "ConfigsConfig", dict(family="tiny", force=True, overrides=("model_dir=/m",))),
    ("train", "TrainConfig", dict(personas="0,single_max", parallel=True, overrides=("epochs=2",))),
    ("personas", "PersonasConfig", dict(k=3, k_max=6, seed=1)),
])
def test_config_argv_is_the_command_line_of_a_config(command, name, values):
    """What the demo prints for a stage it runs (stage.config_argv) is a command line that gives the same Config."""
    from persona_tune.stage import config_argv, config_from_args

    parser, module = cli.build_parser(command)
    cfg = getattr(module, name)(**values)
    assert config_argv(type(cfg)()) == []  # the defaults need no argument
    assert config_from_args(type(cfg), parser.parse_args(["--run", "R", *config_argv(cfg)])) == cfg
