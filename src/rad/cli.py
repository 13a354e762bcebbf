"""The `rad` command: each subcommand is a thin shell over one documented Python function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rad.errors import RadError, TimeLimitReached

logger = logging.getLogger("rad")


def _cmd_convert(args: argparse.Namespace) -> None:
    from rad.models.convert import convert_model
    from rad.models.info import format_info, model_info

    if (args.layers is None) == (args.layers_from is None):
        raise RadError("Give the layers to convert with either --layers or --layers-from DIR (one of them).")
    if args.layers_from is not None:
        from rad.outputs import check_apart
        from rad.search import read_chosen_layers

        layers = read_chosen_layers(args.layers_from)  # a bad search folder is named first
        check_apart(Path(args.out), [("search folder", args.layers_from)])
    else:
        layers = args.layers
    result = convert_model(
        args.model,
        layers,
        args.out,
        init=args.init,
        n_groups=args.n_groups,
        d_state=args.d_state,
        chunk_size=args.chunk_size,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    record = result.record
    print(f"Converted {len(record.converted_layers)} of {record.num_layers} layers of {record.source_model} "
          f"to Mamba2 ({record.init} init): {','.join(map(str, record.converted_layers)) or 'none'}")
    print(format_info(model_info(result.hybrid), record))
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


def _cmd_export(args: argparse.Namespace) -> None:
    from rad.export import ExportConfig, export

    result = export(ExportConfig(model=args.model, out=args.out, format=args.format, type=args.type,
                                 overwrite=args.overwrite, tokenizer_gguf=args.tokenizer_gguf,
                                 tensor_parallel_size=args.tensor_parallel_size))
    print(result.path)


def _generate_llama_cpp(args: argparse.Namespace) -> None:
    from rad.export.llama_cpp import generate_gguf

    if args.speculative:
        raise RadError("--speculative runs on rad's own engine only; leave out --engine llama.cpp.")
    result = generate_gguf(args.model, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(result.text)
    logger.info("llama.cpp: %d new tokens in %.2f s (%.1f tokens/s)", result.new_tokens, result.seconds,
                result.tokens_per_second)


def _cmd_generate(args: argparse.Namespace) -> None:
    from rad.decoding.generate import generate_text
    from rad.decoding.speculative import DraftConfig, SamplingConfig
    from rad.models.layers import parse_layers
    from rad.models.loading import load_model

    if args.engine == "llama.cpp":
        return _generate_llama_cpp(args)
    draft = DraftConfig(max_draft=args.max_draft, adaptive=not args.fixed_draft)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.speculative:
        if args.skip is None:
            raise RadError("--speculative needs --skip LAYERS (the attention layers the draft skips).")
        parse_layers(args.skip, 1 << 30, allow_empty=False)  # syntax before loading; the range after
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    skip = None
    if args.speculative:
        skip = parse_layers(args.skip, loaded.model.config.num_hidden_layers, allow_empty=False)
    result = generate_text(
        loaded,
        args.prompt,
        chat=args.chat,
        max_new_tokens=args.max_new_tokens,
        skip_layers=skip,
        draft=draft,
        sampling=sampling,
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


def _parse_tried(text: str) -> list[int]:
    """A `--try` mask: comma-separated layers, or a search folder whose chosen layers are tried."""
    if Path(text).is_dir():
        from rad.search.report import SearchResult

        return list(SearchResult.load(text).layers)
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise RadError(f"Bad --try {text!r}: expected comma-separated layer indices like 4,7,18,22, or a search "
                       "folder (its chosen layers are tried).")
    return layers


def _cmd_search(args: argparse.Namespace) -> None:
    from rad.outputs import SEARCH, check_output
    from rad.search import SearchConfig, compare_objectives, read_prompt_file, run_search
    from rad.utils.atomic import atomic_write_json

    _quiet_optuna(args)
    check_output(args.out, SEARCH, inputs=[("model", args.model), ("prompt file", args.prompts),
                                            ("aligned hybrid", args.aligned)])
    if args.compare_objectives < 0:
        raise RadError(f"--compare-objectives must be a number of masks (at least 1), got {args.compare_objectives}.")
    config = SearchConfig(
        k=args.k,
        ratio=args.ratio,
        objective=args.objective,
        trials=args.trials,
        sampler=args.sampler,
        seed=args.seed,
        keep=_parse_keep(args.keep),
        try_first=[_parse_tried(text) for text in args.try_first],
        prompts=read_prompt_file(args.prompts) if args.prompts else None,
        recall_length=args.recall,
        max_new_tokens=args.max_new_tokens,
        max_draft=args.max_draft,
        adaptive=args.adaptive,
        repeats=args.repeats,
        out=args.out,
        resume=args.resume,
        baselines=args.baselines,
        heartbeat_seconds=args.heartbeat,
        aligned=args.aligned,
        storage=args.storage,
        study_name=args.study,
    )
    if args.compare_objectives:
        comparison = compare_objectives(args.model, config, masks=args.compare_objectives, device=args.device,
                                        dtype=args.dtype)
        out = Path(args.out)
        atomic_write_json(out / "objective_comparison.json", comparison.__dict__)
        for pair, rho in comparison.spearman.items():
            print(f"Spearman {pair}: {rho:.3f} over {len(comparison.masks)} masks")
        print(f"Saved to {out / 'objective_comparison.json'}")
        return
    config.validate()
    result = run_search(args.model, config, device=args.device, dtype=args.dtype)
    print(f"Chosen layers ({result.k} of {result.num_layers}, {result.objective} = {result.value:.4g}, "
          f"{result.chosen_from}): {','.join(map(str, result.layers))}")
    for b in result.baselines:
        print(f"  baseline {b.name:<20} {b.value:.4g}  ({','.join(map(str, b.layers))})")
    print(f"{result.evaluations} masks measured; saved to {result.out}")


def _given(**values):
    """Only the flags the user set: every default stays with the stage's config dataclass."""
    return {k: v for k, v in values.items() if v is not None}


