"""Serving trained agents with existing engines (vLLM, llama.cpp): export bundles, rate remotely.

- ``persona_tune.serving.export``: fold a rating head into an output-projection LoRA, write the PEFT
  adapter, ``serving.json`` and the GGUF pair for llama.cpp.
- ``persona_tune.serving.stage``: the ``serve-export`` stage (Config + ``run(run, cfg)``).
- ``persona_tune.serving.remote``: the remote rater behind ``--backend openai`` of eval and simulate.
- ``persona_tune.serving.parity``: rate the same rows locally and through a llama.cpp server.
"""
