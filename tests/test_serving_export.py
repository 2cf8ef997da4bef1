"""`persona-tune serve-export`: the rating head folded into an output-projection LoRA gives the head's
logits (tied and untied output, stated-number terms included), and the exported PEFT adapters give
the local path's ratings through HF PEFT (the GGUF pair through llama.cpp's server:
tests/test_serving_llamacpp.py)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torchtune.modules import TiedLinear

from persona_tune.errors import PersonaTuneError, StageMissingError
from persona_tune.serving import export as ex
from persona_tune.evaluation.head import HeadedOutput, RatingHead
from tests.serving_fixtures import STOCK, TRUNK, build_serving_run, export_all

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATINGS = np.arange(1, 6)


def _head(dim: int, rating_ids, prior: str) -> RatingHead:
    torch.manual_seed(1)
    head = RatingHead(dim, rating_ids, prior)
    with torch.no_grad():
        for p in (head.weight, head.bias, head.prior_weight):
            p.normal_(0, 0.5)
        head.prior_fill.copy_(torch.arange(head.n_prior, dtype=torch.float32) + 3.0)
    return head


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("output_lora", [False, True])
def test_the_head_folded_into_an_output_lora_gives_the_heads_logits(tied, output_lora):
    V, D, rank, alpha = 50, 16, 4, 8.0
    rating_ids = [7, 9, 11, 13, 30]
    torch.manual_seed(0)
    embedding = nn.Embedding(V, D)
    output = TiedLinear(embedding) if tied else nn.Linear(D, V, bias=False)
    base_weight = embedding.weight if tied else output.weight
    head = _head(D, rating_ids, "stated")
    h = torch.randn(6, D)
    priors = torch.tensor([[3.5, 3.4], [np.nan, np.nan], [4.1, 3.9], [2.2, 2.0], [np.nan, np.nan], [3.0, 3.1]])
    # An adapter that also trained a LoRA on the output (torchtune names): the head must join it.
    lora = {}
    if output_lora:
        lora = {"output.lora_a.weight": torch.randn(rank, D) * 0.3, "output.lora_b.weight": torch.randn(V, rank) * 0.3}
    trained = base_weight.detach() + (alpha / rank) * (lora["output.lora_b.weight"] @ lora["output.lora_a.weight"]
                                                       if lora else 0)

    local = HeadedOutput(lambda x: x @ trained.T, head)  # what the local path computes
    local.row_priors = priors
    with torch.no_grad():
        expected = local(h)

    a, b = ex.fold_head(head.weight, rating_ids, V)
    tensors = ex.gguf_lora_tensors(lora, "llama", alpha, rank, {"output.weight": V}, {}, a, b)
    la, lb = tensors["output.weight"]
    engine_weight = base_weight.detach() + (alpha / la.shape[0]) * (lb @ la)  # llama.cpp: alpha / rank of the tensor
    terms = ex.head_terms(ex.HeadTerms.from_head(head), priors.numpy())
    with torch.no_grad():
        served = h @ engine_weight.T
    served[:, rating_ids] += torch.from_numpy(terms).float()
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)

    # The same through the JSON a client reads.
    again = ex.head_terms(ex.HeadTerms.from_json(json.loads(json.dumps(ex.HeadTerms.from_head(head).to_json()))),
                          priors.numpy())
    np.testing.assert_allclose(again, terms, rtol=1e-6)


def test_head_terms_refuse_prompts_without_the_stated_numbers():
    terms = ex.HeadTerms(np.zeros(5), np.ones((5, 2)), np.zeros(2))
    with pytest.raises(PersonaTuneError, match="stated numbers"):
        ex.head_terms(terms, None)
    np.testing.assert_allclose(ex.head_terms(ex.HeadTerms.zero(), None), np.zeros((1, 5)))


@pytest.fixture(scope="module")
def served_run(tmp_path_factory):
    run, tiny = build_serving_run(tmp_path_factory.mktemp("serving"))
    export_all(run)
    return run, tiny


_LOCAL: dict = {}


def _local_and_prompts(run, variant, n=8):
    """The local path's expected ratings of n test rows, their prompt tokens, stated numbers and personas."""
    if (run, variant) not in _LOCAL:
        _LOCAL[run, variant] = _rate_locally(run, variant, n)
    return _LOCAL[run, variant]


