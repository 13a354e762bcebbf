"""One arm of the claims sweep alone for one k, with `rad sweep --preset claims`'s own settings, into the folder
layout the sweep uses (OUT/k<K>/...), so `rad sweep --preset claims --out OUT` continues it later. Why: the sweep
runs both students' distillation before any evaluation (the baseline's alone is 35 min at k = 4 here); this gets one
student to `rad eval` on its own (docs/results.md section 7).

usage: python bench/claims_arm.py K OUT [--arm rad|baseline] [--layers 2,3,4,7,18,20,22,23]

--arm rad (default): search -> convert (`rad` init) -> KD of the mixers. --arm baseline: MambaInLlama's recipe as
the sweep runs it, no search: uniform layers -> convert (`mil` init) -> KD of every parameter.
--layers (rad only) skips the search and converts those layers (docs/results.md section 6's `--recall` choice): the
same KD recipe on other layers. Such an OUT is not a sweep folder (its layers are not the search's); give it its own.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rad.models.layers import decoder_layers, parse_layers, uniform_layers
from rad.models.loading import load_model
from rad.preflight import check_inputs
from rad.stages.convert import convert_stage
from rad.stages.distill import distill_stage
from rad.stages.run_config import BASELINE_TRAIN, RAD_TRAIN, RunPaths
from rad.stages.search import search_stage
from rad.sweep import load_sweep_config

logger = logging.getLogger("claims_arm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("k", type=int)
    parser.add_argument("out")
    parser.add_argument("--arm", choices=("rad", "baseline"), default="rad")
    parser.add_argument("--layers", help="comma-separated layers to convert instead of the searched ones (rad only)")
    args = parser.parse_args()
    if args.layers and args.arm == "baseline":
        parser.error("--layers is for the rad arm; the baseline converts uniform layers, as the sweep does")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = load_sweep_config("claims", overrides=[f"out={args.out}"]).run_config(args.k)
    paths = RunPaths(Path(run.out))
    inputs = check_inputs(run.model, run.eval.tasks, on_missing_task=run.eval.on_missing_data,
                          distill_data=run.distill.data)
    teacher = load_model(run.model, device=run.device)
    if args.arm == "baseline":
        layers = uniform_layers(args.k, teacher.model.config.num_hidden_layers)
        convert_stage(teacher, run.model, layers, "mil", paths.baseline_hybrid, seed=run.seed)
        t0 = time.perf_counter()
        student = distill_stage(run.distill, paths.baseline_hybrid, paths.baseline_distill, BASELINE_TRAIN,
                                seed=run.seed, device=run.device, sources=inputs.sources)
        logger.info("distill (baseline, layers %s): %s in %.0f s", layers, student, time.perf_counter() - t0)
        return
    if args.layers:  # checked against the loaded model (a few seconds), before the search or any write
        layers = parse_layers(args.layers, len(decoder_layers(teacher.model)), allow_empty=False)
        if len(layers) != args.k:
            parser.error(f"--layers names {len(layers)} layers, not k = {args.k}")
    else:
        t0 = time.perf_counter()
        layers = search_stage(teacher, run.search, paths.search, seed=run.seed).layers
        logger.info("search: layers %s in %.0f s", layers, time.perf_counter() - t0)
    convert_stage(teacher, run.model, layers, "rad", paths.rad_hybrid, seed=run.seed)
    t0 = time.perf_counter()
    student = distill_stage(run.distill, paths.rad_hybrid, paths.rad_distill, RAD_TRAIN, seed=run.seed,
                            device=run.device, sources=inputs.sources)
    logger.info("distill: %s in %.0f s", student, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
