"""torchtune dataset builders: prompts decode back, only the answer is trained on, lengths fit."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from omegaconf import OmegaConf
from torchtune import config
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.datasets import PackedDataset, SFTDataset
from torchtune.models.llama2 import llama2_tokenizer

from persona_tune.cli import main as cli_main
from persona_tune.datasets import persona_dataset
from persona_tune.errors import ConfigError
from persona_tune.models.tiny import tiny_phi3_tokenizer, write_tiny_phi3
from persona_tune.personas import PersonasConfig
from persona_tune import personas
from persona_tune.runfolder import RunFolder
from persona_tune.prompts import MEMORY_INTRO, PROFILE_INTRO, TASK, TERSE_TASK, load_prompt_rows, render_messages
from tests.fixtures_runs import require_shared
from tests.fixtures_runs import make_embedded_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_embedded_run(tmp_path_factory.mktemp("ds"), n_users=12, k=2, delta=0.0)
    personas.run(RunFolder(run), PersonasConfig(k=2, n_init=2))
    return run


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return str(write_tiny_phi3(tmp_path_factory.mktemp("tiny")) / "tokenizer" / "tokenizer.model")


@pytest.fixture(scope="module")
def phi3(tokenizer_path):
    return tiny_phi3_tokenizer(tokenizer_path, max_seq_len=4096)


def trained_positions(sample) -> np.ndarray:
    return np.flatnonzero(np.asarray(sample["labels"]) != CROSS_ENTROPY_IGNORE_IDX)


@pytest.mark.parametrize("which", ["phi3", "llama2"])
def test_sample_decodes_to_the_prompt_and_only_the_answer_is_trained(run, phi3, tokenizer_path, which):
    tok = phi3 if which == "phi3" else llama2_tokenizer(tokenizer_path, max_seq_len=4096)
    ds = persona_dataset(tok, run_dir=str(run))
    rows = load_prompt_rows(run)
    assert isinstance(ds, SFTDataset) and len(ds) == len(rows)
    for i in (0, len(ds) // 2, len(ds) - 1):
        parts, rating = rows.parts[i], int(rows.rating[i])
        sample = ds[i]
        messages = render_messages(parts, rating)
        assert sample["tokens"] == tok({"messages": messages})["tokens"]
        text = tok.decode(sample["tokens"])
        for piece in (parts.profile, parts.item, TASK, parts.memories[0][1]):
            assert " ".join(piece.split()) in " ".join(text.split())
        # Loss only on the answer turn: exactly the tokens that the assistant message adds.
        prompt_len = len(tok({"messages": messages[:2]})["tokens"])
        trained = trained_positions(sample)
        assert trained.tolist() == list(range(prompt_len, len(sample["tokens"])))
        answer = [sample["tokens"][j] for j in trained]
        assert tok.decode(answer).strip() == str(rating)
        if which == "llama2":
            assert answer[-1] == tok.eos_id and len(answer) <= 3  # the digit (+ a space piece) and eos
        else:
            # Phi-3's turn format (torchtune adds no eos here): <|assistant|> \n rating <|end|> \n
            newline = tok.encode("\n", add_bos=False, add_eos=False)
            digit = tok.encode(str(rating), add_bos=False, add_eos=False, trim_leading_whitespace=True)
            special = tok.special_tokens
            assert answer == [special["<|assistant|>"], *newline, *digit, special["<|end|>"], *newline]


def test_memory_modes(run, phi3):
    def decoded(memory):
        return phi3.decode(persona_dataset(phi3, run_dir=str(run), memory=memory)[3]["tokens"])

    ms, both, ml = decoded("ms"), decoded("ms+ml"), decoded("ml")
    assert PROFILE_INTRO.strip() in ms and MEMORY_INTRO[:40] not in ms
    assert PROFILE_INTRO.strip() in both and MEMORY_INTRO[:40] in both
    assert PROFILE_INTRO.strip() not in ml and MEMORY_INTRO[:40] in ml
    with pytest.raises(ConfigError, match="memory must be one of"):
        persona_dataset(phi3, run_dir=str(run), memory="all")


def test_persona_filter_subsample_and_test_split(run, phi3):
    rows = load_prompt_rows(run)
    for persona in (0, 1):
        ds = persona_dataset(phi3, run_dir=str(run), persona=persona)
        assert len(ds) == (rows.persona == persona).sum() > 0
    sub = persona_dataset(phi3, run_dir=str(run), subsample=50, seed=3)
    assert len(sub) == 50
    test = persona_dataset(phi3, run_dir=str(run), split="test")
    assert len(test) == len(load_prompt_rows(run, split="test"))


def test_train_on_input_trains_on_every_token(run, phi3):
    sample = persona_dataset(phi3, run_dir=str(run), train_on_input=True)[0]
    assert sample["labels"] == sample["tokens"]


def test_long_prompts_lose_boilerplate_then_memories_then_profile(run, phi3):
    rows = load_prompt_rows(run)
    parts, rating = rows.parts[0], int(rows.rating[0])

    def n_tokens(p):
        return len(phi3({"messages": render_messages(p, rating)})["tokens"])

    def text_at(budget):
        sample = persona_dataset(phi3, run_dir=str(run), max_seq_len=budget)[0]
        return sample, " ".join(phi3.decode(sample["tokens"]).split())

    squash = lambda t: " ".join(t.split())  # noqa: E731
    full, terse = n_tokens(parts), replace(parts, terse=True)
    assert len(parts.memories) == 2 and n_tokens(terse) < full
    # One token short: the boilerplate goes (preambles, long task wording); memories and profile stay.
    sample, text = text_at(full - 1)
    assert len(sample["tokens"]) == n_tokens(terse) and MEMORY_INTRO[:40] not in text and TERSE_TASK in text
    assert all(squash(m[1]) in text for m in parts.memories) and squash(parts.profile) in text
    # Then the last memory.
    sample, text = text_at(n_tokens(terse) - 1)
    assert squash(parts.memories[0][1]) in text and squash(parts.memories[1][1]) not in text
    # Room for everything but the memories: both go, the profile stays whole.
    no_memory = n_tokens(replace(terse, memories=()))
    sample, text = text_at(no_memory)
    assert len(sample["tokens"]) == no_memory and squash(parts.profile) in text
    # Less room: the profile is cut, the task, the item and the answer never are.
    budget = no_memory - 40
    sample, text = text_at(budget)
    assert budget - 12 <= len(sample["tokens"]) <= budget
    assert " ".join(parts.profile.split()[:5]) in text and " ".join(parts.profile.split()) not in text
    assert TERSE_TASK in text and " ".join(parts.item.split()) in text
    assert phi3.decode([sample["tokens"][j] for j in trained_positions(sample)]).strip() == str(rating)
    with pytest.raises(ConfigError, match="task and item text alone"):
        persona_dataset(phi3, run_dir=str(run), max_seq_len=20)[0]


def test_packed_and_built_from_a_config(run, phi3, tokenizer_path):
    packed = persona_dataset(phi3, run_dir=str(run), packed=True, max_seq_len=2048)
    assert isinstance(packed, PackedDataset)
    assert all(len(packed[i]["tokens"]) == 2048 for i in range(len(packed)))
    cfg = OmegaConf.create(
        {
            "tokenizer": {
                "_component_": "persona_tune.models.tiny.tiny_phi3_tokenizer",
                "path": tokenizer_path,
                "max_seq_len": 1024,
            },
            "dataset": {
                "_component_": "persona_tune.datasets.persona_dataset",
                "run_dir": str(run),
                "memory": "ms+ml",
                "persona": 1,
                "subsample": None,
            },
        }
    )
    tok = config.instantiate(cfg.tokenizer)
    ds = config.instantiate(cfg.dataset, tok)  # how torchtune's recipes build it
    assert len(ds) == (load_prompt_rows(run).persona == 1).sum()
    assert max(len(ds[i]["tokens"]) for i in range(0, len(ds), 7)) <= 1024


@pytest.mark.integration
@pytest.mark.slow
def test_paper_prompts_fit_in_phi3_context(tmp_path, tokenizer_path):
    """The paper's setting (ML-1M, 200 users, M_s + top-1 M_l): every train and test prompt fits in
    4,096 tokens. Offline-distilled profiles; hash embeddings; Phi-3's chat format with the tiny
    Phi-3 tokenizer (1,024 pieces: it splits text into more tokens than Phi-3's 32k vocabulary)."""
    data = require_shared("data")
    run = tmp_path / "ml1m"
    assert cli_main([
        "prepare", "--dataset", "ml-1m", "--data-dir", str(data / "ml-1m"),
        "--ratings-file", "ratings.partial-users0001-2999.dat",
        "--meta-file", str(data / "movie-meta" / "ml1m_dbpedia_abstracts.json"), "--out", str(run),
    ]) == 0
    assert cli_main(["distill", "--run", str(run), "--backend", "offline", "--no-progress"]) == 0
    assert cli_main(["embed", "--run", str(run), "--backend", "hash", "--k", "1"]) == 0
    tok = tiny_phi3_tokenizer(tokenizer_path)  # no max_seq_len: true lengths, nothing truncated

    def n_tokens(messages):
        return len(tok.tokenize_messages(messages)[0])

    for split in ("train", "test"):
        rows = load_prompt_rows(run, split=split, memory="ms+ml")
        assert len(rows) > 10_000 and sum(bool(p.memories) for p in rows.parts) > 0.9 * len(rows)
        # Phi-3 tokenizes message by message, so a prompt's length is the sum of its turns' lengths
        # (each alone carries one BOS): the system turn is counted once per user.
        system_len, answer_len, lengths = {}, {}, []
        for parts, rating in zip(rows.parts, rows.rating):
            system, user, answer = render_messages(parts, int(rating))
            if system.text_content not in system_len:
                system_len[system.text_content] = n_tokens([system])
            if answer.text_content not in answer_len:
                answer_len[answer.text_content] = n_tokens([answer])
            lengths.append(system_len[system.text_content] + n_tokens([user]) + answer_len[answer.text_content] - 2)
        for i in range(0, len(rows), len(rows) // 20):  # the sum is exact
            assert lengths[i] == n_tokens(render_messages(rows.parts[i], int(rows.rating[i])))
        assert max(lengths) <= 4096, f"{split}: longest prompt {max(lengths)} tokens"
