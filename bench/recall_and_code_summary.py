"""Collect issue 26's measurements (bench/recall_and_code.sh OUT) into one JSON for docs/results.md section 6, and
print its tables: HumanEval pass@1 with Wilson intervals and the exact McNemar test, passkey recall by length
(and depth), and the loss against position in bands.

    python bench/recall_and_code_summary.py OUT --json docs/results_recall_code.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rad.evaluate.passkey import recall_grid
from rad.evaluate.runner import paired_test, read_items
from rad.evaluate.stats import wilson_interval

MODELS = {"teacher": "qwen2.5-coder-0.5b", "RAD student k=4": "student"}
BANDS = ((1, 64), (65, 512), (513, 2048), (2049, 4096), (4097, 8192))


def _humaneval(out: Path) -> dict | None:
    folders = {name: out / "humaneval" / slug for name, slug in MODELS.items()}
    if not all((f / "humaneval.jsonl").is_file() for f in folders.values()):
        return None
    scores = {}
    for name, folder in folders.items():
        items = read_items(folder / "humaneval.jsonl")
        correct = sum(bool(r["correct"]) for r in items.values())
        scores[name] = {"correct": correct, "total": len(items), "ci95": wilson_interval(correct, len(items)),
                        "statuses": _count(r.get("status", "") for r in items.values())}
    test = paired_test(folders["teacher"], folders["RAD student k=4"], "humaneval")
    return {"models": scores, "mcnemar": {"p_value": test.p_value, "only_teacher": test.b,
                                          "only_student": test.c}}


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _passkey(out: Path) -> dict:
    grids = {}
    for name, slug in MODELS.items():
        records = []
        for sub in ("passkey_short", "passkey_8k"):
            path = out / sub / slug / "passkey.jsonl"
            if path.is_file():
                records += list(read_items(path).values())
        if records:
            grids[name] = recall_grid(records)
    return grids


def _position(out: Path) -> dict:
    curves = {}
    for name, slug in MODELS.items():
        path = out / "position" / slug / "position_loss.json"
        if not path.is_file():
            continue
        curve = json.loads(path.read_text())["curve"]
        bands = {}
        for lo, hi in BANDS:
            inside = [b for b in curve if b["from"] >= lo and b["to"] <= hi]
            if inside:
                weight = sum(b["to"] - b["from"] + 1 for b in inside)
                bands[f"{lo}-{hi}"] = sum(b["loss"] * (b["to"] - b["from"] + 1) for b in inside) / weight
        curves[name] = {"bands": bands, "curve": curve}
    return curves


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    out = Path(args.out)
    summary = {"humaneval": _humaneval(out), "passkey": _passkey(out), "position": _position(out),
               "command": f"bash bench/recall_and_code.sh {out}"}
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if summary["humaneval"]:
        print("| model | HumanEval pass@1 | 95% CI |\n|---|---:|---|")
        for name, s in summary["humaneval"]["models"].items():
            print(f"| {name} | {s['correct']}/{s['total']} ({100 * s['correct'] / s['total']:.1f}%) | "
                  f"{100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f} |")
        m = summary["humaneval"]["mcnemar"]
        print(f"McNemar: only teacher {m['only_teacher']}, only student {m['only_student']}, p = {m['p_value']:.3g}\n")
    lengths = sorted({n for g in summary["passkey"].values() for n in g})
    if lengths:
        print("| model | " + " | ".join(f"{n} tokens" for n in lengths) + " |\n|---|" + "---:|" * len(lengths))
        for name, grid in summary["passkey"].items():
            cells = []
            for n in lengths:
                c = [sum(v[0] for v in grid.get(n, {}).values()), sum(v[1] for v in grid.get(n, {}).values())]
                cells.append(f"{c[0]}/{c[1]}" if c[1] else "-")
            print(f"| {name} | " + " | ".join(cells) + " |")
        print()
    if summary["position"]:
        bands = [f"{lo}-{hi}" for lo, hi in BANDS]
        print("| model | " + " | ".join(bands) + " |\n|---|" + "---:|" * len(bands))
        for name, c in summary["position"].items():
            print(f"| {name} | " + " | ".join(f"{c['bands'][b]:.3f}" if b in c["bands"] else "-" for b in bands) + " |")


if __name__ == "__main__":
    main()
