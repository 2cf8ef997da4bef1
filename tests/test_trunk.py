"""The frozen-trunk pieces (persona_tune.trunk): cache, trees, rating head, paired comparisons."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config, training

from persona_tune.errors import ConfigError
from persona_tune.evaluation import predict
from persona_tune.evaluation.metrics import paired_rmse_diff
from persona_tune.evaluation.predict import answer_tokens, encode_prompt
from persona_tune.prompts import FitToLength, load_prompt_rows
from persona_tune.evaluation.head import HeadedOutput, RatingHead, fit_head_closed_form
from persona_tune.trunk import (
    TrunkCache,
    full_layer_at_answers,
    last_layer_at_answers,
    make_trees,
    rating_loss,
    split_layer,
    top_forward,
    tree_batches,
)
from tests.fixtures_runs import make_persona_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def kit(tiny, tmp_path_factory):
    """(model, tokenizer, prompts, user ids) of a tiny run's test rows, compact prompts with numbers."""
    run = make_persona_run(tmp_path_factory.mktemp("trunk"), n_users=4, k=2)
    cfg = OmegaConf.load("configs/tiny_trunk/persona_0.yaml")
    cfg.model_dir = str(tiny / "model")
    cfg.run_dir = str(run)
    state = config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY]
    torch.manual_seed(0)
    model = config.instantiate(cfg.model)
    model.load_state_dict(state, strict=False)
    model.eval()
    tokenizer = config.instantiate(cfg.tokenizer)
    answer, fit = answer_tokens(tokenizer), FitToLength(tokenizer, 2048)

    def prompts_of(**variant):
        rows = load_prompt_rows(run, split="test", **variant).groupby("user_id").head(4)
        return [encode_prompt(fit, p, answer) for p in rows.parts], rows["user_id"].tolist()

    prompts, users = prompts_of(template="compact", state_numbers=True)
    return model, answer, prompts, users, prompts_of


def test_trees_give_the_full_models_logits(kit, tmp_path):
    model, answer, prompts, users, _ = kit
    cache = TrunkCache(tmp_path, {"model": "tiny"}, "fp32")
    split = split_layer(model, 1)
    cache.build(model, split, prompts, users, progress=False)
    steps = tree_batches(users, rows_per_tree=3, trees_per_step=2, seed=0, shuffle=False)
    with torch.no_grad():
        for step in steps:
            trees = make_trees([cache.tree(users[t[0]], [prompts[i] for i in t]) for t in step])
            logits, _ = top_forward(model, split, trees)
            for k, r in enumerate(r for t in step for r in t):
                full = model(torch.tensor([prompts[r]]))[0, -1]
                torch.testing.assert_close(logits[k], full, atol=1e-5, rtol=1e-5)