def _cmd_distill(args: argparse.Namespace) -> None:
    from rad.distill import DataConfig, DistillConfig, LossWeights, run_distill

    loss = None  # the stage's default for self-distillation or a separate teacher
    weights = _given(kl=args.kl_weight, ce=args.ce_weight, align=args.align_weight, temperature=args.temperature,
                     chunk=args.loss_chunk)
    if weights:
        default = DistillConfig(hybrid=args.hybrid, out="", teacher=args.teacher).loss
        loss = LossWeights(**{**vars(default), **weights})
    config = DistillConfig(
        hybrid=args.hybrid,
        out=args.out,
        teacher=args.teacher,
        train=args.train,
        data=DataConfig(
            spec=args.data, split=args.split, prompt_field=args.prompt_field, response_field=args.response_field,
            pack=args.pack, mask_prompt=args.mask_prompt, eval_examples=args.eval_examples,
            max_examples=args.max_examples, seed=args.seed, **_given(seq_len=args.seq_len),
        ),
        loss=loss,
        resume=args.resume,
        share_weights=args.share_weights,
        gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        progress=not args.no_progress,
        **_given(steps=args.steps, micro_batch=args.micro_batch, grad_accum=args.grad_accum, lr=args.lr,
                 weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, max_grad_norm=args.max_grad_norm,
                 mixer_norm_lr_scale=args.mixer_norm_lr_scale, eval_every=args.eval_every,
                 eval_sequences=args.eval_sequences, save_every=args.save_every,
                 keep_checkpoints=args.keep_checkpoints),
    )
    result = run_distill(config)
    if result.summary is not None:
        final = result.summary.final_eval
        kl, agreement = (final.eval_kl, final.eval_top1_agreement) if final else (float("nan"), float("nan"))
        print(f"Distilled {result.steps} steps ({config.train}); held-out KL {kl:.4f}, top-1 agreement "
              f"{agreement:.3f}")
        print(f"Student saved to {result.student_dir}; logs and curves in {result.out}")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise RadError(f"Bad {flag} {text!r}: expected comma-separated whole numbers like 1024,4096.") from None


