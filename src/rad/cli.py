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

    result = convert_model(
        args.model,
        args.layers,
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
    from rad.models.loading import load_model

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    result = generate_text(
        loaded,
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(result.text)
    logger.info("%d new tokens in %.2f s (%.1f tokens/s)", result.new_tokens, result.seconds, result.tokens_per_second)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rad", description="Redundancy-Aware Distillation toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library warnings and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda, else fp32)")

    p = sub.add_parser("convert", help="replace the attention of some layers by Mamba2 mixers")
    p.add_argument("model", help="alias (smollm2-135m), local folder, .gguf file or hub id")
    p.add_argument("--layers", required=True, help="'3,7,11', 'uniform:K', 'first:K' or 'last:K'")
    p.add_argument("--init", default="rad", choices=["rad", "mil", "random"])
    p.add_argument("--out", required=True, help="output folder for the hybrid checkpoint")
    p.add_argument("--chunk-size", type=int, default=None, help="Mamba2 scan chunk (default: 256 cuda, 64 cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    common(p)
    p.set_defaults(func=_cmd_convert)

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