def test_last_layer_at_answers_equals_the_full_layer_there_values_and_gradients(kit, tmp_path):
    """The last layer run at the answer positions only (keys and values over every position) gives the
    full layer's output there, and the same gradients to its LoRA weights."""
    model, answer, prompts, users, _ = kit
    cache = TrunkCache(tmp_path, {"model": "tiny"}, "fp32")
    split = split_layer(model, 1)
    cache.build(model, split, prompts, users, progress=False)
    step = tree_batches(users, rows_per_tree=3, trees_per_step=3, seed=0, shuffle=False)[0]
    trees = make_trees([cache.tree(users[t[0]], [prompts[i] for i in t]) for t in step])
    assert len({b for b, _ in trees.answers}) > 1 and len(trees.answers) > len(step)  # several trees, rows
    last = model.layers[-1]
    assert type(last).__name__ == "TransformerSelfAttentionLayer" and last.attn.kv_cache is None  # the fast path
    lora = [p for n, p in last.named_parameters() if "lora" in n]
    assert lora, "the tiny model's last layer has LoRA weights"
    torch.manual_seed(1)
    with torch.no_grad():
        for p in lora:
            p.normal_(0, 0.05)
    h = trees.states
    full = full_layer_at_answers(last, h, trees)
    full_grads = torch.autograd.grad(full.square().sum(), lora)
    fast = last_layer_at_answers(last, h, trees)
    fast_grads = torch.autograd.grad(fast.square().sum(), lora)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cache_reuses_rows_recomputes_changed_ones_and_resumes(kit, tmp_path, monkeypatch):
    model, answer, prompts, users, _ = kit
    split = split_layer(model, 1)
    first = TrunkCache(tmp_path, {"model": "tiny"}, "fp32")
    assert first.build(model, split, prompts, users, progress=False)["rows_computed"] == len(prompts)
    assert first.size_bytes() > 0
    again = TrunkCache(tmp_path, {"model": "tiny"}, "fp32")
    assert again.build(model, split, prompts, users, progress=False)["rows_computed"] == 0
    changed = [list(p) for p in prompts]
    changed[0][-2] = (changed[0][-2] + 1) % 100  # another prompt for the same row: another row
    assert again.missing(changed, users) == 1
    assert again.build(model, split, changed, users, progress=False)["rows_computed"] >= 1
    # Another model (or split layer, or storage dtype) is another folder: nothing is reused.
    other = TrunkCache(tmp_path, {"model": "tiny", "weights": ["other"]}, "fp32")
    assert other.dir != first.dir and other.missing(prompts, users) == len(prompts)
    # A build stopped part-way keeps the users it finished and computes only the rest afterwards.
    calls = {"n": 0}
    real = predict.run_suffixes

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr("persona_tune.trunk.run_suffixes", failing)
    stopped = TrunkCache(tmp_path / "stopped", {"model": "tiny"}, "fp32")
    with pytest.raises(KeyboardInterrupt):
        stopped.build(model, split, prompts, users, progress=False)
    monkeypatch.setattr("persona_tune.trunk.run_suffixes", real)
    resumed = TrunkCache(tmp_path / "stopped", {"model": "tiny"}, "fp32")
    left = resumed.missing(prompts, users)
    assert 0 < left < len(prompts) and not list(resumed.dir.glob(".*.pt"))  # no half-written user file
    assert resumed.build(model, split, prompts, users, progress=False)["rows_computed"] == left
    for p, u in zip(prompts, users):
        a, b = resumed.tree(u, [p]), first.tree(u, [p])
        torch.testing.assert_close(torch.cat([a[0], a[1][0]]), torch.cat([b[0], b[1][0]]))
    with pytest.raises(ConfigError, match="lacks rows"):
        TrunkCache(tmp_path / "empty", {"model": "tiny"}).tree(users[0], [prompts[0]])
    # A user file of the first format (one prefix group at the top level) still reads.
    path = resumed._path(users[0])
    torch.save(torch.load(path, weights_only=True)["groups"][0], path)
    old = TrunkCache(tmp_path / "stopped", {"model": "tiny"}, "fp32")
    assert old.missing(prompts, users) == 0
    torch.testing.assert_close(old.tree(users[0], [prompts[0]])[1][0], resumed.tree(users[0], [prompts[0]])[1][0])


def test_prompt_variants_coexist_in_the_cache(kit, tmp_path):
    """Rows of another memory mode and template get prefix groups of their own: adding them computes
    only them, keeps the cached rows, and a tree may mix rows of several groups."""
    model, answer, prompts, users, prompts_of = kit
    split = split_layer(model, 1)
    cache = TrunkCache(tmp_path, {"model": "tiny"}, "fp32")
    cache.build(model, split, prompts, users, progress=False)
    for variant in ({"memory": "ms", "template": "compact", "state_numbers": True}, {"template": "paper"}):
        more, more_users = prompts_of(**variant)
        assert more_users == users and cache.missing(more, users) == len(more)
        assert cache.build(model, split, more, users, progress=False)["rows_computed"] == len(more)
        assert cache.missing(prompts, users) == 0 and cache.missing(more, users) == 0
    reread = TrunkCache(tmp_path, {"model": "tiny"}, "fp32")
    assert len(reread._shard(users[0])["groups"]) >= 2
    paper, _ = prompts_of(template="paper")
    with torch.no_grad():
        for u in sorted(set(users)):
            mixed = [p for p, v in zip(prompts, users) if v == u][:2] + [p for p, v in zip(paper, users) if v == u][:2]
            logits, _ = top_forward(model, split, make_trees([reread.tree(u, mixed)]))
            for k, p in enumerate(mixed):
                torch.testing.assert_close(logits[k], model(torch.tensor([p]))[0, -1], atol=1e-5, rtol=1e-5)