def _cmd_eval(args: argparse.Namespace) -> None:
    from rad.evaluate import EvalConfig, SandboxLimits, TeacherConfig, evaluate_models
    from rad.evaluate.passkey import PasskeyConfig
    from rad.outputs import EVAL, check_output

    for flag, value in (("--exec-timeout", args.exec_timeout), ("--teacher-texts", args.teacher_texts),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and not 0 < value < float("inf"):
            raise RadError(f"{flag} must be a positive number, got {value}.")
    if args.n_shot < 0:
        raise RadError(f"--n-shot must be 0 or more, got {args.n_shot}.")
    check_output(args.out, EVAL, inputs=[*(("model", m) for m in args.models), ("teacher", args.teacher),
                                         ("data folder", args.data_dir)])
    shard, device = _eval_shard(args.shard, args.device)

    config = EvalConfig(
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        out=args.out,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        **_given(batch_size=args.batch_size),
        chat=args.chat,
        n_shot=args.n_shot,
        data_dir=args.data_dir,
        sandbox=SandboxLimits(timeout_s=args.exec_timeout),
        teacher=args.teacher,
        teacher_config=TeacherConfig(n_texts=args.teacher_texts),
        overwrite=args.overwrite,
        generation_dtype=args.generation_dtype,
        passkey=PasskeyConfig(lengths=_ints(args.passkey_lengths, "--passkey-lengths"),
                              depths=_ints(args.passkey_depths, "--passkey-depths"), repeats=args.passkey_repeats),
        position_length=args.position_loss,
        position_windows=args.position_windows,
        shard=shard,
    )
    results, table = evaluate_models(args.models, config, device=device, dtype=args.dtype)
    if not table:
        print(f"Shard {shard} done; the shard that finishes last writes {Path(args.out) / 'comparison.md'}")
        return
    print(table, end="")
    for r in results:
        print(f"Results for {r.model}: {r.folder / 'results.json'}")


def _eval_shard(given: str | None, device: str | None):
    """This process's shard (--shard, else the launcher's RANK/WORLD_SIZE) and device: under a launcher on GPUs,
    each process takes the GPU of its LOCAL_RANK unless --device names one."""
    import os

    from rad.evaluate.shards import Shard

    launched = Shard.from_launcher()
    if given is not None:
        if not launched.whole:
            raise RadError(f"--shard {given} was given inside a launcher that already splits the work (RANK "
                           f"{launched.index} of WORLD_SIZE {launched.count}); leave --shard out under accelerate "
                           "launch / torchrun.")
        return Shard.parse(given), device
    if not launched.whole and device is None:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return launched, device


def _cmd_data(args: argparse.Namespace) -> None:
    from rad.data import DATASETS, data_cache_dir, data_dir, fetch, find_rows, probe_hub

    hub = probe_hub()
    print(f"Data folder: {data_dir()}  (RAD_DATA_DIR)")
    print(f"Cache:       {data_cache_dir()}  (RAD_DATA_CACHE)")
    print(f"Hub:         {'reachable' if hub.online else 'offline'} ({hub.detail})")
    located = fetch(hub=hub) if args.fetch else {
        name: find_rows(name, sources=("file", "cache", "package"))[1] for name in DATASETS}
    for name, where in located.items():
        title = DATASETS[name].title
        if where.found:
            print(f"  {title:<12} {where.source:<8} {where.where}")
        else:
            print(f"  {title:<12} missing  {'; '.join(where.tried)}")
    missing = [DATASETS[n].title for n, w in located.items() if not w.found]
    if missing:
        hint = "run `rad data --fetch` where the hub is reachable" if not hub.online or not args.fetch else \
            "the hub did not serve them"
        print(f"Missing: {', '.join(missing)}; rad run skips tasks without data ({hint}, or put the files in "
              f"{data_dir()}).")


def _quiet_optuna(args: argparse.Namespace) -> None:
    """Optuna logs every trial with all 30 parameters; rad logs each evaluation in one line itself."""
    if not args.verbose:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)


def _cmd_run(args: argparse.Namespace) -> None:
    from rad.pipeline import load_run_config, run_pipeline

    _quiet_optuna(args)
    preset = args.preset if args.preset or args.config else "default"
    config = load_run_config(preset if not args.config or args.preset else None, args.config, args.set or [])
    if args.out:
        config.out = args.out
    report = run_pipeline(config)
    print(f"Report: {report}")


def _cmd_sweep(args: argparse.Namespace) -> None:
    from rad.sweep import load_sweep_config, run_sweep

    _quiet_optuna(args)
    overrides = list(args.set or [])
    if args.max_minutes is not None:
        overrides.append(f"max_minutes={args.max_minutes}")
    config = load_sweep_config(args.preset or (None if args.config else "claims"), args.config, overrides)
    if args.out:
        config.out = args.out
    print(f"Report: {run_sweep(config)}")


