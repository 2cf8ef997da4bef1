"""Known-harmless third-party messages, silenced in persona-tune's own processes (the CLI and `tune run`).

See docs/troubleshooting.md. Only exact, known messages are dropped; everything else still shows.
"""

from __future__ import annotations

import logging

# logger name -> message prefixes that carry no information for our users.
KNOWN_NOISE = {
    # torchao 0.15 on torch 2.13: its optional C++ kernels are not used by persona-tune.
    "torchao": ("Skipping import of cpp extensions",),
    # torchao on a machine without Triton (every CPU-only one): its GPU int-matmul kernels are not used.
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
}


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_noise() -> None:
    """Install the filters (idempotent)."""
    for name, prefixes in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(prefixes))