def test_tree_batches_cover_every_row_once_per_user_tree():
    users = [1] * 7 + [2] * 3 + [3] * 5
    steps = tree_batches(users, rows_per_tree=3, trees_per_step=2, seed=0, epoch=1)
    trees = [t for s in steps for t in s]
    assert sorted(r for t in trees for r in t) == list(range(len(users)))
    assert all(len({users[r] for r in t}) == 1 and len(t) <= 3 for t in trees)
    assert all(len(s) <= 2 for s in steps)
    assert steps == tree_batches(users, 3, 2, seed=0, epoch=1)
    assert steps != tree_batches(users, 3, 2, seed=0, epoch=2)


def test_closed_form_head_reproduces_the_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    n, dim = 600, 6
    features = rng.normal(size=(n, dim)).astype(np.float32)
    ratings = np.clip(np.round(3 + 1.2 * features[:, 0] + rng.normal(scale=0.5, size=n)), 1, 5).astype(int)
    users = np.repeat(np.arange(30), n // 30)
    output_weight = torch.randn(20, dim)
    head = RatingHead(dim, [3, 4, 5, 6, 7])
    base = np.zeros((n, 6))
    base[:, :5] = features @ output_weight[3:8].numpy().T
    base[:, 5] = 2.0  # log of the other tokens' mass
    info = fit_head_closed_form(head, output_weight, features, ratings, base, users, l2_grid=(0.1,))
    assert info["l2"] == 0.1 and info["validation_rmse"]
    x = torch.from_numpy(features)
    logits = torch.zeros(n, 20)
    logits[:, 3:8] = x @ output_weight[3:8].T
    with torch.no_grad():
        out = head(x, logits)
    probs = torch.softmax(out[:, 3:8].double(), dim=-1).numpy()
    # The same fit as the head's (float64 standardized features, the same solver settings): only the
    # head's float32 arithmetic differs.
    x64 = StandardScaler().fit_transform(features.astype(np.float64))
    reference = LogisticRegression(C=10.0, max_iter=500).fit(x64, ratings)
    np.testing.assert_allclose(probs, reference.predict_proba(x64), atol=1e-4)
    mass = np.exp(np.logaddexp.reduce(out[:, 3:8].double().numpy(), axis=1))
    mass /= mass + np.exp(2.0)
    assert np.median(mass) == pytest.approx(0.9, abs=1e-3)


def test_rating_loss_and_headed_output():
    logits = torch.zeros(2, 8)
    logits[0, 5] = 30.0  # the token of "3" for row 0
    ids = torch.tensor([3, 4, 5, 6, 7])
    ratings = torch.tensor([3, 5])
    mse = rating_loss(logits, ratings, ids, "mse")
    assert mse.item() == pytest.approx((0.0 + (5 - 3.0) ** 2) / 2, abs=1e-4)  # row 1: uniform, expected 3
    ce = rating_loss(logits, ratings, ids, "ce")
    both = rating_loss(logits, ratings, ids, "ce+mse")
    assert both.item() == pytest.approx(ce.item() + mse.item())
    head = RatingHead(4, ids.tolist())
    with torch.no_grad():
        head.bias.fill_(1.0)
    wrapped = HeadedOutput(torch.nn.Linear(4, 8, bias=False), head)
    h = torch.randn(2, 3, 4)
    plain = wrapped.inner(h)
    assert torch.allclose(wrapped(h)[..., ids], plain[..., ids] + 1.0) and torch.equal(wrapped(h)[..., :3], plain[..., :3])
    wrapped.enabled = False
    assert torch.equal(wrapped(h), plain)


def test_paired_rmse_diff_by_hand():
    df = pd.DataFrame({"user_id": [1, 1, 2, 2], "rating": [4, 2, 5, 3],
                       "a": [4.0, 3.0, 5.0, 3.0], "b": [3.0, 3.0, 4.0, 4.0]})
    out = paired_rmse_diff(df, "a", "b", n_boot=500, seed=0)
    assert out["diff"] == pytest.approx(np.sqrt(1 / 4) - np.sqrt(4 / 4)) and out["n"] == 4
    assert out["lo"] <= out["diff"] <= out["hi"] < 0
    same = paired_rmse_diff(df, "a", "a", n_boot=200)
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    gap = paired_rmse_diff(df.assign(b=np.nan), "a", "b")
    assert gap["n"] == 0 and np.isnan(gap["diff"])


def test_residual_over_bias_cross_fits_over_users():
    from sklearn.linear_model import LinearRegression

    from persona_tune.evaluation.metrics import residual_over_bias

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(10), 6)
    bias = rng.uniform(2.5, 4.0, len(users))
    residual = rng.normal(0, 0.7, len(users))
    frame = pd.DataFrame({"user_id": users, "bias": bias, "rating": np.clip(bias + residual, 1, 5)})
    exact = (frame["rating"] - frame["bias"]).to_numpy()[:, None]  # a feature that is the residual: RMSE 0
    out = residual_over_bias(frame, exact, LinearRegression, n_boot=200)
    bias_rmse = float(np.sqrt(np.mean((frame["rating"] - frame["bias"]) ** 2)))
    assert out["diff"] == pytest.approx(-bias_rmse) and out["n"] == len(frame)
    noise = rng.normal(size=(len(frame), 1))  # nothing to learn: no better than the bias baseline
    assert residual_over_bias(frame, noise, LinearRegression, n_boot=200)["diff"] > -0.02


