# persona-tune: the frozen-trunk LoRA recipe, in the shape of torchtune's recipes.
"""
Train one user-agent adapter on the top layers of a model over cached lower-layer outputs, then
evaluate it on the run's test rows from the same kind of cache.

    tune run lora_frozen_trunk --config smollm2_trunk/persona_0 run_dir=RUN
    persona-tune grid --run RUN --family smollm2 --path trunk          # every cell of the paper's matrix

Steps (persona_tune.trunk has the pieces and explains the design):
1. setup: the base model through the config's checkpointer and LoRA builder; the split at the top
   ``adapted_layers`` layers; LoRA of those layers and the rating head are the only trainable weights.
2. rows: the training rows (``subsample`` rows drawn over all users with ``seed``, then this
   variant's ``persona``; memory and prompt template as persona_tune.datasets builds them) and the
   test rows (``eval.max_rows`` drawn over all users with ``eval.seed``, then the persona's users):
   variants of a run with the same numbers see the same rows.
3. trunk cache: the lower layers run once per prompt prefix and row, into ``trunk_cache.dir``
   (shared by every variant of the run; rows already there are not recomputed).
4. head: ``head.init: closed_form`` fits the rating head on the frozen features of the training rows.
5. train: ``epochs`` over the training rows; a step is ``trees_per_step`` trees of up to
   ``rows_per_tree`` rows of one user, whose shared prefix runs once (persona_tune.trunk.Trees);
   loss = ``objective``.
   The state (trainable weights, optimizer, scheduler, position) is saved every
   ``save_every_n_steps`` and at each epoch's end; a stopped run resumes from it.
6. save: ``epoch_N/adapter_model.pt`` (torchtune's LoRA state, every layer; the frozen layers' LoRA
   stays zero) and ``epoch_N/rating_head.pt``.
7. evaluate: scoring mode (the five rating tokens' probabilities at the answer position) on the
   test rows from the cache, and the paper's mode (generate, then the regex) on ``eval.paper_rows``
   of them through the whole model; ``predictions.parquet`` in ``output_dir`` with persona_eval's columns.
"""

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_params
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup

from persona_tune.prompts import FitToLength
from persona_tune.errors import PersonaTuneError, check_choice
from persona_tune.evaluation.predict import (
    GenerationConfig,
    RatingPredictor,
    answer_tokens,
    encode_prompt,
    prediction_block,
    predict_rows,
    scored_frame,
)
from persona_tune.prompts import load_prompt_rows, subsample_per_user
from persona_tune.runfolder import ADAPTER_FILE, HEAD_FILE, ITEMS, PREDICTIONS, RATINGS_TEST, RATINGS_TRAIN
from persona_tune.runfolder import TORCHTUNE_CONFIG, TRUNK_SUMMARY
from persona_tune.runfolder import PREDICTIONS_LAYOUT, RunFolder, atomic_path, atomic_write_json, file_sha256
from persona_tune.runfolder import load_torch, read_or_discard, write_predictions
from persona_tune.evaluation.head import (
    FOLDS,
    HEAD_INITS,
    HEAD_PRIORS,
    PRIOR_L2_GRID,
    HeadedOutput,
    RatingHead,
    fit_head_closed_form,
    prior_features,
    swap_output,
)
from persona_tune.trunk import (
    OBJECTIVES,
    TrunkCache,
    features_and_logits,
    make_trees,
    rating_loss,
    split_layer,
    top_forward,
    tree_batches,
)

log = utils.get_logger("INFO")

STATE_FILE = "recipe_state.pt"
RUNTIME_KEYS = ("num_threads", "progress", "output_dir", "metric_logger", "save_every_n_steps")


