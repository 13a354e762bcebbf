"""The `rad` command: each subcommand is a thin shell over one documented Python function."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rad.errors import RadError

logger = logging.getLogger("rad")


def _cmd_convert(args: argparse.Namespace) -> None:
    from rad.models.convert import convert_model
    from rad.models.info import format_info, model_info

    if (args.layers is None) == (args.layers_from is None):
        raise RadError("Give the layers to convert with either --layers or --layers-from DIR (one of them).")
    if args.layers_from is not None:
        from rad.search import read_chosen_layers

        layers = read_chosen_layers(args.layers_from)
    else:
        layers = args.layers
    result = convert_model(
        args.model,
        layers,
        args.out,
        init=args.init,
        chunk_size=args.chunk_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    record = result.record
    print(f"Converted {len(record.converted_layers)} of {record.num_layers} layers of {record.source_model} "
          f"to Mamba2 ({record.init} init): {','.join(map(str, record.converted_layers)) or 'none'}")
    print(format_info(model_info(result.hybrid), json.loads(record.to_json())))
    print(f"Saved to {result.out}")


def _cmd_info(args: argparse.Namespace) -> None:
    from rad.models.convert import read_conversion_record
    from rad.models.info import format_info, model_info
    from rad.models.loading import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    info = model_info(loaded.model)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return
    record = read_conversion_record(loaded.path) if loaded.path else None
    print(format_info(info, record))


def _cmd_generate(args: argparse.Namespace) -> None:
    from rad.decoding.generate import generate_text
    from rad.decoding.speculative import DraftConfig, SamplingConfig
    from rad.models.layers import parse_layers
    from rad.models.loading import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    skip = None
    if args.speculative:
        if args.skip is None:
            raise RadError("--speculative needs --skip LAYERS (the attention layers the draft skips).")
        skip = parse_layers(args.skip, loaded.model.config.num_hidden_layers)
    result = generate_text(
        loaded,
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        skip_layers=skip,
        draft=DraftConfig(max_draft=args.max_draft, adaptive=not args.fixed_draft),
        sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
        compare=args.speculative,
    )
    print(result.text)
    d = result.decoding
    logger.info("%d new tokens in %.2f s (%.1f tokens/s)", result.new_tokens, d.seconds, d.tokens_per_second)
    if result.baseline is not None:
        logger.info(
            "speculative: %.1f tok/s vs plain %.1f tok/s (speed-up %.2fx); %d rounds, acceptance %.0f%%, "
            "%.2f draft tokens accepted per round",
            d.tokens_per_second, result.baseline.tokens_per_second, result.speedup, d.rounds,
            100 * d.acceptance_rate, d.mean_accepted,
        )


def _parse_keep(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise RadError(f"Bad --keep {text!r}: expected comma-separated layer indices like 0,29.") from None


def _cmd_search(args: argparse.Namespace) -> None:
    from pathlib import Path

    import optuna

    from rad.search import SearchConfig, compare_objectives, read_prompt_file, run_search

    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # rad logs each evaluation itself
    config = SearchConfig(
        k=args.k,
        ratio=args.ratio,
        objective=args.objective,
        trials=args.trials,
        sampler=args.sampler,
        seed=args.seed,
        keep=_parse_keep(args.keep),
        prompts=read_prompt_file(args.prompts) if args.prompts else None,
        max_new_tokens=args.max_new_tokens,
        max_draft=args.max_draft,
        adaptive=args.adaptive,
        repeats=args.repeats,
        out=args.out,
        resume=args.resume,
        baselines=args.baselines,
        heartbeat_seconds=args.heartbeat,
    )
    if args.compare_objectives:
        comparison = compare_objectives(args.model, config, masks=args.compare_objectives, device=args.device,
                                        dtype=args.dtype)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "objective_comparison.json").write_text(json.dumps(comparison.__dict__, indent=2) + "\n")
        for pair, rho in comparison.spearman.items():
            print(f"Spearman {pair}: {rho:.3f} over {len(comparison.masks)} masks")
        print(f"Saved to {out / 'objective_comparison.json'}")
        return
    result = run_search(args.model, config, device=args.device, dtype=args.dtype)
    print(f"Chosen layers ({result.k} of {result.num_layers}, {result.objective} = {result.value:.4g}, "
          f"{result.chosen_from}): {','.join(map(str, result.layers))}")
    for b in result.baselines:
        print(f"  baseline {b.name:<20} {b.value:.4g}  ({','.join(map(str, b.layers))})")
    print(f"{result.evaluations} masks measured; saved to {result.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rad", description="Redundancy-Aware Distillation toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda, else fp32)")

    p = sub.add_parser("convert", help="replace the attention of some layers by Mamba2 mixers")
    p.add_argument("model", help="alias (smollm2-135m), local folder, .gguf file or hub id")
    p.add_argument("--layers", default=None, help="'3,7,11', 'uniform:K', 'first:K' or 'last:K'")
    p.add_argument("--layers-from", default=None, metavar="DIR",
                   help="take the layers a `rad search` chose (DIR/search.json) instead of --layers")
    p.add_argument("--init", default="rad", choices=["rad", "mil", "random"])
    p.add_argument("--out", required=True, help="output folder for the hybrid checkpoint")
    p.add_argument("--chunk-size", type=int, default=None, help="Mamba2 scan chunk (default: 256 cuda, 64 cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    common(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("search", help="find the attention layers whose skip the model minds least (RAD step 1)")
    p.add_argument("model", help="alias (smollm2-135m), local folder, .gguf file or hub id")
    p.add_argument("--k", type=int, default=None, help="attention layers to skip (or give --ratio)")
    p.add_argument("--ratio", type=float, default=None, help="skip round(ratio x layers) layers")
    p.add_argument("--objective", default="throughput", choices=["throughput", "acceptance", "agreement"])
    p.add_argument("--trials", type=int, default=60, help="distinct masks to measure (shared by all workers)")
    p.add_argument("--out", required=True, help="output folder: study.db, search.json, trials.csv, plots")
    p.add_argument("--sampler", default="gp", choices=["gp", "tpe", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default="", help="layers never skipped, e.g. 0,29")
    p.add_argument("--prompts", default=None, help="prompt file: one per line, or jsonl with a \"prompt\" field")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-draft", type=int, default=8, help="draft tokens per speculative round at most")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="adaptive draft stop threshold (Draft & Verify)")
    p.add_argument("--repeats", type=int, default=3, help="throughput: timed repeats per mask (median)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out, or join it as a worker")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure uniform, first-k, last-k, random-k and single-layer importance")
    p.add_argument("--heartbeat", type=int, default=10,
                   help="seconds between worker heartbeats; a worker silent for twice this is presumed dead")
    p.add_argument("--compare-objectives", type=int, default=0, metavar="N",
                   help="instead of searching: measure N random masks with every objective, report Spearman")
    common(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("info", help="layer map, parameter counts and cache bytes per token")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding; prints the speed-up")
    p.add_argument("--skip", default=None, help="attention layers the draft skips, e.g. 3,7,11 or uniform:8")
    p.add_argument("--max-draft", type=int, default=8, help="most draft tokens per round")
    p.add_argument("--fixed-draft", action="store_true", help="always draft --max-draft tokens (no adaptive stop)")
    common(p)
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="rad: %(message)s")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        args.func(args)
    except RadError as err:
        logger.error("error: %s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
