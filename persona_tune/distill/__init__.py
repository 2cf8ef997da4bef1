"""Distillation: user profiles (M_s), per-rating explanations (M_l) and Agent4Rec-style traits.

``traits`` computes the activity / conformity / diversity levels, ``offline`` writes deterministic
rule-based M_s / M_l, ``llm`` runs the paper's hierarchical self-reflection (the prompts and checks
of ``reflect``) through any OpenAI-compatible endpoint (``client``), with every answered request
kept in ``store``.
``run`` is the ``persona-tune distill`` stage.
"""