class FrozenTrunkRecipe:
    """Train the top layers' LoRA and a rating head on cached trunk outputs; evaluate on test rows."""

    def __init__(self, cfg: DictConfig) -> None:
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        training.set_seed(seed=cfg.seed)
        self.objective = check_choice("objective", cfg.objective, OBJECTIVES)
        self.head_init = check_choice("head.init", cfg.head.init, HEAD_INITS)
        self.head_prior = check_choice("head.prior", cfg.head.get("prior", "none"), HEAD_PRIORS)
        if self.head_prior == "stated" and (self.head_init == "none" or not cfg.state_numbers):
            raise PersonaTuneError("head.prior: stated needs a head (head.init) and prompts that state the numbers "
                                   "(state_numbers: True)")
        if self.head_prior == "collab" and (self.head_init == "none" or not cfg.get("collab_memories")):
            raise PersonaTuneError("head.prior: collab needs a head (head.init) and prompts with collaborative "
                                   "memories (collab_memories: k > 0)")
        self.run = RunFolder(cfg.run_dir)
        self.output_dir = Path(cfg.output_dir)
        self.progress = bool(cfg.get("progress", True))
        self.cfg = cfg

    # ------------------------------------------------------------------ 1. setup
    def setup(self, cfg: DictConfig) -> None:
        self.run.require(RATINGS_TRAIN, RATINGS_TEST, ITEMS)
        checkpointer = config.instantiate(cfg.checkpointer)
        base_state = checkpointer.load_checkpoint()[training.MODEL_KEY]
        with training.set_default_dtype(self._dtype), self._device:
            self.model = config.instantiate(cfg.model)
        self.model.load_state_dict(base_state, strict=False)
        self.split = split_layer(self.model, int(cfg.adapted_layers))
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.answer = answer_tokens(self.tokenizer)
        self.fit = FitToLength(self.tokenizer, cfg.tokenizer.get("max_seq_len"))
        self.rating_ids = torch.tensor(self.answer.rating_ids)

        self.model.requires_grad_(False)
        adapter = get_adapter_params(self.model)
        top = tuple(f"layers.{i}." for i in range(self.split, len(self.model.layers)))
        self.trainable = {k: p for k, p in adapter.items() if k.startswith(top)}
        for p in self.trainable.values():
            p.requires_grad_(True)
        self.head = None
        if self.head_init != "none":
            self.head = RatingHead(self.model.norm.scale.shape[0], self.answer.rating_ids,
                                   prior=self.head_prior).to(self._device)
            self.trainable |= {f"head.{k}": p for k, p in self.head.named_parameters()}

        files = [Path(cfg.checkpointer.checkpoint_dir) / f for f in cfg.checkpointer.checkpoint_files]
        spec = {"model": cfg.model._component_, "weights": [file_sha256(f) for f in files],
                "split_layer": self.split, "dtype": cfg.dtype}
        self.cache = TrunkCache(cfg.trunk_cache.dir, spec, cfg.trunk_cache.get("dtype", "fp16"))
        self.metric_logger = config.instantiate(cfg.metric_logger)

    # ------------------------------------------------------------------ 2. rows
    def rows(self, split: str) -> pd.DataFrame:
        cfg = self.cfg
        common = dict(memory=cfg.memory, template=cfg.prompt_template, state_numbers=bool(cfg.state_numbers),
                      collab_memories=int(cfg.get("collab_memories", 0) or 0))
        # Rows are drawn over all users, then this variant's persona kept: every variant of a run that
        # asks for the same number of rows sees the same rows (and the trunk cache already holds them).
        subsample, seed = (cfg.subsample, cfg.seed) if split == "train" else (cfg.eval.max_rows, cfg.eval.seed)
        rows = load_prompt_rows(cfg.run_dir, split=split, subsample=subsample, seed=seed, **common)
        if cfg.persona is not None:
            rows = rows[rows["persona"] == int(cfg.persona)].reset_index(drop=True)
            if rows.empty:
                raise PersonaTuneError(f"persona {cfg.persona} has no {split} rows in {cfg.run_dir}")
        rows["prompt"] = [encode_prompt(self.fit, p, self.answer) for p in rows["parts"]]
        return rows

    # ------------------------------------------------------------------ 3. trunk cache
    def build_cache(self, rows: pd.DataFrame, what: str) -> None:
        start = time.perf_counter()
        self.model.eval()
        stats = self.cache.build(self.model, self.split, rows["prompt"].tolist(), rows["user_id"].tolist(),
                                 batch_size=int(self.cfg.trunk_cache.batch_size),
                                 token_budget=int(self.cfg.trunk_cache.token_budget),
                                 progress=self.progress, device=self._device)
        seconds = time.perf_counter() - start
        self.cache_stats[what] = {**stats, "seconds": round(seconds, 2)}
        log.info(f"trunk cache ({what}): {stats['rows_computed']} of {len(rows)} rows computed in {seconds:.1f}s; "
                 f"{self.cache.dir} holds {self.cache.size_bytes() / 2**20:.1f} MiB")

    def trees(self, rows: pd.DataFrame, step: list[list[int]]):
        """The Trees of one step: each tree is rows (positions in ``rows``) of one user."""
        prompts, users = rows["prompt"], rows["user_id"]
        return make_trees([self.cache.tree(users.iat[t[0]], [prompts.iat[i] for i in t], self._dtype) for t in step])

    def steps(self, rows: pd.DataFrame, epoch: int = 0, shuffle: bool = True,
              rows_per_tree: int | None = None) -> list[list[list[int]]]:
        return tree_batches(rows["user_id"].tolist(), rows_per_tree or int(self.cfg.rows_per_tree),
                            int(self.cfg.trees_per_step), int(self.cfg.seed), epoch, shuffle)

    def priors(self, rows: pd.DataFrame) -> np.ndarray | None:
        """The rows' stated numbers, for a head that reads them (head.prior: stated or collab)."""
        return prior_features(list(rows["parts"]), self.head.prior) if self.head is not None and self.head.n_prior \
            else None

    def read_out(self, rows: pd.DataFrame):
        """Features and rating logits of every row (features_and_logits), in row order."""
        # No gradients here: bigger trees (eval.rows_per_tree, default 64) run each user's prefix fewer times.
        steps = self.steps(rows, shuffle=False, rows_per_tree=int(self.cfg.eval.get("rows_per_tree", 64)))
        return features_and_logits(self.model, self.split, lambda step: self.trees(rows, step),
                                   steps, len(rows), self.rating_ids, head=self.head,
                                   priors=self.priors(rows))

    # ------------------------------------------------------------------ 4. head
    def init_head(self, train: pd.DataFrame) -> dict:
        if self.head is None or self.head_init != "closed_form":
            return {"init": self.head_init}
        start = time.perf_counter()
        self.model.eval()
        head, self.head = self.head, None  # the base model's features and logits
        features, base = self.read_out(train)
        self.head = head
        output_weight = self.model.output.tied_module.weight if hasattr(self.model.output, "tied_module") \
            else self.model.output.weight
        info = fit_head_closed_form(self.head, output_weight.detach(), features, train["rating"].to_numpy(),
                                    base, train["user_id"].to_numpy(), l2_grid=tuple(self.cfg.head.l2_grid),
                                    prior_l2_grid=tuple(self.cfg.head.get("prior_l2_grid", PRIOR_L2_GRID)),
                                    folds=int(self.cfg.head.get("folds", FOLDS)), seed=self.cfg.seed,
                                    priors=self.priors(train))
        info["seconds"] = round(time.perf_counter() - start, 2)
        log.info(f"rating head fitted in closed form: {info}")
        return {"init": self.head_init, **info}

    # ------------------------------------------------------------------ 5. train
    def fingerprint(self, train: pd.DataFrame) -> str:
        spec = {k: v for k, v in OmegaConf.to_container(self.cfg, resolve=True).items() if k not in RUNTIME_KEYS}
        spec["rows"] = hashlib.sha256(train[["user_id", "item_id", "rating"]].to_numpy().tobytes()).hexdigest()
        spec["cache"] = str(self.cache.dir)
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()

    def save_state(self, fingerprint: str, epoch: int, step: int, global_step: int, head_info: dict) -> None:
        state = {"fingerprint": fingerprint, "epoch": epoch, "step": step, "global_step": global_step,
                 "head_info": head_info, "trainable": {k: p.detach().clone() for k, p in self.trainable.items()},
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        with atomic_path(self.output_dir / STATE_FILE) as tmp:
            torch.save(state, tmp)

    def train(self, train: pd.DataFrame) -> dict:
        cfg = self.cfg
        epochs = int(cfg.epochs)
        per_epoch = len(self.steps(train))
        if cfg.get("max_steps_per_epoch"):
            per_epoch = min(per_epoch, int(cfg.max_steps_per_epoch))
        params = list(self.trainable.values())
        self.optimizer = config.instantiate(cfg.optimizer, params) if params else None
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, num_warmup_steps=int(cfg.lr_scheduler.num_warmup_steps),
            num_training_steps=max(1, epochs * per_epoch)) if params else None
        fingerprint = self.fingerprint(train)
        state_file = self.output_dir / STATE_FILE
        epoch = step = global_step = 0
        # A corrupt state (a kill while the disk was full) is named and removed: training starts afresh.
        state = read_or_discard(state_file, lambda p: load_torch(p, weights_only=False), "training state")
        if state is not None and state["fingerprint"] == fingerprint:
            with torch.no_grad():
                for k, p in self.trainable.items():
                    p.copy_(state["trainable"][k])
            if self.optimizer is not None:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            epoch, step, global_step, head_info = state["epoch"], state["step"], state["global_step"], state["head_info"]
            log.info(f"resuming at epoch {epoch}, step {step} ({global_step} steps done)")
        else:
            if state is not None:
                log.info(f"{state_file} belongs to another config or other rows: starting afresh")
            head_info = self.init_head(train)
            if params:
                self.save_state(fingerprint, 0, 0, 0, head_info)

        save_every = int(cfg.get("save_every_n_steps") or 0)
        losses = []
        priors = self.priors(train)
        while epoch < epochs and params:
            self.model.train()
            batches = self.steps(train, epoch)[:per_epoch]
            for i in range(step, len(batches)):
                start = time.perf_counter()
                trees = self.trees(train, batches[i])
                rows = [r for tree in batches[i] for r in tree]
                logits, _ = top_forward(self.model, self.split, trees, self.head,
                                        None if priors is None else torch.from_numpy(priors[rows]))
                ratings = torch.tensor(train["rating"].to_numpy()[rows], dtype=torch.long)
                loss = rating_loss(logits, ratings, self.rating_ids, self.objective)
                loss.backward()
                if cfg.get("clip_grad_norm"):
                    torch.nn.utils.clip_grad_norm_(params, float(cfg.clip_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                global_step += 1
                seconds = time.perf_counter() - start
                losses.append(loss.item())
                self.metric_logger.log_dict({
                    "loss": loss.item(), "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens_per_second_per_gpu": trees.tokens / seconds,
                    "rows_per_second": len(rows) / seconds}, step=global_step)
                if save_every and global_step % save_every == 0:
                    self.save_state(fingerprint, epoch, i + 1, global_step, head_info)
            self.save_adapter(epoch)
            epoch, step = epoch + 1, 0
            self.save_state(fingerprint, epoch, 0, global_step, head_info)
        if not params or epochs == 0:
            self.save_adapter(max(epochs - 1, 0))
        return {"steps": global_step, "head": head_info, "losses": losses}

    # ------------------------------------------------------------------ 6. save
    def save_adapter(self, epoch: int) -> None:
        folder = self.output_dir / f"epoch_{epoch}"
        with atomic_path(folder / ADAPTER_FILE) as tmp:
            torch.save({k: v.detach().cpu() for k, v in get_adapter_params(self.model).items()}, tmp)
        if self.head is not None:
            with atomic_path(folder / HEAD_FILE) as tmp:
                torch.save({**{k: v.detach().cpu() for k, v in self.head.state_dict().items()},
                            "rating_ids": self.head.rating_ids.cpu()}, tmp)

    # ------------------------------------------------------------------ 7. evaluate
    @torch.no_grad()
    def evaluate(self, test: pd.DataFrame) -> pd.DataFrame:
        self.model.eval()
        start = time.perf_counter()
        _, z = self.read_out(test)
        digits = torch.from_numpy(z[:, :5])
        probs = torch.softmax(digits, dim=-1).numpy()
        every = torch.logsumexp(torch.from_numpy(z), dim=-1)
        mass = torch.exp(torch.logsumexp(digits, dim=-1) - every).numpy()
        out = prediction_block(test[["persona", "user_id", "item_id", "rating"]], "scoring", scored_frame(probs, mass))
        out["n_prompt_tokens"] = [len(p) for p in test["prompt"]]
        out = out[PREDICTIONS_LAYOUT]
        if int(self.cfg.eval.get("paper_rows") or 0) > 0:
            out = pd.concat([out, self.evaluate_paper(test)], ignore_index=True)
        seconds = time.perf_counter() - start
        log.info(f"evaluated {len(out)} test rows in {seconds:.1f}s: RMSE "
                 f"{np.sqrt(np.mean((out['prediction'] - out['rating']) ** 2)):.4f}, "
                 f"sd of predictions {out['prediction'].std():.3f}")
        self.eval_seconds = seconds
        return out

    def evaluate_paper(self, test: pd.DataFrame) -> pd.DataFrame:
        """The paper's mode on ``eval.paper_rows`` of the test rows: the whole model (LoRA and, on the
        answer token, the rating head) generates ``eval.generation.max_new_tokens`` tokens; the regex
        parser reads the rating (persona_tune.evaluation.predict)."""
        rows = subsample_per_user(test, int(self.cfg.eval.paper_rows), int(self.cfg.eval.seed))
        predictor = RatingPredictor(self.model, self.tokenizer, device=self._device,
                                    max_seq_len=self.cfg.tokenizer.get("max_seq_len"), progress=self.progress)
        generation = GenerationConfig(**OmegaConf.to_container(self.cfg.eval.generation, resolve=True))
        output = self.model.output
        if self.head is not None:
            swap_output(self.model, HeadedOutput(output, self.head))
        try:
            paper = predict_rows(predictor, rows.drop(columns=["prompt"]), ["paper"], generation)
        finally:
            swap_output(self.model, output)
        return paper[PREDICTIONS_LAYOUT]

    def cleanup(self) -> None:
        self.metric_logger.close()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    config.log_config(recipe_name="FrozenTrunkRecipe", cfg=cfg)
    recipe = FrozenTrunkRecipe(cfg=cfg)
    try:
        recipe.setup(cfg=cfg)
        recipe.output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, recipe.output_dir / TORCHTUNE_CONFIG)
        recipe.cache_stats = {}
        untrained = int(cfg.epochs) == 0 and recipe.head_init != "closed_form"  # e.g. the prompted base model
        train = recipe.rows("train") if not untrained else None
        if train is not None:
            recipe.build_cache(train, "train")
            result = recipe.train(train)
        else:
            recipe.save_adapter(0)
            result = {"steps": 0, "head": {"init": recipe.head_init}}
        test = recipe.rows("test")
        recipe.build_cache(test, "test")
        predictions = recipe.evaluate(test)
        write_predictions(predictions, recipe.output_dir / PREDICTIONS)
        atomic_write_json(recipe.output_dir / TRUNK_SUMMARY, {
            "train_rows": 0 if train is None else len(train), "test_rows": len(test),
            "paper_rows": int((predictions["mode"] == "paper").sum()), "split_layer": recipe.split,
            "adapted_layers": int(cfg.adapted_layers), "steps": result["steps"], "head": result["head"],
            "cache_dir": str(recipe.cache.dir), "cache_bytes": recipe.cache.size_bytes(),
            "cache": recipe.cache_stats, "eval_seconds": round(recipe.eval_seconds, 2),
            "mean_train_prompt_tokens": None if train is None else float(np.mean([len(p) for p in train["prompt"]])),
            "mean_test_prompt_tokens": float(np.mean([len(p) for p in test["prompt"]])),
        })
    except PersonaTuneError as e:
        log.error(f"lora_frozen_trunk: {e}")
        sys.exit(2)
    finally:
        recipe.cleanup() if hasattr(recipe, "metric_logger") else None


if __name__ == "__main__":
    sys.exit(recipe_main())
