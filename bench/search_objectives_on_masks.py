"""The search's agreement objectives on named layer sets of Qwen2.5-Coder-0.5B (docs/results.md section 6): on the
chat prompts (section 4's settings: the first 8 built-in prompts, 32 new tokens), on all 16 built-in chats (the
`--recall` tie-break's prompts) and on the `--recall 1024` haystacks (8 new tokens). By default the k = 8 sets:
section 4's searched layers, uniform layers, the layers selected after alignment (section 5) and the layers a
`--recall` search chose; `--mask NAME=LAYERS` (repeatable) measures other sets instead, beside the search's.

    python bench/search_objectives_on_masks.py OUT.json RECALL_SEARCH_DIR [--mask "chat search=4,7,18,22" ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rad.models.layers import decoder_layers, parse_layers
from rad.models.loading import load_model
from rad.models.tokens import eos_token_ids, padding_token_id
from rad.search.objectives import make_objective
from rad.search.prompts import DEFAULT_PROMPTS, encode_prompts, recall_prompt_texts

MASKS = {"searched (chat agreement)": (4, 7, 9, 13, 16, 18, 20, 22), "uniform": (2, 5, 8, 11, 14, 17, 20, 23),
         "selected after alignment": (2, 6, 7, 13, 15, 16, 20, 22)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("recall_search", type=Path, help="a `rad search --recall` folder: its choice is measured too")
    parser.add_argument("--mask", action="append", default=[], metavar="NAME=LAYERS")
    args = parser.parse_args()
    if any("=" not in m for m in args.mask):
        parser.error("--mask takes NAME=LAYERS, e.g. \"chat search=4,7,18,22\"")
    loaded = load_model("qwen2.5-coder-0.5b")
    tok, model = loaded.tokenizer, loaded.model
    named = dict(m.split("=", 1) for m in args.mask)
    masks = {name: tuple(parse_layers(layers, len(decoder_layers(model)), allow_empty=False))
             for name, layers in named.items()} or dict(MASKS)
    masks["recall search"] = tuple(json.loads((args.recall_search / "search.json").read_text())["chosen_layers"])
    common = dict(eos_token_id=eos_token_ids(tok, model) or None, pad_token_id=padding_token_id(tok, model))
    objectives = {
        "chat_agreement": make_objective("agreement", model, encode_prompts(tok, list(DEFAULT_PROMPTS[:8])),
                                         max_new_tokens=32, **common),
        "chat16_agreement": make_objective("agreement", model, encode_prompts(tok, list(DEFAULT_PROMPTS)),
                                           max_new_tokens=32, **common),
        "recall_agreement": make_objective("agreement", model, encode_prompts(tok, recall_prompt_texts(tok, 1024)),
                                           max_new_tokens=8, **common)}
    results = {name: {"mask": list(mask), **{o: objective.evaluate(mask).value for o, objective in objectives.items()}}
               for name, mask in masks.items()}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("| layers | mask | chat agreement (8 chats) | 16 chats | recall agreement |\n|---|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {', '.join(map(str, r['mask']))} | {r['chat_agreement']:.3f} | "
              f"{r['chat16_agreement']:.3f} | {r['recall_agreement']:.3f} |")


if __name__ == "__main__":
    main()