def _rate_locally(run, variant, n):
    from persona_tune.agent import UserAgent
    from persona_tune.evaluation.head import prior_features

    agent = UserAgent.from_run(run, variant=variant)
    test = pd.read_parquet(run / "ratings_test.parquet").sort_values(["user_id", "item_id"]).groupby("user_id").head(2)
    test = test.head(n)
    local = agent.rate_many(pd.DataFrame({"user_id": test["user_id"], "item": test["item_id"]}))
    rows = agent.prompt_rows(test["user_id"].tolist(), test["item_id"].tolist())
    return (local["expected_rating"].to_numpy(), agent.predictor.encode(rows["parts"]),
            prior_features(list(rows["parts"])), rows["persona"].tolist())


def _expected(logprobs: np.ndarray, entry: dict, priors: np.ndarray) -> float:
    z = logprobs + ex.head_terms(ex.HeadTerms.from_json(entry["head"]), priors[None])[0]
    p = np.exp(z - z.max())
    return float(p @ RATINGS / p.sum())


def _entry(spec: dict, persona: int) -> dict:
    return next(e for e in spec["adapters"] if e["persona"] in (-1, persona))


def test_the_bundle_lists_its_files_and_head_terms(served_run):
    run, _ = served_run
    spec = json.loads((run / "serving" / TRUNK / "serving.json").read_text())
    assert spec["base"]["gguf"] == "serving/base/tiny-f32.gguf" and (run / spec["base"]["gguf"]).is_file()
    (entry,) = spec["adapters"]
    assert entry["model"] == TRUNK and entry["head"]["prior_fill"] == pytest.approx([3.6, 3.5])
    assert entry["head"]["prior"] == "stated" and spec["prompt"]["state_numbers"] is True
    config = json.loads((run / entry["peft"] / "adapter_config.json").read_text())
    assert "lm_head" in config["target_modules"] and config["r"] >= 5
    stock = json.loads((run / "serving" / STOCK / "serving.json").read_text())
    assert [e["model"] for e in stock["adapters"]] == ["persona_0", "persona_1"]
    assert all(e["head"] is None and (run / e["gguf"]).is_file() for e in stock["adapters"])
    # The tiny vocabulary has a byte token that reads "1" like the rating token: the client must know.
    assert stock["rating_texts"] == ["1", "2", "3", "4", "5"] and "1" in stock["rating_texts_shared"]


@pytest.mark.parametrize("variant", [TRUNK, STOCK])
def test_hf_peft_on_the_bundle_gives_the_local_ratings(served_run, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = served_run
    spec = json.loads((run / "serving" / variant / "serving.json").read_text())
    local, prompts, priors, personas = _local_and_prompts(run, variant)
    models = {}
    served = []
    for tokens, prior, persona in zip(prompts, priors, personas):
        entry = _entry(spec, persona)
        if entry["model"] not in models:
            base = AutoModelForCausalLM.from_pretrained(spec["base"]["hf_model_dir"], dtype=torch.float32)
            models[entry["model"]] = PeftModel.from_pretrained(base, str(run / entry["peft"])).eval()
        with torch.no_grad():
            logits = models[entry["model"]](torch.tensor([tokens])).logits[0, -1].float()
        served.append(_expected(torch.log_softmax(logits, -1).numpy()[spec["rating_token_ids"]], entry, prior))
    np.testing.assert_allclose(served, local, atol=1e-4)


def test_exporting_an_untrained_variant_names_the_command(served_run):
    from persona_tune.serving.export import read_serving_spec
    from persona_tune.serving.stage import ServeExportConfig, run as export
    from persona_tune.runfolder import RunFolder

    run, _ = served_run
    with pytest.raises(StageMissingError, match="persona-tune train"):
        export(RunFolder(run), ServeExportConfig(variant="single_min"))
    with pytest.raises(StageMissingError, match="serve-export"):
        read_serving_spec(RunFolder(run), "single_max")
