"""Held-out KL curves and how fast each arm reaches the baseline's final KL (pure functions, no torch)."""

from __future__ import annotations

from pathlib import Path

from rad.utils.jsonl import read_log

CURVE_KEYS = ("eval_kl", "eval_ppl", "teacher_ppl", "eval_top1_agreement", "eval_tokens")


def read_curve(log_path: str | Path) -> list[dict]:
    """The held-out evaluations of a distillation run (`kind: eval` lines of its log.jsonl), by step.

    One point per step (a step logged twice, as after a restart before the first checkpoint, keeps its
    last value), in step order; step 0 is the model before any training.
    """
    by_step: dict[int, dict] = {}
    for record in read_log(log_path):
        if record.get("kind") == "eval":
            by_step[int(record["step"])] = {"step": int(record["step"]),
                                            **{k: record[k] for k in CURVE_KEYS if k in record}}
    return [by_step[s] for s in sorted(by_step)]


def steps_to_reach(curve: list[tuple[int, float]] | list[dict], target: float) -> int | None:
    """The first evaluated step whose held-out KL is at most `target` (None if no point gets there).

    `curve` is (step, kl) pairs or `read_curve` records; only evaluated steps count, so the answer is
    as fine as the evaluation interval.
    """
    points = sorted((int(p["step"]), float(p["eval_kl"])) if isinstance(p, dict) else (int(p[0]), float(p[1]))
                    for p in curve)
    for step, kl in points:
        if kl <= target:
            return step
    return None


def convergence(curves: dict[str, list[dict]], baseline: str) -> dict:
    """Steps each arm needs to reach the baseline arm's final held-out KL, and the speed-up over the baseline.

    The speed-up is baseline_steps / arm_steps, both by the same rule (the baseline's own first step at or
    below its final KL, usually its last). It is None when the arm never gets there or reaches it before any
    training (step 0: `reached_at_init`), and when the baseline's own count is 0.
    """
    base_curve = curves[baseline]
    if not base_curve:
        raise ValueError(f"The baseline arm {baseline} has no held-out evaluations.")
    target = float(base_curve[-1]["eval_kl"])
    base_steps = steps_to_reach(base_curve, target)
    arms = {}
    for name, curve in curves.items():
        steps = steps_to_reach(curve, target)
        speedup = base_steps / steps if steps and base_steps else None
        arms[name] = {"steps_to_baseline_kl": steps, "speedup": speedup, "reached_at_init": steps == 0}
    return {"baseline": baseline, "target_kl": target, "baseline_steps": base_steps, "arms": arms}
