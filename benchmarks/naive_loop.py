"""The paper's prediction loop: one row at a time through torchtune's ``generate``, then the regex.

No batching and no prefix reuse. It is the reference the batched engine (persona_tune/evaluation/)
is tested against (tests/test_eval_predict.py) and measured against (bench_eval.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
import torch
from torchtune.generation import generate as tt_generate
from torchtune.generation import sample as tt_sample
from tqdm.auto import tqdm

from persona_tune.evaluation.engine import (
    AnswerTokens,
    GenerationConfig,
    _delete_caches,
    answer_tokens,
    row_generator,
    top_p_filter,
)
from persona_tune.evaluation.parsing import get_parser


def naive_generate(
    model, tokenizer, prompts: Sequence[Sequence[int]], keys: Sequence, gen: GenerationConfig,
    answer: AnswerTokens | None = None, progress: bool = True, device="cpu",
) -> pd.DataFrame:
    """The paper's path: one row at a time, torchtune's ``generate`` with a KV cache, then the regex.

    No batching and no prefix reuse; kept as the reference the batched path is measured against.
    """
    answer = answer or answer_tokens(tokenizer)
    parse = get_parser(gen.parser)
    dtype = next(model.parameters()).dtype
    longest = max(map(len, prompts)) + gen.max_new_tokens
    next_token = _top_p_next_token(gen.top_p, gen.temperature)
    texts, news = [], []
    with torch.inference_mode(), torch.device(device):
        model.setup_caches(batch_size=1, dtype=dtype, decoder_max_seq_len=longest)
        try:
            for prompt, key in tqdm(list(zip(prompts, keys)), desc="naive generate", disable=not progress, leave=False):
                model.reset_caches()
                out, _ = tt_generate(
                    model, torch.tensor(prompt, device=device), max_generated_tokens=gen.max_new_tokens,
                    temperature=gen.temperature, top_k=gen.top_k, stop_tokens=list(answer.stop_ids),
                    rng=row_generator(gen.seed, key), custom_generate_next_token=next_token,
                )
                new = out[0, len(prompt):].tolist()
                ids = []
                for t in new:
                    if t in answer.stop_ids:
                        break
                    ids.append(t)
                texts.append(tokenizer.decode(ids))
                news.append(len(new))
        finally:
            model.reset_caches()
            _delete_caches(model)
    return pd.DataFrame({"raw_text": texts, "parsed_rating": [parse(t) for t in texts], "n_new_tokens": news})


def _top_p_next_token(top_p: float | None, temperature: float) -> Callable | None:
    if top_p is None or top_p >= 1.0:
        return None

    def next_token(model, input_pos, x, q=None, *, mask=None, temperature=temperature, top_k=None):
        logits = model(x, input_pos=input_pos, mask=mask)[:, -1]
        filtered = top_p_filter(logits, top_p, temperature)
        return tt_sample(filtered.clone(), temperature=temperature, top_k=top_k, q=q), logits.unsqueeze(1)

    return next_token
