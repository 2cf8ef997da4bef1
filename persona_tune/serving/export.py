"""A trained agent as something a serving engine loads: a LoRA on the output projection, plus a few
constants that a client adds per request.

The frozen-trunk path's rating head (persona_tune.evaluation.head.RatingHead) adds ``W h + b + P x`` to the
logits of the five rating tokens "1".."5", where ``h`` is the output projection's input (the final
normed state), ``x`` the numbers the prompt states (``head.prior: stated``, missing ones filled with
``prior_fill``) and ``W`` [5, D], ``b`` [5], ``P`` [5, n_prior] are learned. Every other token keeps
the base model's logit. So:

- ``W h`` is exactly a rank-5 LoRA on the output projection: ``B A h`` with ``A = W`` and ``B``
  [V, 5] the one-hot columns that put row r of ``A h`` on token ``rating_ids[r]``
  (:func:`fold_head`). An engine that serves LoRA on ``lm_head`` (vLLM, llama.cpp, HF PEFT) applies it.
- ``b + P x`` is a constant of the row: the client adds it to the engine's log-probabilities of the
  five tokens before renormalising over them (:func:`head_terms`). Adding the same constant to a
  token's logit or to its log-probability changes the five-way softmax identically.

A model with tied embeddings (SmolLM2) has no output weight of its own: HF PEFT and vLLM wrap
``lm_head`` anyway, but llama.cpp finds a LoRA's base tensor by name, so the base GGUF written here
always carries an explicit ``output.weight`` (a copy of the embedding).

The GGUF pair is written from torchtune's own state dicts, so the engine runs the very weights the
local path runs: torchtune keeps Llama's q/k rows in Meta's interleaved RoPE layout, which is
llama.cpp's ``llama`` layout, and Phi-3's in the rotate-half layout of llama.cpp's ``phi3`` (which
fuses q/k/v into ``attn_qkv`` and gate/up into ``ffn_up``, so their LoRAs are fused like the PEFT
export's: A stacked, B block-diagonal). llama.cpp scales every LoRA tensor by ``alpha / rank`` with
one ``alpha`` per file, so each tensor's A carries the factor that gives each part its own scale.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from persona_tune.errors import ConfigError, DataError, StageMissingError
from persona_tune.runfolder import SERVING_SPEC, atomic_path

log = logging.getLogger(__name__)

SERVING_FORMAT = 1
# The numbers a head reads per row (persona_tune.evaluation.head.prior_features), by its head.prior.
PRIOR_FEATURES = {"stated": ["stated item average + user offset", "stated item average"],
                  "collab": ["stated bias-baseline expectation", "expectation + item-kNN neighbours' residual"]}
LOGIT_BIAS_RULE = ("add c[r] = bias[r] + sum_j prior_weight[r][j] * x[j] to the engine's log-probability of "
                   "rating_token_ids[r] (x[j]: the number prior_features[head.prior][j] the prompt states, "
                   "prior_fill[j] where it states none), then renormalise over the five tokens: "
                   "p[r] = softmax(logprob + c)[r]")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_1", "q4_0", "q5_1")
ARCHS = {"llama": "llama", "phi3": "phi3"}  # HF model_type -> llama.cpp architecture


# ---------------------------------------------------------------- the head as a LoRA


@dataclass
class HeadTerms:
    """What a client adds per request: ``bias`` [5] and ``prior_weight`` [5, n] on the numbers the
    prompt states (which ones: ``prior``, the head's head.prior: none, stated or collab)."""

    bias: np.ndarray
    prior_weight: np.ndarray
    prior_fill: np.ndarray
    prior: str = "none"

    @classmethod
    def zero(cls) -> "HeadTerms":
        return cls(np.zeros(5), np.zeros((5, 0)), np.zeros(0))

    @classmethod
    def from_head(cls, head) -> "HeadTerms":
        return cls(head.bias.detach().double().numpy(), head.prior_weight.detach().double().numpy(),
                   head.prior_fill.detach().double().numpy(), str(getattr(head, "prior", "none")))

    @classmethod
    def from_json(cls, d: dict | None) -> "HeadTerms":
        if not d:
            return cls.zero()
        weight = np.asarray(d["prior_weight"], dtype=float).reshape(5, -1)
        return cls(np.asarray(d["bias"], dtype=float), weight, np.asarray(d["prior_fill"], dtype=float),
                   d.get("prior", "stated" if weight.shape[1] else "none"))

    def to_json(self) -> dict:
        return {"bias": self.bias.tolist(), "prior": self.prior, "prior_weight": self.prior_weight.tolist(),
                "prior_fill": self.prior_fill.tolist()}

    @property
    def n_prior(self) -> int:
        return self.prior_weight.shape[1]


def head_terms(terms: HeadTerms, priors: np.ndarray | None) -> np.ndarray:
    """[n, 5]: the constant each row adds to the five rating tokens (``priors`` [n, n_prior], NaN = unstated)."""
    n = 1 if priors is None else len(priors)
    out = np.tile(terms.bias, (n, 1))
    if terms.n_prior:
        if priors is None or priors.shape[1] != terms.n_prior:
            raise ConfigError(f"this agent's head reads {terms.n_prior} stated numbers per row; the prompts state none")
        x = np.where(np.isnan(priors), terms.prior_fill[None, :], priors)
        out = out + x @ terms.prior_weight.T
    return out


def fold_head(weight: torch.Tensor, rating_ids: Sequence[int], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's ``W h`` as a LoRA (A [5, D], B [V, 5]) on the output projection: ``B A h``."""
    a = weight.detach().float().clone()
    b = torch.zeros(vocab_size, len(rating_ids))
    for r, token in enumerate(rating_ids):
        b[int(token), r] = 1.0
    return a, b


# ---------------------------------------------------------------- PEFT (HF PEFT, vLLM)


def peft_bundle(adapter_path: Path, base_model_dir: Path, head=None, lora_alpha: float | None = None,
                ) -> tuple[dict, dict]:
    """(PEFT state dict, adapter_config) of a torchtune adapter with ``head`` folded into ``lm_head``.

    persona_tune.peft_export converts the adapter (fusing Phi-3's parts, padding to one rank R with
    scale s = alpha / R); the head's LoRA joins ``lm_head`` with ``A = W / s`` so that ``s B A = W``
    on the rating rows, and every module is padded to the new common rank with alpha keeping s.
    """
    from persona_tune.peft_export import PEFT_PREFIX, _pad_rank, convert_adapter

    state, config = convert_adapter(adapter_path, base_model_dir, lora_alpha=lora_alpha)
    if head is None:
        return state, config
    scale = config["lora_alpha"] / config["r"]
    vocab = _vocab_size(base_model_dir)
    a, b = fold_head(head.weight, head.rating_ids.tolist(), vocab)
    key_a, key_b = f"{PEFT_PREFIX}lm_head.lora_A.weight", f"{PEFT_PREFIX}lm_head.lora_B.weight"
    dtype = next(iter(state.values())).dtype
    if key_a in state:  # the adapter trained a LoRA on the output too: the head joins it
        a = torch.cat([state[key_a].float(), a / scale])
        b = torch.cat([state[key_b].float(), b], dim=1)
    else:
        a = a / scale
    state[key_a], state[key_b] = a.to(dtype), b.to(dtype)
    rank = max(t.shape[0] for k, t in state.items() if k.endswith(".lora_A.weight"))
    for k in [k for k in state if k.endswith(".lora_A.weight")]:
        kb = k.replace(".lora_A.", ".lora_B.")
        state[k], state[kb] = (t.contiguous() for t in _pad_rank(state[k], state[kb], rank))
    config = {**config, "r": rank, "lora_alpha": scale * rank,
              "target_modules": sorted(set(config["target_modules"]) | {"lm_head"})}
    return state, config


def _vocab_size(base_model_dir: Path) -> int:
    from persona_tune.peft_export import read_base_config

    return int(read_base_config(base_model_dir)["vocab_size"])


# ---------------------------------------------------------------- GGUF (llama.cpp)

# torchtune module (under layers.N) -> (GGUF tensor under blk.N, index of the part in a fused tensor)
GGUF_MODULES = {
    "llama": {"attn.q_proj": ("attn_q", None), "attn.k_proj": ("attn_k", None), "attn.v_proj": ("attn_v", None),
              "attn.output_proj": ("attn_output", None), "mlp.w1": ("ffn_gate", None),
              "mlp.w2": ("ffn_down", None), "mlp.w3": ("ffn_up", None)},
    "phi3": {"attn.q_proj": ("attn_qkv", 0), "attn.k_proj": ("attn_qkv", 1), "attn.v_proj": ("attn_qkv", 2),
             "attn.output_proj": ("attn_output", None), "mlp.w1": ("ffn_up", 0), "mlp.w2": ("ffn_down", None),
             "mlp.w3": ("ffn_up", 1)},
}


def model_config(base_model_dir: Path) -> dict:
    """The base's HF config.json, with the values the GGUF needs checked."""
    from persona_tune.peft_export import read_base_config

    config = read_base_config(base_model_dir)
    if config.get("model_type") not in ARCHS:
        raise ConfigError(f"{base_model_dir}: model_type {config.get('model_type')!r}; the GGUF export knows "
                          f"{', '.join(ARCHS)}")
    return config


def base_gguf_tensors(state: dict[str, torch.Tensor], arch: str, n_layers: int) -> dict[str, torch.Tensor]:
    """torchtune's base state dict under llama.cpp's tensor names, with an explicit output.weight."""
    def get(key):
        if key not in state:
            raise DataError(f"the base checkpoint has no {key} (is it a {arch} model?)")
        return state[key]

    out = {"token_embd.weight": get("tok_embeddings.weight"), "output_norm.weight": get("norm.scale"),
           "output.weight": state.get("output.weight", state["tok_embeddings.weight"])}
    for i in range(n_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = get(p + "sa_norm.scale")
        out[b + "ffn_norm.weight"] = get(p + "mlp_norm.scale")
        out[b + "attn_output.weight"] = get(p + "attn.output_proj.weight")
        out[b + "ffn_down.weight"] = get(p + "mlp.w2.weight")
        q, k, v = (get(f"{p}attn.{n}_proj.weight") for n in "qkv")
        gate, up = get(p + "mlp.w1.weight"), get(p + "mlp.w3.weight")
        if arch == "phi3":
            out[b + "attn_qkv.weight"] = torch.cat([q, k, v])
            out[b + "ffn_up.weight"] = torch.cat([gate, up])
        else:
            out.update({b + "attn_q.weight": q, b + "attn_k.weight": k, b + "attn_v.weight": v,
                        b + "ffn_gate.weight": gate, b + "ffn_up.weight": up})
    return out


def _quantize(array: np.ndarray, kind: str):
    """(data, raw_dtype) of a float32 array in the GGUF type ``kind`` (norms and odd shapes stay f32)."""
    import gguf

    if kind == "f32" or array.ndim == 1:
        return array.astype(np.float32), None
    if kind == "f16":
        return array.astype(np.float16), None
    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _file_type(kind: str) -> int:
    import gguf

    return int(getattr(gguf.LlamaFileType, "ALL_F32" if kind == "f32" else f"MOSTLY_{kind.upper()}"))


def write_base_gguf(out: Path, state: dict[str, torch.Tensor], config: dict, tokenizer_kv: list[tuple],
                    kind: str = "f16", name: str = "persona-tune base") -> Path:
    """The base model as one GGUF file for llama.cpp (``kind``: f32, f16 or a quantisation)."""
    import gguf

    if kind not in GGUF_TYPES:
        raise ConfigError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {kind!r}")
    arch = ARCHS[config["model_type"]]
    n_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    dim = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or dim // heads)
    rope = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    if config.get("rope_scaling") or (config.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ConfigError("the GGUF export does not write RoPE scaling; this base model uses it")
    tensors = base_gguf_tensors(state, arch, n_layers)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_context_length(int(config.get("max_position_embeddings") or 4096))
        w.add_embedding_length(dim)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(heads)
        w.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
        w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(rope or 10_000.0))
        w.add_vocab_size(int(tensors["token_embd.weight"].shape[0]))
        w.add_file_type(_file_type(kind))
        for key, value, vtype, sub_type in tokenizer_kv:
            w.add_key_value(key, value, vtype, sub_type=sub_type)
        for tname, tensor in tensors.items():
            data, raw_dtype = _quantize(tensor.detach().float().numpy(), kind)
            w.add_tensor(tname, data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


@dataclass
class LoraPart:
    """One LoRA inside a GGUF tensor: A [r, in], B [rows, r] at ``row`` of the tensor's output rows, scale s."""

    a: torch.Tensor
    b: torch.Tensor
    row: int
    scale: float


def gguf_lora_tensors(adapter: dict[str, torch.Tensor], arch: str, alpha: float, rank: int,
                      tensor_rows: dict[str, int], part_offsets: dict[str, list[int]],
                      head_a: torch.Tensor | None = None, head_b: torch.Tensor | None = None,
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """llama.cpp LoRA tensors (name.weight -> (A, B)) of a torchtune adapter and a folded head.

    ``tensor_rows``, ``part_offsets``: :func:`lora_layout`; ``rank``/``alpha``: the adapter's. Modules whose B is all zero (the frozen trunk's untrained lower layers) are left out.
    Each tensor's A is multiplied by ``s * R / alpha`` (R: the tensor's total rank, s: the part's own
    scale), since llama.cpp scales the tensor by ``alpha / R``.
    """
    from persona_tune.peft_export import _TUNE_KEY

    modules: dict[tuple, dict] = {}
    for key, value in adapter.items():
        match = _TUNE_KEY.match(key)
        if not match or match.group(3) == "magnitude":
            raise DataError(f"{key}: the GGUF export takes plain LoRA adapters (no DoRA)")
        layer, module, kind = match.groups()
        modules.setdefault((layer, module), {})[kind.split(".")[0]] = value
    parts: dict[str, list[LoraPart]] = {}
    for (layer, module), t in modules.items():
        if not torch.any(t["lora_b"] != 0):
            continue
        if layer is None:
            if module != "output":
                raise DataError(f"no llama.cpp tensor for the torchtune module {module!r}")
            name, index = "output", None
        else:
            if module not in GGUF_MODULES[arch]:
                raise DataError(f"no llama.cpp {arch} tensor for the torchtune module {module!r}")
            base, index = GGUF_MODULES[arch][module]
            name = f"blk.{layer}.{base}"
        row = 0 if index is None else part_offsets[f"{name}.weight"][index]
        parts.setdefault(f"{name}.weight", []).append(LoraPart(t["lora_a"].float(), t["lora_b"].float(), row,
                                                                alpha / rank))
    if head_a is not None:
        parts.setdefault("output.weight", []).append(LoraPart(head_a.float(), head_b.float(), 0, 1.0))
    out = {}
    for name, items in sorted(parts.items()):
        total = sum(p.a.shape[0] for p in items)
        rows = tensor_rows[name]
        a = torch.cat([p.a * (p.scale * total / alpha) for p in items])
        b = torch.zeros(rows, total)
        at = 0
        for p in items:
            b[p.row:p.row + p.b.shape[0], at:at + p.a.shape[0]] = p.b
            at += p.a.shape[0]
        out[name] = (a.contiguous(), b.contiguous())
    return out


def lora_layout(config: dict) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(output rows of each base GGUF tensor a LoRA can target, first row of each part of the fused
    ones: q, k, v in Phi-3's attn_qkv and gate, up in its ffn_up), from the base's HF config."""
    arch = ARCHS[config["model_type"]]
    heads, dim = int(config["num_attention_heads"]), int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or dim // heads)
    q, kv = heads * head_dim, int(config.get("num_key_value_heads") or heads) * head_dim
    ffn = int(config["intermediate_size"])
    rows, offsets = {"output.weight": int(config["vocab_size"])}, {}
    for i in range(int(config["num_hidden_layers"])):
        b = f"blk.{i}."
        rows.update({b + "attn_output.weight": dim, b + "ffn_down.weight": dim})
        if arch == "phi3":
            rows.update({b + "attn_qkv.weight": q + 2 * kv, b + "ffn_up.weight": 2 * ffn})
            offsets.update({b + "attn_qkv.weight": [0, q, q + kv], b + "ffn_up.weight": [0, ffn]})
        else:
            rows.update({b + "attn_q.weight": q, b + "attn_k.weight": kv, b + "attn_v.weight": kv,
                         b + "ffn_gate.weight": ffn, b + "ffn_up.weight": ffn})
    return rows, offsets


def write_lora_gguf(out: Path, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], arch: str, alpha: float,
                    name: str) -> Path:
    """A llama.cpp LoRA adapter file (general.type adapter, adapter.type lora, one alpha)."""
    import gguf

    if not tensors:
        raise ConfigError(f"{name}: the adapter changes nothing (every LoRA B is zero and there is no head)")
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for tname, (a, b) in tensors.items():
            w.add_tensor(f"{tname}.lora_a", a.numpy().astype(np.float32))
            w.add_tensor(f"{tname}.lora_b", b.numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


# ---------------------------------------------------------------- tokenizer metadata for the base GGUF


def tokenizer_kv_from_gguf(path: Path) -> list[tuple]:
    """Every ``tokenizer.*`` key of a GGUF file (the model's own vocabulary, as llama.cpp wrote it)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if key == "tokenizer.ggml.add_bos_token":
            value = False  # the client sends every token, BOS included
        out.append((key, value, vtype, sub))
    if not any(k == "tokenizer.ggml.add_bos_token" for k, *_ in out):
        out.append(("tokenizer.ggml.add_bos_token", False, gguf.GGUFValueType.BOOL, None))
    return out


def tokenizer_kv_from_sentencepiece(model_path: Path, special_tokens: dict[str, int], vocab_size: int,
                                    bos_id: int, eos_id: int) -> list[tuple]:
    """A SentencePiece vocabulary (plus special tokens by id) as llama.cpp's ``llama`` tokenizer."""
    import gguf
    import sentencepiece as spm

    T = gguf.TokenType
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.get_piece_size()
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [int(T.UNUSED)] * vocab_size
    for i in range(min(n, vocab_size)):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = int(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                       T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    for text, i in special_tokens.items():
        if i < vocab_size:
            tokens[i], scores[i] = text, 0.0
            types[i] = int(T.CONTROL if i in (bos_id, eos_id) or text in ("<s>", "</s>") else T.USER_DEFINED)
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    V = gguf.GGUFValueType
    return [
        ("tokenizer.ggml.model", "llama", V.STRING, None),
        ("tokenizer.ggml.pre", "default", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.bos_token_id", int(bos_id), V.UINT32, None),
        ("tokenizer.ggml.eos_token_id", int(eos_id), V.UINT32, None),
        ("tokenizer.ggml.unknown_token_id", int(sp.unk_id()), V.UINT32, None),
        ("tokenizer.ggml.add_bos_token", False, V.BOOL, None),
        ("tokenizer.ggml.add_space_prefix", False, V.BOOL, None),
    ]


def rating_texts(tokenizer, rating_ids: Sequence[int], vocab_size: int) -> tuple[list[str], list[str]]:
    """The text of each rating token, and those texts another token of the vocabulary shares (a client
    reading text-keyed log-probabilities cannot tell those apart)."""
    texts = [tokenizer.decode([int(i)]) for i in rating_ids]
    wanted = set(texts)
    shared = set()
    for i in range(vocab_size):
        if i in rating_ids:
            continue
        try:
            text = tokenizer.decode([i])
        except Exception:  # ids past the tokenizer's own vocabulary (padding rows)
            continue
        if text in wanted:
            shared.add(text)
    return texts, sorted(shared)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read serving bundle: {e}", path) from None


def read_serving_spec(run, variant: str) -> dict:
    """RUN/serving/<variant>/serving.json of an exported agent (``run``: a RunFolder), checked for its format."""
    path = run.serving_variant_dir(variant) / SERVING_SPEC
    if not path.is_file():
        raise StageMissingError(f"{path} is missing: export the agent first "
                                f"(`persona-tune serve-export --run {run.root} --variant {variant}`)")
    spec = read_json(path)
    if spec.get("format_version") != SERVING_FORMAT:
        raise ConfigError(f"{path}: serving format {spec.get('format_version')!r}, this version reads "
                          f"{SERVING_FORMAT}; re-run `persona-tune serve-export`")
    return spec