def test_a_head_that_reads_the_stated_numbers():
    from persona_tune.prompts import PromptParts
    from persona_tune.evaluation.head import prior_features

    parts = [PromptParts(item="a", item_avg=3.5, user_offset=-0.5), PromptParts(item="b")]
    np.testing.assert_array_equal(prior_features(parts)[0], [3.0, 3.5])
    assert np.isnan(prior_features(parts)[1]).all()
    rng = np.random.default_rng(1)
    n, dim = 800, 8
    features = rng.normal(size=(n, dim)).astype(np.float32)  # noise: the rating follows the numbers only
    prior = rng.uniform(1.5, 4.5, size=n)
    priors = np.c_[prior, prior + rng.normal(scale=0.1, size=n)]
    ratings = np.clip(np.round(prior + rng.normal(scale=0.6, size=n)), 1, 5).astype(int)
    priors[:5] = np.nan  # unstated numbers take the training mean
    head = RatingHead(dim, [0, 1, 2, 3, 4], prior="stated")
    info = fit_head_closed_form(head, torch.zeros(5, dim), features, ratings, np.zeros((n, 6)),
                                np.repeat(np.arange(40), n // 40), l2_grid=(1.0, 100.0), priors=priors)
    assert head.prior_weight.abs().sum() > 0 and info["train_rmse"] < 0.8
    np.testing.assert_allclose(head.prior_fill.numpy(), np.nanmean(priors, axis=0))
    with torch.no_grad():
        out = head(torch.from_numpy(features), torch.zeros(n, 5), torch.from_numpy(priors))
    expected = torch.softmax(out.double(), dim=-1).numpy() @ np.arange(1, 6)
    assert np.corrcoef(expected[5:], prior[5:])[0, 1] > 0.9
    with pytest.raises(ConfigError, match="stated numbers"):
        head(torch.from_numpy(features), torch.zeros(n, 5))


def test_a_head_that_reads_the_collab_numbers(tmp_path):
    """head.prior: collab reads (bias expectation, item-kNN prediction) from the prompt parts; fitted in
    closed form on rows whose rating follows the kNN prediction, it beats the bias expectation."""
    from persona_tune.prompts import PromptParts
    from persona_tune.evaluation.head import load_rating_head, prior_features

    parts = [PromptParts(item="a", collab_expected=3.2, collab_residual=0.5, collab_weight=1.0), PromptParts(item="b")]
    np.testing.assert_allclose(prior_features(parts, "collab")[0], [3.2, 3.7, 3.45])
    assert np.isnan(prior_features(parts, "collab")[1]).all()
    rng = np.random.default_rng(2)
    n, dim = 1000, 8
    bias = rng.uniform(2.0, 4.5, size=n)
    knn = bias + rng.normal(scale=0.7, size=n)  # what the neighbours add beyond the bias baseline
    ratings = np.clip(np.round(knn + rng.normal(scale=0.5, size=n)), 1, 5).astype(int)
    priors = prior_features([PromptParts(item="x", collab_expected=b, collab_residual=k - b, collab_weight=2.0)
                             for b, k in zip(bias, knn)], "collab")
    features = rng.normal(size=(n, dim)).astype(np.float32)
    head = RatingHead(dim, [0, 1, 2, 3, 4], prior="collab")
    fit_head_closed_form(head, torch.zeros(5, dim), features, ratings, np.zeros((n, 6)),
                         np.repeat(np.arange(50), n // 50), l2_grid=(1.0, 100.0), priors=priors)
    with torch.no_grad():
        out = head(torch.from_numpy(features), torch.zeros(n, 5), torch.from_numpy(priors))
    expected = torch.softmax(out.double(), dim=-1).numpy() @ np.arange(1, 6)
    rmse = lambda p: float(np.sqrt(np.mean((p - ratings) ** 2)))  # noqa: E731
    assert rmse(expected) < rmse(bias) - 0.1
    # Saved and loaded, it still reads the collab numbers.
    torch.save({**head.state_dict(), "rating_ids": head.rating_ids}, tmp_path / "head.pt")
    assert load_rating_head(tmp_path / "head.pt", dim).prior == "collab"


def test_swap_output_handles_tied_embeddings():
    from torchtune.models.llama3_2 import llama3_2

    from persona_tune.evaluation.head import swap_output

    torch.manual_seed(0)
    model = llama3_2(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=16, max_seq_len=32,
                     intermediate_dim=32, tie_word_embeddings=True)  # output is a TiedLinear, not a Module
    tied = model.output
    x = torch.randint(0, 64, (1, 5))
    before = model(x)
    head = RatingHead(16, [1, 2, 3, 4, 5])
    with torch.no_grad():
        head.bias.fill_(2.0)
    assert swap_output(model, HeadedOutput(tied, head)) is tied
    assert torch.allclose(model(x)[..., 1:6], before[..., 1:6] + 2.0, atol=1e-5)
    swap_output(model, tied)
    assert model.output is tied and torch.allclose(model(x), before)


def test_user_folds_keep_each_user_in_one_fold():
    from persona_tune.evaluation.head import user_folds

    users = np.repeat([7, 3, 9, 1, 5, 2, 8], [3, 1, 4, 2, 2, 5, 1])
    fold = user_folds(users, 5, seed=0)
    assert all(len(set(fold[users == u])) == 1 for u in np.unique(users))
    assert sorted(np.bincount([fold[users == u][0] for u in np.unique(users)])) == [1, 1, 1, 2, 2]
    assert set(user_folds(users[:4], 5)) == {0, 1}  # two users: two folds
    np.testing.assert_array_equal(fold, user_folds(users, 5, seed=0))


def _collab_rows(rng, n: int, dim: int, signal: float = 0.0):
    """Rows whose rating follows the kNN number, plus ``dim`` features: noise, or with ``signal`` one
    feature that carries a part of the rating the numbers do not."""
    bias = rng.uniform(2.0, 4.5, size=n)
    knn = bias + rng.normal(scale=0.5, size=n)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    ratings = np.clip(np.round(knn + signal * features[:, 0] + rng.normal(scale=0.8, size=n)), 1, 5).astype(int)
    return features, np.c_[bias, knn, (bias + knn) / 2], ratings


def _held_out_rmse(dim, features, priors, ratings, users, train, **grids) -> tuple[float, dict]:
    head = RatingHead(dim, [0, 1, 2, 3, 4], prior="collab")
    m = train
    info = fit_head_closed_form(head, torch.zeros(5, dim), features[m], ratings[m], np.zeros((m.sum(), 6)),
                                users[m], priors=priors[m], **grids)
    with torch.no_grad():
        out = head(torch.from_numpy(features[~m]), torch.zeros((~m).sum(), 5), torch.from_numpy(priors[~m]))
    expected = torch.softmax(out.double(), dim=-1).numpy() @ np.arange(1, 6)
    return float(np.sqrt(np.mean((expected - ratings[~m]) ** 2))), info


def test_noise_features_cannot_make_the_head_worse_than_the_numbers_alone():
    """Pure-noise features beside informative numbers: the cross-validated pair of L2 weights (features,
    numbers) scores the held-out users no worse than the numbers-only read-out, which a single weak
    feature penalty (the old diagonal grid's choice at these sizes) does not."""
    rng = np.random.default_rng(3)
    n, dim = 1200, 150
    users = np.repeat(np.arange(60), n // 60)
    features, priors, ratings = _collab_rows(rng, n, dim)
    train = users < 40  # 20 users held out of the fit entirely
    grids = {"l2_grid": (1.0, 100.0), "prior_l2_grid": (0.01, 1.0)}
    chosen, info = _held_out_rmse(dim, features, priors, ratings, users, train, **grids)
    numbers_only, _ = _held_out_rmse(0, features[:, :0], priors, ratings, users, train, **grids)
    # One fold: no choice, the middle of each grid (here the weak feature penalty 1 is kept).
    weak, fixed = _held_out_rmse(dim, features, priors, ratings, users, train, l2_grid=(1.0,), prior_l2_grid=(0.01,),
                                 folds=1)
    assert fixed["folds"] == 1 and fixed["l2"] == 1.0 and not fixed["validation_rmse"]
    assert info["folds"] == 5 and len(info["validation_rmse"]) == 3 * 2  # (1, 100, off) x (0.01, 1)
    assert {(s["l2"], s["prior_l2"]) for s in info["validation_rmse"]} == {
        (lf, lp) for lf in (1.0, 100.0, None) for lp in (0.01, 1.0)}
    best = min(info["validation_rmse"], key=lambda s: s["rmse"])
    assert (info["l2"], info["prior_l2"]) == (best["l2"], best["prior_l2"])
    assert chosen <= numbers_only + 0.005
    assert weak > numbers_only + 0.02  # the noise the choice avoids is real


def test_the_head_keeps_features_that_carry_signal():
    rng = np.random.default_rng(4)
    n, dim = 1200, 20
    users = np.repeat(np.arange(60), n // 60)
    features, priors, ratings = _collab_rows(rng, n, dim, signal=0.8)
    train = users < 40
    grids = {"l2_grid": (1.0, 100.0), "prior_l2_grid": (0.01, 1.0)}
    chosen, info = _held_out_rmse(dim, features, priors, ratings, users, train, **grids)
    numbers_only, _ = _held_out_rmse(0, features[:, :0], priors, ratings, users, train, **grids)
    assert info["l2"] is not None and chosen < numbers_only - 0.05
