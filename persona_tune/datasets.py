"""torchtune dataset builders over a run folder, for ``dataset._component_`` in configs.

    dataset:
      _component_: persona_tune.datasets.persona_dataset
      run_dir: runs/ml1m
      memory: ms+ml        # ms | ms+ml | ml
      persona: 0           # null: every user
      subsample: null      # about N rows, the same fraction of each user's rows
      prompt_template: paper  # paper | compact (persona_tune.prompts)
      state_numbers: False    # state the item's historical average and the user's offset before the answer
      collab_memories: 0      # k collaborative memories (the user's ratings of the k most similar items); 0 = off

Each row becomes system = role play + traits + M_s, user = task + retrieved M_l + item text,
assistant = the rating (persona_tune.prompts), so training and evaluation prompts are identical.
Only the assistant turn is trained on unless ``train_on_input``.

Length policy: a prompt longer than ``max_seq_len`` (default: the tokenizer's) is shrunk before it
is tokenized for good, boilerplate before facts (persona_tune.prompts.fit_to_length): the preambles,
then memories (last first), then collaborative memories, then the end of the profile, then the traits; the task, the item, the
stated numbers and the answer are never cut. Lengths are the tokenizer's own token
counts. Works with any torchtune ModelTokenizer (Phi-3, Llama 3.2 / SmolLM2, the tiny test model).
"""

from __future__ import annotations

from typing import Any, Mapping

from torchtune.datasets import PackedDataset, SFTDataset
from torchtune.datasets._sft import SFTTransform
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from persona_tune.errors import ConfigError
from persona_tune.prompts import FitToLength, load_prompt_rows, persona_messages


class PersonaMessages(Transform):
    """Message transform: ``{"parts": PromptParts, "rating": int}`` -> messages (parts kept for fitting)."""

    def __init__(self, train_on_input: bool = False):
        self.train_on_input = train_on_input

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        parts, rating = sample["parts"], int(sample["rating"])
        return {"messages": persona_messages(parts, rating, self.train_on_input), "parts": parts, "rating": rating}


class PersonaSFTDataset(SFTDataset):
    """torchtune's SFTDataset over rows already in memory.

    SFTDataset's constructor only loads a Hugging Face dataset into ``_data``; here the rows come
    from the run folder's Parquet files (prompts.load_prompt_rows), so they are held as a list and
    the per-sample pipeline (SFTTransform: message transform, model transform, labels) is torchtune's.
    """

    def __init__(self, rows: list[dict[str, Any]], message_transform: Transform, model_transform: Transform):
        self._message_transform = message_transform
        self._model_transform = model_transform
        self._data = rows
        self._prepare_sample = SFTTransform(message_transform=message_transform, model_transform=model_transform)


def persona_dataset(
    tokenizer: ModelTokenizer,
    *,
    run_dir: str,
    split: str = "train",
    memory: str = "ms+ml",
    persona: int | None = None,
    subsample: int | None = None,
    seed: int = 0,
    train_on_input: bool = False,
    max_seq_len: int | None = None,
    packed: bool = False,
    prompt_template: str = "paper",
    state_numbers: bool = False,
    collab_memories: int = 0,
) -> SFTDataset | PackedDataset:
    """Rating rows of a run folder as a torchtune SFT dataset.

    Args:
        tokenizer: any torchtune ModelTokenizer (the recipe passes the config's tokenizer).
        run_dir: the run folder.
        split: "train" or "test".
        memory: "ms" (profile only), "ms+ml" (profile + retrieved memories) or "ml" (memories only).
        persona: keep only this persona's users (needs `persona-tune personas`); None keeps all.
        subsample: keep about this many rows, the same fraction of each user's rows (seeded).
        seed: the subsample's seed.
        train_on_input: also compute the loss on the system and user turns.
        max_seq_len: token budget per sample; None means the tokenizer's ``max_seq_len``.
        packed: pack samples into ``max_seq_len`` blocks (torchtune PackedDataset).
        prompt_template: "paper" (the paper's wording) or "compact" (the same facts in fewer tokens).
        state_numbers: state the item's historical average and the user's offset next to the task.
        collab_memories: show the user's own ratings of the k items most similar to the target
            (collaborative similarity, persona_tune.history) and the bias and item-kNN numbers; 0 = off.
    """
    max_seq_len = max_seq_len if max_seq_len is not None else getattr(tokenizer, "max_seq_len", None)
    if max_seq_len is not None and max_seq_len < 1:
        raise ConfigError(f"max_seq_len must be positive, got {max_seq_len}")
    if packed and max_seq_len is None:
        raise ConfigError("packed=True needs max_seq_len (on the dataset or the tokenizer)")
    table = load_prompt_rows(run_dir, split=split, memory=memory, persona=persona, subsample=subsample, seed=seed,
                             template=prompt_template, state_numbers=state_numbers,
                             collab_memories=collab_memories)
    rows = [{"parts": p, "rating": int(r)} for p, r in zip(table["parts"], table["rating"])]
    ds = PersonaSFTDataset(
        rows,
        message_transform=PersonaMessages(train_on_input),
        model_transform=FitToLength(tokenizer, max_seq_len, train_on_input),
    )
    if packed:
        return PackedDataset(ds, max_seq_len=max_seq_len)
    return ds
