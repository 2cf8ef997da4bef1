"""Hierarchical self-reflection (the paper's section 3.2): prompts, the JSON contract, validation.

Per user, train ratings are read in time order in batches of at most ``batch_size``. Each step sends
the current profile and one batch, and asks for a JSON object with an explanation of every rating
(M_l) and the reflected, updated profile (M_s). The last step's profile is the user's M_s.

Prompt templates are the files in ``prompts/`` (``string.Template``, ``$name`` placeholders), and a
user can point ``--prompt-dir`` at copies of them. ``prompt_version`` is a hash of the templates in
use, so changed prompts never mix with cached answers to old ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from persona_tune.errors import ConfigError

PROMPT_FILES = ("system.txt", "step.txt", "item.txt", "initial_profile.txt")
DEFAULT_PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
# Placeholders each template must be able to fill (unknown ones are an error, see render()).
PLACEHOLDERS = {
    "system.txt": {"max_profile_words"},
    "step.txt": {"profile", "items", "n_items"},
    "item.txt": {"item_id", "rating", "title", "text"},
    "initial_profile.txt": set(),
}
_RATING_MENTION = re.compile(r"\bas (?:an? )?([0-9]+(?:\.[0-9]+)?)\b|\b([0-9]+(?:\.[0-9]+)?) ?(?:/ ?5|out of 5|stars?)\b", re.I)


@dataclass(frozen=True)
class Prompts:
    templates: dict[str, str]
    source: str

    @property
    def version(self) -> str:
        digest = hashlib.sha256(
            json.dumps(self.templates, sort_keys=True, ensure_ascii=False).encode("utf-8")
        ).hexdigest()
        return f"reflect-v1-{digest[:10]}"

    def render(self, name: str, **values: Any) -> str:
        try:
            return _template(self.templates[name]).substitute(values)
        except (KeyError, ValueError) as e:
            raise ConfigError(
                f"prompt template {self.source}/{name}: bad placeholder {e}; it may use "
                + ", ".join(f"${p}" for p in sorted(PLACEHOLDERS[name]))
            ) from None


@functools.lru_cache(maxsize=64)
def _template(text: str) -> string.Template:
    return string.Template(text)


def load_prompts(prompt_dir: str | Path | None = None) -> Prompts:
    """The packaged templates, each replaced by the file of the same name in ``prompt_dir`` if there."""
    templates = {name: (DEFAULT_PROMPT_DIR / name).read_text(encoding="utf-8") for name in PROMPT_FILES}
    source = str(DEFAULT_PROMPT_DIR)
    if prompt_dir is not None:
        prompt_dir = Path(prompt_dir)
        if not prompt_dir.is_dir():
            raise ConfigError(f"--prompt-dir {prompt_dir} is not a directory")
        found = [name for name in PROMPT_FILES if (prompt_dir / name).is_file()]
        if not found:
            raise ConfigError(f"--prompt-dir {prompt_dir} holds none of {', '.join(PROMPT_FILES)}")
        for name in found:
            templates[name] = (prompt_dir / name).read_text(encoding="utf-8")
        source = str(prompt_dir)
    prompts = Prompts(templates, source)
    for name in PROMPT_FILES:  # fail now, not on the 500th user
        dummy = {p: "x" for p in PLACEHOLDERS[name]}
        prompts.render(name, **dummy)
    return prompts


@dataclass(frozen=True)
class BatchItem:
    item_id: int
    rating: int
    title: str
    text: str


def step_messages(prompts: Prompts, profile: str | None, batch: Sequence[BatchItem], max_profile_words: int) -> list[dict]:
    items = "\n".join(
        prompts.render("item.txt", item_id=b.item_id, rating=b.rating, title=b.title, text=b.text).rstrip("\n")
        for b in batch
    )
    profile_text = profile if profile else prompts.render("initial_profile.txt").strip()
    return [
        {"role": "system", "content": prompts.render("system.txt", max_profile_words=max_profile_words).strip()},
        {"role": "user", "content": prompts.render("step.txt", profile=profile_text, items=items, n_items=len(batch)).strip()},
    ]


def step_schema(batch: Sequence[BatchItem]) -> dict:
    """JSON schema of one step's answer. Item ids, ratings and each explanation's opening are fixed,
    so servers that decode with the schema (llama.cpp, vLLM) can only write the free-text parts.
    No length bounds: llama.cpp unrolls bounded repetitions into grammars so large that sampling
    crawls; lengths are left to ``max_tokens`` and to validation (``max_words``)."""
    fixed = [
        {
            "type": "object",
            "properties": {
                "item_id": {"type": "integer", "enum": [b.item_id]},
                "rating": {"type": "integer", "enum": [b.rating]},
                "explanation": {
                    "type": "string",
                    "pattern": f"^I rated {_pattern_literal(b.title)} as {b.rating} because {_TEXT_CHARS}+$",
                },
            },
            "required": ["item_id", "rating", "explanation"],
        }
        for b in batch
    ]
    return {
        "type": "object",
        "properties": {
            "explanations": {
                "type": "array", "prefixItems": fixed, "items": False,
                "minItems": len(batch), "maxItems": len(batch),
            },
            "profile": {"type": "string"},
        },
        "required": ["explanations", "profile"],
    }


# Characters allowed in free text fixed by a pattern: anything but a quote, backslash or line break,
# so a grammar built from the pattern (llama.cpp) can only write valid JSON strings.
_TEXT_CHARS = r'[^"\\\n\r\t]'
_AS_CLASS = str.maketrans({c: f"[{c}]" for c in ".()|{}*+?"})
_SAFE_TITLE = re.compile(r"[A-Za-z0-9 ,;:!?'&%#@/=<>~`_+*|().{}-]*")


def _pattern_literal(text: str) -> str:
    """``text`` as a regex that matches only itself (each special character as a one-character
    class, which llama.cpp's pattern converter handles), or any text for unusual titles."""
    if not _SAFE_TITLE.fullmatch(text):
        return _TEXT_CHARS + "+"
    return text.translate(_AS_CLASS)


@dataclass(frozen=True)
class StepResult:
    profile: str
    explanations: dict[int, str]  # item_id -> M_l


def extract_json(text: str) -> Any:
    """The JSON object in ``text``: the whole text, a ```json fence, or the first decodable {...}."""
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
            if isinstance(obj, dict):
                return obj
        except ValueError:
            continue
    raise ValueError("no JSON object found")


def mentioned_ratings(text: str) -> list[str]:
    return [a or b for a, b in _RATING_MENTION.findall(text)]


def validate_step(content: str | None, batch: Sequence[BatchItem], max_words: int) -> tuple[StepResult | None, str]:
    """Parse and check one answer. Returns (result, "") or (None, why it is rejected)."""
    if content is None or not content.strip():
        return None, "empty output"
    n_words = len(content.split())
    if n_words > max_words:
        return None, f"over {max_words} words ({n_words})"
    try:
        obj = extract_json(content)
    except ValueError as e:
        return None, f"unparsable JSON ({e})"
    if not isinstance(obj, dict):
        return None, "the answer is not a JSON object"
    profile = obj.get("profile")
    if not isinstance(profile, str) or not profile.strip():
        return None, "empty or missing profile"
    entries = obj.get("explanations")
    if not isinstance(entries, list):
        return None, "missing 'explanations' list"
    wanted = {b.item_id: b for b in batch}
    found: dict[int, str] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            return None, "an explanation is not an object"
        try:
            item_id = int(entry.get("item_id"))
        except (TypeError, ValueError):
            return None, f"explanation with a bad item_id {entry.get('item_id')!r}"
        text = entry.get("explanation")
        if item_id not in wanted:
            return None, f"explanation for item {item_id}, which is not in the batch"
        if item_id in found:
            return None, f"two explanations for item {item_id}"
        if not isinstance(text, str) or not text.strip():
            return None, f"empty explanation for item {item_id}"
        true = wanted[item_id].rating
        if "rating" in entry and str(entry["rating"]).strip() not in (str(true), f"{true}.0"):
            return None, f"item {item_id}: rating {entry['rating']!r} given, the user's rating is {true}"
        mentioned = mentioned_ratings(text)
        if not mentioned:
            return None, f"the explanation for item {item_id} does not state its rating ({true})"
        if float(mentioned[0]) != true:
            return None, f"the explanation for item {item_id} states rating {mentioned[0]}, the user's rating is {true}"
        found[item_id] = text.strip()
    missing = [i for i in wanted if i not in found]
    if missing:
        return None, f"no explanation for item(s) {missing}"
    return StepResult(profile.strip(), found), ""