def _cmd_ablate(args: argparse.Namespace) -> None:
    from rad.ablate import load_ablate_config, run_ablation

    _quiet_optuna(args)
    preset = args.preset if args.preset or args.config else "default"
    overrides = list(args.set or [])
    if args.searched_from:
        overrides.append(f"searched_from={json.dumps(args.searched_from)}")
    config = load_ablate_config(preset if not args.config or args.preset else None, args.config, overrides)
    if args.out:
        config.out = args.out
    result = run_ablation(config)
    s = result.summary
    print(f"Baseline {s.baseline}: final held-out KL {s.baseline_final_kl:.4g} "
          f"(first reached at step {s.baseline_steps})")
    for name in s.order:
        a = s.arms[name]
        steps = "never" if a.steps_to_baseline_kl is None else f"step {a.steps_to_baseline_kl}"
        speed = f", {a.speedup:.2f}x" if a.speedup is not None else ""
        same = f" (same as {a.same_as})" if a.same_as else ""
        print(f"  {name:<22} final KL {a.final_kl:.4g}, baseline KL reached: {steps}{speed}{same}")
    print(f"Report: {result.report}")


def _d_state(text: str) -> int | str:
    """--d-state as models/mixers/mamba2.py reads it; a bad value is a usage error (exit 2, before any work)."""
    from rad.models.mixers.mamba2 import parse_d_state

    try:
        return parse_d_state(text)
    except RadError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# ---------------------------------------------------------------- rad align (one block: command and its flags)


def _cmd_align(args: argparse.Namespace) -> None:
    from rad.align import AlignConfig, run_align
    from rad.align.config import DEFAULT_DATA, DEFAULT_SEQ_LEN
    from rad.distill import DataConfig

    config = AlignConfig(
        hybrid=args.hybrid, out=args.out, teacher=args.teacher, cache=args.cache, precision=args.precision,
        resume=args.resume, device=args.device, seed=args.seed, progress=not args.no_progress,
        kl_eval=not args.no_kl, tensorboard=not args.no_tensorboard,
        data=DataConfig(spec=args.data or DEFAULT_DATA, seq_len=args.seq_len or DEFAULT_SEQ_LEN,
                        eval_examples=args.eval_examples, max_examples=args.max_examples, seed=args.seed),
        **_given(steps=args.steps, epochs=args.epochs, batch=args.batch, lr=args.lr, warmup_ratio=args.warmup_ratio,
                 min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                 eval_sequences=args.eval_sequences, save_every=args.save_every,
                 keep_checkpoints=args.keep_checkpoints),
    )
    result = run_align(config)
    first, final = result.summary.first_eval, result.summary.final_eval
    if first is not None and final is not None:
        kl = f"; held-out KL {first.eval_kl:.4f} -> {final.eval_kl:.4f}" if final.eval_kl is not None \
            and first.eval_kl is not None else ""
        print(f"Aligned {len(result.summary.layers)} mixers in {result.steps} steps: held-out relative error "
              f"{first.mean_relative_error:.4f} -> {final.mean_relative_error:.4f}{kl}")
    print(f"Aligned hybrid saved to {result.student_dir} (continue with `rad distill {result.student_dir}`)")


def _add_align_parser(sub) -> None:
    from rad.align.config import AlignSettings
    from rad.align.precision import PRECISIONS
    from rad.config import default_of

    def d(name):
        return default_of(AlignSettings, name)

    p = sub.add_parser("align", help="train each new mixer to reproduce the attention it replaced, layer-locally "
                                     "(before distillation)")
    p.add_argument("hybrid", help="a hybrid folder written by `rad convert`")
    p.add_argument("--out", required=True, help="output folder: checkpoints, logs, summary.json, student/")
    p.add_argument("--teacher", default=None, help="teacher model (default: the hybrid's source model)")
    p.add_argument("--data", default=None, help=f"as rad distill's --data (default: {d('data')})")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps per epoch (default {d('steps')})")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the first epoch's rows (default {d('epochs')})")
    p.add_argument("--cache", default=None, help="folder for the teacher's pairs, read by epochs after the first")
    p.add_argument("--batch", type=int, default=None, help=f"rows per step (default {d('batch')})")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per row (default {d('seq_len')})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d('lr')})")
    p.add_argument("--warmup-ratio", type=float, default=None, help=f"linear warm-up share of the steps (default {d('warmup_ratio')})")
    p.add_argument("--min-lr-ratio", type=float, default=None, help=f"cosine floor as a share of --lr (default {d('min_lr_ratio')})")
    p.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping per mixer (default 1.0)")
    p.add_argument("--precision", default=d("precision"), choices=list(PRECISIONS),
                   help="teacher pass precision (auto: bf16 on CUDA or a CPU with AVX512-BF16/AMX)")
    p.add_argument("--eval-examples", type=int, default=None, help="records held out (default: 2%%)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="held-out relative error every N steps too")
    p.add_argument("--eval-sequences", type=int, default=None, help=f"held-out sequences (default {d('eval_sequences')})")
    p.add_argument("--no-kl", action="store_true", help="skip the held-out KL at the start and the end")
    p.add_argument("--save-every", type=int, default=None, help=f"checkpoint interval (default {d('save_every')})")
    p.add_argument("--keep-checkpoints", type=int, default=None,
                   help=f"newest checkpoints kept, 0 = all (default {d('keep_checkpoints')})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-tensorboard", action="store_true", help="JSONL log only")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=_cmd_align, dtype=None)  # the hybrid trains in float32; the teacher follows --precision


