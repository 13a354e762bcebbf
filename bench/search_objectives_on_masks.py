"""Both agreement objectives on named k = 8 layer sets of Qwen2.5-Coder-0.5B (docs/results.md section 6): the
search's own `agreement` objective on the chat prompts (section 4's settings: the first 8 built-in prompts, 32 new
tokens) and on the `--recall 1024` haystacks (8 new tokens), for section 4's searched layers, uniform layers, the
layers selected after alignment (section 5) and the layers a `--recall` search chose.

    python bench/search_objectives_on_masks.py OUT.json RECALL_SEARCH_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rad.models.loading import load_model
from rad.models.tokens import eos_token_ids, padding_token_id
from rad.search.objectives import make_objective
from rad.search.prompts import DEFAULT_PROMPTS, encode_prompts, recall_prompt_texts

MASKS = {"searched (chat agreement)": (4, 7, 9, 13, 16, 18, 20, 22), "uniform": (2, 5, 8, 11, 14, 17, 20, 23),
         "selected after alignment": (2, 6, 7, 13, 15, 16, 20, 22)}


def main() -> None:
    out, recall_search = Path(sys.argv[1]), Path(sys.argv[2])
    masks = {**MASKS, "recall search": tuple(json.loads((recall_search / "search.json").read_text())["chosen_layers"])}
    loaded = load_model("qwen2.5-coder-0.5b")
    tok, model = loaded.tokenizer, loaded.model
    common = dict(eos_token_id=eos_token_ids(tok, model) or None, pad_token_id=padding_token_id(tok, model))
    objectives = {
        "chat_agreement": make_objective("agreement", model, encode_prompts(tok, list(DEFAULT_PROMPTS[:8])),
                                         max_new_tokens=32, **common),
        "recall_agreement": make_objective("agreement", model, encode_prompts(tok, recall_prompt_texts(tok, 1024)),
                                           max_new_tokens=8, **common)}
    results = {name: {"mask": list(mask), **{o: objective.evaluate(mask).value for o, objective in objectives.items()}}
               for name, mask in masks.items()}
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("| layers (k = 8) | mask | chat agreement | recall agreement |\n|---|---|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {', '.join(map(str, r['mask']))} | {r['chat_agreement']:.3f} | {r['recall_agreement']:.3f} |")


if __name__ == "__main__":
    main()
