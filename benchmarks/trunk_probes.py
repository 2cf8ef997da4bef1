"""Linear probes of the frozen SmolLM2 features a frozen-trunk variant trains on (docs/results.md).

For the training and test rows of one trunk config (its cache must exist: run the variant first),
fits on the training rows and scores on the test rows:
- the stated numbers alone (item average + user offset, as the prompt states them);
- ridge and multinomial logistic regression of the rating on the cached split-layer state at the
  answer position, and on the final normed state (the rating head's input), over a range of L2 weights;
- how well a ridge recovers the stated item average from those states (Pearson r);
- whether the LM knows anything the user+item bias baseline does not: a ridge of the bias
  baseline's residual on the test rows' final states, cross-fitted over users (5 folds, L2 chosen
  inside each fold), scored against the bias baseline with the paired bootstrap over users.

    python benchmarks/trunk_probes.py runs/ml1m/configs/trunk-n1000-single_max-ms.yaml
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent


def recipe_module():
    spec = importlib.util.spec_from_file_location("lora_frozen_trunk", REPO / "recipes" / "lora_frozen_trunk.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a trunk config whose cache holds its train and test rows")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler

    from persona_tune.evaluation.head import prior_features

    cfg = OmegaConf.load(args.config)
    cfg.progress, cfg.output_dir, cfg.head.init = False, str(Path("/tmp") / "trunk_probes"), "none"
    recipe = recipe_module().FrozenTrunkRecipe(cfg)
    recipe.setup(cfg)
    train, test = recipe.rows("train"), recipe.rows("test")
    ytr, yte = train["rating"].to_numpy(), test["rating"].to_numpy()

    def split_states(rows):
        return np.stack([recipe.cache.tree(u, [p])[1][0][-1].float().numpy() for u, p in zip(rows.user_id, rows.prompt)])

    def score(pred):
        pred = np.clip(pred, 1, 5)
        return {"rmse": round(float(np.sqrt(np.mean((pred - yte) ** 2))), 4),
                "r": round(float(np.corrcoef(pred, yte)[0, 1]), 3), "sd": round(float(pred.std()), 3)}

    ptr, pte = prior_features(list(train.parts)), prior_features(list(test.parts))
    fill = np.nanmean(ptr, axis=0)
    ptr, pte = np.where(np.isnan(ptr), fill, ptr), np.where(np.isnan(pte), fill, pte)
    results = {"train_rows": len(train), "test_rows": len(test), "stated_numbers_alone": score(pte[:, 0]),
               "split_layer": recipe.split}
    features = {f"layer {recipe.split} state": (split_states(train), split_states(test)),
                "final normed state": (recipe.read_out(train)[0], recipe.read_out(test)[0])}
    for name, (a, b) in features.items():
        scaler = StandardScaler().fit(a)
        xa, xb = scaler.transform(a), scaler.transform(b)
        block = {"ridge": {}, "logistic": {}}
        for l2 in (10, 100, 1000, 10000):
            block["ridge"][l2] = score(Ridge(alpha=l2).fit(xa, ytr).predict(xb))
            lr = LogisticRegression(C=1 / l2, max_iter=500).fit(xa, ytr)
            block["logistic"][l2] = score(lr.predict_proba(xb) @ lr.classes_)
        item_avg = Ridge(alpha=100).fit(xa, ptr[:, 1]).predict(xb)
        block["item_average_recovered_r"] = round(float(np.corrcoef(item_avg, pte[:, 1])[0, 1]), 3)
        results[name] = block
        print(name, json.dumps(block), flush=True)
    results["residual_over_bias"] = residual_over_bias(recipe, test, recipe.read_out(test)[0], pte)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def residual_over_bias(recipe, test, states: np.ndarray, priors: np.ndarray) -> dict:
    """Bias baseline + a cross-fitted ridge of its residual, against the bias baseline alone."""
    import pandas as pd
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from persona_tune.evaluation import metrics

    baselines = pd.read_parquet(Path(recipe.cfg.run_dir) / "eval" / "baselines" / "predictions.parquet")
    frame = test[["user_id", "item_id", "rating"]].reset_index(drop=True).merge(
        baselines[["user_id", "item_id", "bias"]], on=["user_id", "item_id"], how="left", validate="one_to_one")
    out = {}
    for name, x in (("stated numbers", priors), ("final normed state", states),
                    ("final normed state + stated numbers", np.hstack([states, priors]))):
        paired = metrics.residual_over_bias(
            frame, x, lambda: make_pipeline(StandardScaler(), RidgeCV(alphas=(10, 100, 1000, 10000, 100000))))
        out[name] = {k: round(v, 4) for k, v in paired.items() if k != "n"} | {"rows": paired["n"]}
        print("residual over bias,", name, json.dumps(out[name]), flush=True)
    return out

if __name__ == "__main__":
    sys.exit(main())