def build_parser() -> argparse.ArgumentParser:
    # The choices come from the modules that own them (importing them costs the torch import, which every
    # command but `rad data` pays anyway).
    # Defaults and the defaults named in help are read from the settings classes (`default_of`), so changing
    # a default in its class changes the flag and its help.
    from rad.config import default_of
    from rad.decoding.speculative import DraftConfig, SamplingConfig
    from rad.distill import DEFAULT_LR, DataConfig, DistillConfig, LossWeights
    from rad.distill.modules import TRAIN_CHOICES
    from rad.evaluate import EvalConfig, SandboxLimits, TeacherConfig
    from rad.evaluate.passkey import PasskeyConfig
    from rad.evaluate.tasks import TASKS
    from rad.export.config import FORMATS, ExportConfig
    from rad.export.config import TYPES as GGUF_TYPES
    from rad.models.convert import ConversionConfig
    from rad.models.mixers import INITS
    from rad.search.config import OBJECTIVES, SAMPLERS, SearchConfig

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
    p.add_argument("--init", default=default_of(ConversionConfig, "init"), choices=INITS)
    p.add_argument("--out", required=True, help="output folder for the hybrid checkpoint")
    p.add_argument("--n-groups", default=None, metavar="{heads,kv,N}",
                   help="SSM groups per mixer: one per attention head (what --init mil needs), one per key/value "
                        "head, or a number dividing the heads (default: the init's: kv for rad, heads otherwise)")
    p.add_argument("--d-state", type=_d_state, default=None, metavar="{head_dim,half,N}",
                   help="SSM state size per group: the attention head size, half of it, or a number (default: the "
                        "init's with its default groups, half the head size for rad; the head size otherwise)")
    p.add_argument("--chunk-size", type=int, default=None, help="Mamba2 scan chunk (default: 256 cuda, 64 cpu)")
    p.add_argument("--seed", type=int, default=default_of(ConversionConfig, "seed"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    common(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("search", help="find the attention layers whose skip the model minds least (RAD step 1)")
    p.add_argument("model", help="alias (smollm2-135m), local folder, .gguf file or hub id")
    p.add_argument("--k", type=int, default=None, help="attention layers to skip (or give --ratio)")
    p.add_argument("--ratio", type=float, default=None, help="skip round(ratio x layers) layers")
    p.add_argument("--objective", default=SearchConfig.objective, choices=OBJECTIVES)
    p.add_argument("--trials", type=int, default=default_of(SearchConfig, "trials"),
                   help="distinct masks to measure (shared by all workers)")
    p.add_argument("--out", required=True, help="output folder: study.db, search.json, trials.csv, plots")
    p.add_argument("--sampler", default=SearchConfig.sampler, choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=default_of(SearchConfig, "seed"))
    p.add_argument("--keep", default="", help="layers never skipped, e.g. 0,29")
    p.add_argument("--try", dest="try_first", action="append", default=[], metavar="LAYERS",
                   help="a mask measured before the sampler's own (repeatable): k layers such as 4,7,18,22, or a "
                        "search folder whose choice is tried; it counts against --trials")
    p.add_argument("--prompts", default=None, help="prompt file: one per line, or jsonl with a \"prompt\" field")
    p.add_argument("--recall", type=int, default=None, metavar="LENGTH",
                   help="prompts: passkey haystacks of LENGTH tokens (a key at 0-100%% depth) instead of chats, so "
                        "the search keeps the layers long-context retrieval needs; with an agreement objective, "
                        "masks that recall equally are ranked by their agreement after the built-in chats "
                        "(docs/search.md)")
    p.add_argument("--max-new-tokens", type=int, default=default_of(SearchConfig, "max_new_tokens"))
    p.add_argument("--max-draft", type=int, default=default_of(SearchConfig, "max_draft"),
                   help="draft tokens per speculative round at most")
    p.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=default_of(SearchConfig, "adaptive"),
                   help="adaptive draft stop threshold (Draft & Verify)")
    p.add_argument("--repeats", type=int, default=default_of(SearchConfig, "repeats"),
                   help="throughput: timed repeats per mask (median)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out, or join it as a worker")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=default_of(SearchConfig, "baselines"),
                   help="also measure uniform, first-k, last-k, random-k and single-layer importance")
    p.add_argument("--heartbeat", type=int, default=default_of(SearchConfig, "heartbeat_seconds"),
                   help="seconds between worker heartbeats; a worker silent for twice this is presumed dead")
    p.add_argument("--storage", default=default_of(SearchConfig, "storage"), metavar="URL",
                   help="keep the study in this database (postgresql://user:pw@host/db, mysql://..., sqlite:///f.db) "
                        "so that workers on other hosts join it with --resume; default: --out/study.db")
    p.add_argument("--study", default=default_of(SearchConfig, "study_name"), metavar="NAME",
                   help="the study's name in --storage (one database holds many studies)")
    p.add_argument("--aligned", default=None, metavar="DIR",
                   help="hybrid-agreement: a `rad align` output (or hybrid) with a mixer for every candidate layer; "
                        "the search then scores the hybrid those mixers make instead of the skip-draft")
    p.add_argument("--compare-objectives", type=int, default=0, metavar="N",
                   help="instead of searching: measure N random masks with every objective, report Spearman")
    common(p)
    p.set_defaults(func=_cmd_search)

    p = sub.add_parser("run", help="the whole RAD pipeline: search, convert, distil, evaluate, report")
    p.add_argument("--preset", default=None, help="smoke (< 3 min), default (~20 min on 2 CPU cores), paper (GPUs)")
    p.add_argument("--config", default=None, help="a YAML run config (on top of --preset, if given)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting, e.g. distill.steps=10")
    p.add_argument("--out", default=None, help="run folder (default: from the config)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("sweep", help="rad run at several k (layers replaced): accuracy against k and against cache "
                                     "bytes, paired tests of RAD vs baseline vs teacher")
    p.add_argument("--preset", default=None, help="claims (Qwen2.5-Coder-0.5B, k = 4, 8, 12: hours on 2 CPU cores; "
                                                  "docs/results.md) or smoke (minutes)")
    p.add_argument("--config", default=None, help="a YAML sweep config (on top of --preset, if given)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one setting, e.g. ks=[4,8]")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop before a stage or evaluation batch after this long (exit 75); rerun to continue")
    p.add_argument("--out", default=None, help="sweep folder (default: from the config)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("ablate", help="the paper's ablation: {searched, uniform} layers x {rad, mil} init x "
                                      "{mixers, all} trained; KL curves, steps to the baseline's KL, scores")
    p.add_argument("--preset", default=None,
                   help="smoke (a few minutes) or default (the small-scale run, hours on 2 CPU cores)")
    p.add_argument("--config", default=None, help="a YAML ablation config (on top of --preset, if given)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. distill.steps=10, inits=[rad], distill.lr.all=1e-4")
    p.add_argument("--searched-from", default=None, metavar="DIR",
                   help="take the searched layers from a finished `rad search` (DIR/search.json)")
    p.add_argument("--out", default=None, help="ablation folder (default: from the config)")
    p.set_defaults(func=_cmd_ablate)

    p = sub.add_parser("data", help="where each dataset is found (data folder, cache, hub, package); --fetch caches")
    p.add_argument("--fetch", action="store_true",
                   help="download every dataset not yet on this machine into the cache (needs the hub; "
                        "`make setup` runs this)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("info", help="layer map, parameter counts and cache bytes per token")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    common(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("model", help="alias, folder, .gguf file or hub id; with --engine llama.cpp, a GGUF from rad export")
    p.add_argument("--engine", default="rad", choices=["rad", "llama.cpp"],
                   help="rad's own decoder (torch) or llama.cpp on a GGUF (`make setup-serve`)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=default_of(SamplingConfig, "temperature"), help="0 = greedy")
    p.add_argument("--top-p", type=float, default=default_of(SamplingConfig, "top_p"))
    p.add_argument("--seed", type=int, default=default_of(SamplingConfig, "seed"))
    p.add_argument("--speculative", action="store_true", help="self-speculative decoding; prints the speed-up")
    p.add_argument("--skip", default=None, help="attention layers the draft skips, e.g. 3,7,11 or uniform:8")
    p.add_argument("--max-draft", type=int, default=default_of(DraftConfig, "max_draft"), help="most draft tokens per round")
    p.add_argument("--fixed-draft", action="store_true", help="always draft --max-draft tokens (no adaptive stop)")
    common(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="write a hybrid (or its teacher) as a GGUF file llama.cpp runs, or a vLLM folder")
    p.add_argument("model", help="a hybrid folder (rad convert / rad distill), or a plain model: alias, folder, .gguf")
    p.add_argument("--out", required=True, help="the .gguf file to write (--format vllm: the folder)")
    p.add_argument("--format", default=default_of(ExportConfig, "format"), choices=FORMATS,
                   help="gguf: llama.cpp's granitehybrid file; vllm: a Bamba folder with its head written out")
    p.add_argument("--type", default=default_of(ExportConfig, "type"), choices=GGUF_TYPES,
                   help="matmul weights' type; norms, biases and the SSM's small tensors stay f32 (vllm: f32, bf16 "
                        "or f16 for every tensor)")
    p.add_argument("--tensor-parallel-size", type=int, default=default_of(ExportConfig, "tensor_parallel_size"),
                   metavar="N", help="vllm: check the folder against vLLM's shape rules on N GPUs")
    p.add_argument("--tokenizer-gguf", default=None, metavar="FILE",
                   help="copy the tokenizer from this GGUF (default: the GGUF the model came from, for rad's aliases)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (or vLLM folder)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("eval", help="score models on GSM8K / CRUXEval-O (resumable) and compare them")
    p.add_argument("models", nargs="+", help="one or more models: aliases, folders, .gguf files or hub ids")
    p.add_argument("--tasks", default=",".join(default_of(EvalConfig, "tasks")),
                   help=f"comma-separated: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (default: all)")
    p.add_argument("--out", default=default_of(EvalConfig, "out"),
                   help="folder for per-item files, results.json, comparison.md")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: " + ", ".join(f"{t.default_max_new_tokens} for {n}" for n, t in TASKS.items()))
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"prompts per left-padded batch (default {default_of(EvalConfig, 'batch_size')}; 1: rad's "
                        "fast engine, one prompt at a time)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=default_of(EvalConfig, "chat"),
                   help="use the chat template")
    p.add_argument("--n-shot", type=int, default=default_of(EvalConfig, "n_shot"),
                   help="GSM8K examples from the train split (default %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="folder with gsm8k_test.jsonl, cruxeval.jsonl (default ../shared/data)")
    p.add_argument("--exec-timeout", type=float, default=default_of(SandboxLimits, "timeout_s"),
                   help="seconds per CRUXEval sandboxed check")
    p.add_argument("--teacher", default=None, help="also report KL(teacher||model), perplexity, top-1 agreement")
    p.add_argument("--teacher-texts", type=int, default=default_of(TeacherConfig, "n_texts"),
                   help="held-out texts for the teacher metrics")
    p.add_argument("--overwrite", action="store_true", help="discard earlier per-item results instead of resuming")
    p.add_argument("--passkey-lengths", default=",".join(map(str, default_of(PasskeyConfig, "lengths"))),
                   help="passkey: context lengths in tokens")
    p.add_argument("--passkey-depths", default=",".join(map(str, default_of(PasskeyConfig, "depths"))),
                   help="passkey: where the key sits, in percent of the filler")
    p.add_argument("--passkey-repeats", type=int, default=default_of(PasskeyConfig, "repeats"),
                   help="passkey: items per length and depth (each its own key)")
    p.add_argument("--position-loss", type=int, default=0, metavar="LENGTH",
                   help="also measure loss against position on LENGTH-token windows of CPython's standard library "
                        "source (position_loss.json per model, position_loss.png); 0: off")
    p.add_argument("--position-windows", type=int, default=2, metavar="N", help="windows averaged (default 2)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="score only items I, I+N, ... (shard I of N, from 0); the shard that finishes last merges "
                        "the per-item files and writes results.json. Under accelerate launch / torchrun the shard is "
                        "the process's RANK/WORLD_SIZE")
    p.add_argument("--generation-dtype", default=None,
                   help="generate answers in this dtype; auto: bf16 where the device has fast bf16 (1.3x end to end on "
                        "AVX512-BF16 CPUs), else the model's own; bf16 is refused where it would be emulated; "
                        "teacher metrics keep the loaded --dtype")
    common(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("distill", help="train the new Mamba2 mixers against the teacher (RAD step 3)")
    p.add_argument("hybrid", help="a hybrid folder written by `rad convert`")
    p.add_argument("--teacher", default=None, help="teacher model (default: the hybrid's source: self-distillation)")
    p.add_argument("--data", default=None,
                   help="jsonl/json/parquet/txt file or folder, hub id[:config], or a name/mix: gsm8k, mbpp, "
                        "gsm8k+mbpp (default: GSM8K train)")
    p.add_argument("--split", default="train", help="hub dataset split")
    p.add_argument("--prompt-field", default=None)
    p.add_argument("--response-field", default=None)
    p.add_argument("--train", default="mixers", choices=TRAIN_CHOICES)
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps (default {default_of(DistillConfig, 'steps')})")
    p.add_argument("--out", required=True, help="output folder: checkpoints, logs, curves, student/")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per training row (default {default_of(DataConfig, 'seq_len')})")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True, help="pack sequences end to end")
    p.add_argument("--mask-prompt", action="store_true", help="count only response tokens in the loss")
    p.add_argument("--eval-examples", type=int, default=None, help=f"records held out (default: {default_of(DataConfig, 'eval_fraction'):.0%}%)")
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None, help=f"sequences per process per forward (default {default_of(DistillConfig, 'micro_batch')})")
    p.add_argument("--grad-accum", type=int, default=None, help=f"micro-batches per step (default {default_of(DistillConfig, 'grad_accum')})")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: " + ", ".join(f"{lr:g} for {train}"
                                                                    for train, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default {default_of(DistillConfig, 'weight_decay'):g})")
    p.add_argument("--warmup-ratio", type=float, default=None, help=f"linear warm-up share of the steps (default {default_of(DistillConfig, 'warmup_ratio'):g})")
    p.add_argument("--max-grad-norm", type=float, default=None, help=f"gradient clipping (default {default_of(DistillConfig, 'max_grad_norm')})")
    p.add_argument("--mixer-norm-lr-scale", type=float, default=None,
                   help="lr multiplier of the new mixers' gated-norm gains (default: 100 on a hybrid fresh from the "
                        "rad init, whose gains start at 0.1; else 1)")
    p.add_argument("--kl-weight", type=float, default=None, help=f"default {default_of(LossWeights, 'kl'):g}")
    p.add_argument("--ce-weight", type=float, default=None, help=f"default {default_of(LossWeights, 'ce'):g}")
    p.add_argument("--align-weight", type=float, default=None,
                   help="MSE between each new mixer and the attention it replaced (default 1 in "
                        "self-distillation, 0 with --teacher)")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"default {default_of(LossWeights, 'temperature'):g}")
    p.add_argument("--loss-chunk", type=int, default=None, help=f"positions per float32 logits chunk (default {default_of(LossWeights, 'chunk')})")
    p.add_argument("--eval-every", type=int, default=None, help=f"held-out evaluation interval (default {default_of(DistillConfig, 'eval_every')})")
    p.add_argument("--eval-sequences", type=int, default=None, help=f"held-out sequences (default {default_of(DistillConfig, 'eval_sequences')})")
    p.add_argument("--save-every", type=int, default=None, help=f"checkpoint interval (default {default_of(DistillConfig, 'save_every')})")
    p.add_argument("--keep-checkpoints", type=int, default=None,
                   help=f"newest checkpoints kept, 0 = all (default {default_of(DistillConfig, 'keep_checkpoints')})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--share-weights", action=argparse.BooleanOptionalAction, default=True,
                   help="self-distillation: the teacher uses the student's frozen tensors (one copy)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute precision; auto: bf16 where the device multiplies bf16 fast (CUDA with bf16, a CPU "
                        "with AVX512-BF16 or AMX), else fp32. What trains keeps fp32 weights and optimiser state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    common(p)
    p.set_defaults(func=_cmd_distill)
    _add_align_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="rad: %(message)s")
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        if hasattr(args, "device"):  # every model command: a bad device or dtype stops before any work
            from rad.utils.devices import resolve_device, resolve_dtype

            resolve_dtype(args.dtype, resolve_device(args.device))
        args.func(args)
    except RadError as err:
        logger.error("error: %s", err)
        return 2
    except TimeLimitReached as stop:
        logger.warning("%s", stop)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main())
