"""Collect issue 26's measurements (bench/recall_and_code.sh OUT, then bench/recall_and_code_more.sh OUT ...) into one
JSON for docs/results.md section 6, and print its tables: HumanEval pass@1 with Wilson intervals and the exact
McNemar test against the teacher, passkey recall by length (and depth), and the loss against position in bands.
Every `rad eval` folder under OUT is read; a model's items are pooled across folders by id (an item is a fixed
function of its id, so the same id in two folders is the same question).

    python bench/recall_and_code_summary.py OUT --json docs/results_recall_code.json --plots docs/results_recall_code
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rad.evaluate.passkey import plot_recall, recall_grid
from rad.evaluate.position_loss import plot_position_loss
from rad.evaluate.runner import paired_test, read_items
from rad.evaluate.stats import wilson_interval

# the name in the tables -> the folder names `rad eval` gave the model (bench/recall_and_code_more.sh links the k = 4
# student as k4-kd32)
MODELS = {"teacher": ("qwen2.5-coder-0.5b",), "RAD student k=4": ("student", "k4-kd32"),
          "RAD student k=8": ("k8-kd32",), "k=8, layers selected after alignment": ("k8-selected",),
          "draft k=4, searched layers": ("k4-converted",), "draft k=4, uniform layers": ("k4-uniform-converted",),
          "draft k=8, searched layers": ("k8-converted",), "draft k=8, uniform layers": ("k8-uniform-converted",),
          "draft k=8, layers of the --recall search": ("k8-recall-converted",)}
BANDS = ((1, 64), (65, 512), (513, 2048), (2049, 4096), (4097, 8192))


def _folders(out: Path, task_file: str) -> dict[str, list[Path]]:
    """Each model's `rad eval` folders under `out` holding `task_file`."""
    found: dict[str, list[Path]] = {}
    for name, slugs in MODELS.items():
        for slug in slugs:
            found.setdefault(name, []).extend(sorted(p.parent for p in out.glob(f"*/{slug}/{task_file}")))
    return {name: folders for name, folders in found.items() if folders}


def _pooled(folders: list[Path], task_file: str) -> dict[str, dict]:
    items: dict[str, dict] = {}
    for folder in folders:
        for item_id, record in read_items(folder / task_file).items():
            if item_id in items and items[item_id].get("target") != record.get("target"):
                raise SystemExit(f"{folder}: item {item_id} differs from the same id elsewhere")
            items.setdefault(item_id, record)
    return items


def _humaneval(out: Path) -> dict | None:
    folders = _folders(out, "humaneval.jsonl")
    if "teacher" not in folders:
        return None
    scores, tests = {}, {}
    for name, where in sorted(folders.items(), key=lambda kv: kv[0] != "teacher"):  # the teacher first
        items = _pooled(where, "humaneval.jsonl")
        if not items:
            continue
        correct = sum(bool(r["correct"]) for r in items.values())
        scores[name] = {"correct": correct, "total": len(items), "ci95": wilson_interval(correct, len(items)),
                        "statuses": _count(r.get("status", "") for r in items.values()),
                        "unfinished": sum("```" not in r["completion"] for r in items.values())}
        if name != "teacher" and len(items) == scores["teacher"]["total"]:  # a run still going is not paired
            test = paired_test(folders["teacher"][0], where[0], "humaneval")
            tests[name] = {"p_value": test.p_value, "only_teacher": test.b, "only_student": test.c}
    return {"models": scores, "mcnemar_vs_teacher": tests}


def _count(values) -> dict:
    counts: dict = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _passkey_records(out: Path) -> dict[str, list[dict]]:
    return {name: list(_pooled(where, "passkey.jsonl").values())
            for name, where in _folders(out, "passkey.jsonl").items()}


def _key_digits(records: list[dict]) -> dict[int, float]:
    """Partial recall by length: the share of the key's five digits answered in their place (a model that
    answers "10513" for 30513 has found the key and lost a digit; one that answers "123" has not found it)."""
    by_length: dict[int, list[float]] = {}
    for r in records:
        right = sum(a == b for a, b in zip(r["prediction"] or "", r["target"], strict=False))
        by_length.setdefault(int(r["length"]), []).append(right / len(r["target"]))
    return {n: sum(v) / len(v) for n, v in sorted(by_length.items())}


def _position(out: Path) -> dict:
    curves = {}
    for name, where in _folders(out, "position_loss.json").items():
        curve = json.loads((where[0] / "position_loss.json").read_text())["curve"]
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
    p.add_argument("--plots", help="write PREFIX_passkey.png and PREFIX_position.png (all models in one figure each)")
    args = p.parse_args()
    out = Path(args.out)
    masks = out / "objectives_on_masks.json"  # bench/search_objectives_on_masks.py
    passkey = _passkey_records(out)
    summary = {"humaneval": _humaneval(out), "passkey": {name: recall_grid(r) for name, r in passkey.items()},
               "key_digits": {name: _key_digits(r) for name, r in passkey.items()},
               "position": _position(out),
               "objectives_on_masks": json.loads(masks.read_text()) if masks.is_file() else None,
               "commands": [f"bash bench/recall_and_code.sh {out}",
                            f"bash bench/recall_and_code_more.sh {out} KD32_STUDENT SELECTED_STUDENT"]}
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.plots:
        plot_recall(summary["passkey"], f"{args.plots}_passkey.png")
        plot_position_loss({name: c["curve"] for name, c in summary["position"].items()}, f"{args.plots}_position.png")
    if summary["humaneval"]:
        print("| model | HumanEval pass@1 | 95% CI | only the teacher / only the model, McNemar p |\n|---|---:|---|---|")
        for name, s in summary["humaneval"]["models"].items():
            m = summary["humaneval"]["mcnemar_vs_teacher"].get(name)
            paired = f"{m['only_teacher']} / {m['only_student']}, p = {m['p_value']:.2g}" if m else ""
            print(f"| {name} | {s['correct']}/{s['total']} ({100 * s['correct'] / s['total']:.1f}%) | "
                  f"{100 * s['ci95'][0]:.1f}-{100 * s['ci95'][1]:.1f} | {paired} |")
        print()
    lengths = sorted({n for g in summary["passkey"].values() for n in g})
    if lengths:
        print("| model | " + " | ".join(f"{n} tokens" for n in lengths) + " | key digits in place |\n|---|"
              + "---:|" * len(lengths) + "---|")
        for name, grid in summary["passkey"].items():
            cells = []
            for n in lengths:
                c = [sum(v[0] for v in grid.get(n, {}).values()), sum(v[1] for v in grid.get(n, {}).values())]
                cells.append(f"{c[0]}/{c[1]}" if c[1] else "-")
            digits = summary["key_digits"][name]
            print(f"| {name} | " + " | ".join(cells) + " | "
                  + ", ".join(f"{n // 1024}k {100 * digits[n]:.0f}%" for n in lengths if n in digits) + " |")
        print()
    if summary["position"]:
        bands = [f"{lo}-{hi}" for lo, hi in BANDS]
        print("| model | " + " | ".join(bands) + " |\n|---|" + "---:|" * len(bands))
        for name, c in summary["position"].items():
            print(f"| {name} | " + " | ".join(f"{c['bands'][b]:.3f}" if b in c["bands"] else "-" for b in bands) + " |")


if __name__ == "__main__":
    main()
