# persona-tune: the evaluation recipe, in the shape of torchtune's recipes.
"""
Evaluate persona user agents on a run folder's test rows.

    tune run persona_eval --config tiny_persona/eval run_dir=RUN
    python recipes/persona_eval.py --config configs/tiny_persona/eval.yaml run_dir=RUN   # from the repo root

(``tune run recipes/persona_eval.py`` does not work: torchtune's wheel installs a top-level ``recipes``
package that shadows this folder; the start-up hook registers the name ``persona_eval`` instead.)

For each persona (one adapter each when ``adapter_dir`` holds ``{persona}``, else one adapter or none
for every persona's users): load the base model through the config's checkpointer and model builder,
put the persona's adapter on it (merged or not), build the test rows' prompts exactly as training
builds them, and predict in

- ``scoring`` mode: one forward pass; the probabilities of the rating tokens "1".."5" at the answer
  position; prediction = their expectation (argmax kept too). URR is 0 by construction.
- ``paper`` mode: generate up to ``generation.max_new_tokens`` tokens (temperature, top-k/top-p) and
  parse the first rating with the regex parser; a row without one counts toward URR.

Rows are packed per user so the shared prompt prefix runs once per pass (persona_tune.evaluation.predict).
Each persona's predictions are written atomically to ``output_dir/parts/``; a persona whose part
matches the config's fingerprint is skipped, so a stopped run resumes. At the end
``output_dir/predictions.parquet`` and ``output_dir/metrics.json`` hold every persona.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from persona_tune.errors import PersonaTuneError
from persona_tune.evaluation.baselines import global_mean
from persona_tune.evaluation.loading import ModelLoader, adapter_path
from persona_tune.evaluation.metrics import grouped_metrics, metrics_info, train_rows_per_persona, variant_metrics
from persona_tune.evaluation.predict import GenerationConfig, RatingPredictor, predict_rows
from persona_tune.names import check_modes
from persona_tune.prompts import load_prompt_rows
from persona_tune.runfolder import (
    AGENT_INPUTS,
    ASSIGNMENTS,
    ITEMS,
    METRICS,
    PREDICTIONS,
    RATINGS_TEST,
    RunFolder,
    atomic_write_json,
    file_sha256,
    read_or_discard,
    write_predictions,
)

REMOTE_REQUESTS = "requests.sqlite"  # backend openai: the served agent's answers, so a stopped run resumes

log = utils.get_logger("INFO")


class PersonaEvalRecipe:
    """Predict, per persona, the test ratings of a run folder; write predictions and metrics."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        training.set_seed(seed=cfg.seed)
        self.run = RunFolder(cfg.run_dir)
        self.output_dir = Path(cfg.output_dir)
        self.modes = check_modes(cfg.mode)
        self.generation = GenerationConfig(**OmegaConf.to_container(cfg.generation, resolve=True))
        self.cfg = cfg

    def setup(self, cfg: DictConfig) -> None:
        self.run.require(RATINGS_TEST, ITEMS)
        if cfg.get("backend", "local") != "local":  # a served agent (persona_tune.serving.remote)
            from persona_tune.serving.remote import RemoteOptions, remote_rater

            options = RemoteOptions(backend=cfg.backend, **OmegaConf.to_container(cfg.remote, resolve=True))
            self.loader = None
            self.predictor = remote_rater(cfg, options, cache=self.output_dir / REMOTE_REQUESTS)
            return
        self.loader = ModelLoader(cfg, self._device, self._dtype)
        self.predictor = RatingPredictor(
            self.loader.model, self.loader.tokenizer, device=self._device,
            max_seq_len=cfg.get("max_seq_len"), **OmegaConf.to_container(cfg.batching, resolve=True),
        )

    def personas(self) -> list[int]:
        """The personas to evaluate: cfg.personas, else all of personas/assignments.parquet (-1 = no personas)."""
        if self.cfg.get("personas") is not None:
            return [int(p) for p in self.cfg.personas]
        assignments = self.run.read_assignments(columns=["persona"], missing_ok=True)
        if assignments is None:
            if "{persona}" in str(self.cfg.adapter_dir or ""):
                self.run.require(ASSIGNMENTS)
            return [-1]
        return sorted(assignments["persona"].unique().tolist())

    def fingerprint(self, persona: int, adapter: Path | None) -> str:
        """What a persona's predictions depend on; a part with another fingerprint is recomputed."""
        keys = ("memory", "split", "mode", "max_rows", "merge_adapter", "max_seq_len", "seed", "generation",
                "model", "dtype", "prompt_template", "state_numbers", "collab_memories", "backend")
        spec = {k: OmegaConf.to_container(self.cfg, resolve=True).get(k) for k in keys}
        if self.loader is None:  # served: the server and the bundle it serves, not how the answers arrive
            from persona_tune.serving.remote import TRANSPORT_FIELDS

            remote = OmegaConf.to_container(self.cfg.remote, resolve=True)
            spec["remote"] = {k: v for k, v in remote.items() if k not in TRANSPORT_FIELDS}
            spec["bundle"] = self.predictor.spec["adapters"]
        spec["adapter"] = None if adapter is None else [str(adapter), file_sha256(adapter)]
        if getattr(self, "_inputs", None) is None:  # the data every persona's prompts come from, hashed once
            self._inputs = self.run.checksums(*AGENT_INPUTS)
        spec["inputs"] = self._inputs
        spec["persona"] = persona
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()

    def evaluate_persona(self, persona: int) -> pd.DataFrame:
        adapter = adapter_path(self.cfg.adapter_dir, persona, self.cfg.get("adapter_epoch"))
        part = self.output_dir / "parts" / f"persona_{persona}.parquet"
        stamp = part.with_suffix(".json")
        fingerprint = self.fingerprint(persona, adapter)
        stamped = read_or_discard(stamp, lambda p: json.loads(p.read_text())["fingerprint"], "part stamp")
        done = read_or_discard(part, pd.read_parquet, "predictions part") if stamped == fingerprint else None
        if done is not None:  # a corrupt part (or stamp) is named, removed and recomputed
            log.info(f"persona {persona}: predictions exist, skipped")
            return done

        rows = load_prompt_rows(
            self.cfg.run_dir, split=self.cfg.split, memory=self.cfg.memory,
            persona=None if persona < 0 else persona, subsample=self.cfg.get("max_rows"), seed=self.cfg.seed,
            template=self.cfg.get("prompt_template", "paper"), state_numbers=bool(self.cfg.get("state_numbers", False)),
            collab_memories=int(self.cfg.get("collab_memories", 0) or 0),
        )
        if self.loader is None:
            self.predictor.use(persona)
        else:
            self.loader.load(adapter, merge=self.cfg.merge_adapter)
        start, stats_before = time.perf_counter(), dict(self.predictor.stats.as_dict())
        predictions = predict_rows(self.predictor, rows, self.modes, self.generation)
        seconds = time.perf_counter() - start
        stats = {k: v - stats_before.get(k, 0) for k, v in self.predictor.stats.as_dict().items()
                 if k in ("rows", "forward_passes", "tokens_processed", "prompt_tokens", "floor_tokens")}
        predictions = write_predictions(predictions, part)
        atomic_write_json(stamp, {"fingerprint": fingerprint, "adapter": adapter, "seconds": seconds,
                                  "rows": len(rows), "rows_per_s": len(rows) / seconds, **stats})
        log.info(f"persona {persona}: {len(rows)} rows x {len(self.modes)} mode(s) in {seconds:.1f}s "
                 f"(adapter: {adapter or 'none'})")
        return predictions

    def evaluate(self) -> None:
        personas = self.personas()
        parts = [self.evaluate_persona(p) for p in personas]
        predictions = pd.concat(parts, ignore_index=True)
        write_predictions(predictions, self.output_dir / PREDICTIONS)
        atomic_write_json(self.output_dir / METRICS, self.metrics(predictions, personas))
        self.run.record_stage(f"eval/{self.cfg.variant}", OmegaConf.to_container(self.cfg, resolve=True))
        for mode, block in predictions.groupby("mode"):
            m = grouped_metrics(block, "prediction", n_boot=0)["overall"]
            log.info(f"{self.cfg.variant} [{mode}] RMSE {m['rmse']:.3f}  MAE {m['mae']:.3f}  URR {m['urr']:.2%}  n={m['n']}")

    def metrics(self, predictions: pd.DataFrame, personas: list[int]) -> dict:
        m = self.cfg.metrics
        fill_value = m.get("fill_value")
        if fill_value == "global_mean":  # the mean of every non-test rating (as the global-mean baseline)
            fill_value = global_mean(self.run.read_items(columns=["hist_avg", "hist_count"]))
        profiles = self.run.read_profiles(missing_ok=True)
        info = metrics_info(self.cfg, self.cfg.variant, self.cfg.adapter_dir,
                            "{persona}" in str(self.cfg.adapter_dir or ""), backend=self.cfg.get("backend", "local"),
                            timing={str(p): json.loads((self.output_dir / "parts" / f"persona_{p}.json").read_text())
                                    for p in personas})
        return variant_metrics(predictions, info, profiles=profiles,
                               train_rows_per_persona=train_rows_per_persona(self.run, personas),
                               unparsable=m.unparsable, fill_value=None if fill_value is None else float(fill_value),
                               n_boot=m.n_boot, seed=self.cfg.seed)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="PersonaEvalRecipe", cfg=cfg)
    recipe = PersonaEvalRecipe(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.evaluate()
    except PersonaTuneError as e:
        log.error(f"persona_eval: {e}")
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(recipe_main())
