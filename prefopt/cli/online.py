"""The online-side commands (DESIGN §6): `prefopt rewards`, `sample`, `pairs`. Thin: parse, call, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from prefopt.cli._options import (
    add_reward_options,
    add_train_options,
    import_reward_modules,
    make_reward,
    parse_name_value,
    sample_settings,
)
from prefopt.errors import PrefoptError


def _cmd_rewards(args: argparse.Namespace) -> int:
    from prefopt.rewards import available_rewards, get_reward_spec

    import_reward_modules(args)
    for name in available_rewards():
        spec = get_reward_spec(name)
        columns = ", ".join(spec.columns) or "-"
        print(f"{name}\n  {spec.description}\n  arguments: {spec.describe_arguments()}\n  columns: {columns}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from prefopt.data.formats import load_prompts
    from prefopt.iterative.sample_job import progress_path, run_sample_job
    from prefopt.models.inference import load_for_inference

    settings = sample_settings(args)
    if Path(args.output).exists() and not args.overwrite:
        raise PrefoptError(f"{args.output} exists; choose another --output or pass --overwrite")
    if progress_path(args.output).exists() and not (args.resume or args.overwrite):
        raise PrefoptError(
            f"{args.output}: a stopped sampling job left {progress_path(args.output)}: pass --resume to continue "
            "it, or --overwrite to start again"
        )  # before any model loads
    prompts, report = load_prompts(args.prompts)
    if args.limit:
        prompts = prompts[: args.limit]
    if report.duplicates:
        print(f"prefopt: {report.duplicates} duplicate prompts dropped")
    reward = make_reward(args)
    model, tokenizer = load_for_inference(args.model, dtype=args.dtype)
    job = run_sample_job(
        model, tokenizer, args.model, prompts, settings, reward, args.output, args.resume, args.overwrite
    )
    stats, records = job["stats"], job["records"]
    kept = f"; {job['resumed']} prompts kept from the stopped job" if job["resumed"] else ""
    finished = sum(sum(r["finished"]) for r in records)
    print(
        f"prefopt: {sum(len(r['completions']) for r in records)} completions of {len(records)} prompts, "
        f"{finished} ended with EOS -> {args.output} (sampled {stats.prompts} prompts in {stats.seconds:.1f}s, "
        f"{stats.tokens_per_s:.0f} completion tokens/s{kept})"
    )
    warning = stats.empty_warning(chat_model=bool(getattr(tokenizer, "chat_template", None)))
    if warning:
        print(f"prefopt: warning: {warning}")
    if reward is not None:
        scores = [r for record in records for r in record["rewards"]]
        scored = [r for r in scores if r is not None]
        mean = sum(scored) / len(scored) if scored else float("nan")
        unscorable = len(scores) - len(scored)
        print(f"prefopt: reward {reward.name}: mean {mean:.4f} over {len(scored)}, {unscorable} unscorable (dropped)")
    return 0


def _cmd_pairs(args: argparse.Namespace) -> int:
    from prefopt.iterative import pairs
    from prefopt.models.rollout import write_jsonl

    if Path(args.output).exists() and not args.overwrite:
        raise PrefoptError(f"{args.output} exists; choose another --output or pass --overwrite")
    if sum(map(bool, (args.unpaired, args.best_of_n, args.against, args.refine_with))) > 1:
        raise PrefoptError("choose one of --unpaired, --best-of-n, --against and --refine-with")
    if args.unpaired and args.threshold is None:
        raise PrefoptError("--unpaired needs --threshold X (reward >= X is desirable)")
    if args.sft_output and not args.refine_with:
        raise PrefoptError("--sft-output goes with --refine-with (for SFT data of sampled answers: --best-of-n)")
    if args.refine_with:
        return _refine_pairs(args)
    reward = make_reward(args)
    pairwise = bool(args.against) and reward is not None and reward.compare is not None
    samples = pairs.read_samples(args.samples, need_rewards=reward is None and not pairwise)
    if reward is not None and not pairwise:
        pairs.rescore(samples, reward)
    what = "pairs"
    if args.unpaired:
        records, report = pairs.select_unpaired(samples, args.threshold)
        what = "KTO examples"
    elif args.best_of_n:
        records, report = pairs.select_best_of_n(samples, args.threshold)
        what = "best-of-N SFT examples"
    elif args.against:
        is_file = Path(args.against).is_file()
        references = (pairs.references_from_file if is_file else pairs.reference_column)(samples, args.against)
        records, report = pairs.battle(samples, references, reward, args.min_margin)
    else:
        records, report = pairs.select_pairs(samples, args.selection, args.min_margin, args.seed)
    for note in report.notes[:5]:
        print(f"prefopt: {note}")
    if not records:
        raise PrefoptError(f"no {what} written: {report.why_empty(what)}")
    write_jsonl(args.output, records, overwrite=args.overwrite)
    print(f"prefopt: {report.summary(what)} -> {args.output}")
    return 0


def _refine_pairs(args: argparse.Namespace) -> int:
    """`prefopt pairs --refine-with MODEL`: the refiner's corrections chosen over the sampled answers."""
    from prefopt.iterative import pairs, refine
    from prefopt.models.inference import load_for_inference
    from prefopt.models.rollout import SampleSettings, write_jsonl

    if args.sft_output and Path(args.sft_output).exists() and not args.overwrite:
        raise PrefoptError(f"{args.sft_output} exists; choose another --sft-output or pass --overwrite")
    template = refine.REFINE_TEMPLATE
    if args.refine_template:
        if not Path(args.refine_template).is_file():
            raise PrefoptError(f"{args.refine_template}: no such template file")
        template = Path(args.refine_template).read_text(encoding="utf-8")
    reward = make_reward(args)
    samples = pairs.read_samples(args.samples, need_rewards=args.threshold is not None and reward is None)
    if reward is not None:
        pairs.rescore(samples, reward)
    refine.check_template(template, {name for s in samples for name in s.columns})  # before a model loads
    model, tokenizer = load_for_inference(args.refine_with)
    settings = SampleSettings(
        num_samples=1, max_new_tokens=args.refine_max_new_tokens, temperature=0.0, batch_size=args.refine_batch_size
    )
    generate = refine.refiner_generate(model, tokenizer, settings, template)
    records, sft, report = refine.refine(samples, generate, template, args.threshold, reward)
    if not records:
        raise PrefoptError(f"no refinement pairs written: {report.why_empty()}")
    write_jsonl(args.output, records, overwrite=args.overwrite)
    print(f"prefopt: {report.summary()} -> {args.output}")
    if args.sft_output:
        write_jsonl(args.sft_output, sft, overwrite=args.overwrite)
        print(f"prefopt: {report.sft_written} SFT examples of the refinements -> {args.sft_output}")
    return 0


def _cmd_iterate(args: argparse.Namespace) -> int:
    """defaults < YAML (--config: training keys and loop keys together) < flags."""
    from prefopt.config import FIELDS, ConfigError, build_config
    from prefopt.iterative.iterate import ITERATE_KEYS, IterateSettings, format_table, iterate

    given = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
    raw = load_yaml_mapping(args.config) if getattr(args, "config", None) else {}
    unknown = sorted(set(raw) - ITERATE_KEYS - set(FIELDS))
    if unknown:
        raise ConfigError(f"{args.config}: unknown key '{unknown[0]}' (neither a training nor a loop setting)")
    loop = {k: v for k, v in raw.items() if k in ITERATE_KEYS}
    for name in ITERATE_KEYS & set(given):
        value = given.pop(name)
        loop[name] = {**(loop.get(name) or {}), **dict(value)} if name == "reward_args" else value
    if "loss_args" in given:
        given["loss_args"] = dict(given["loss_args"])
    config = build_config({k: v for k, v in raw.items() if k not in ITERATE_KEYS}, given)
    settings = IterateSettings(**loop)
    print(format_table(iterate(settings, config), settings.reward))
    return 0


def load_yaml_mapping(path: str) -> dict:
    import yaml

    from prefopt.config import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return values


def _add_sample_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model folder, the alias, or a run's final/")
    parser.add_argument("--num-samples", type=int, default=4, help="completions per prompt (N)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per completion at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same samples)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--max-prompt-length", type=int, default=None, help="keep the last N prompt tokens")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")


def add_commands(commands) -> None:
    """Add the online-side subcommands to `prefopt`'s subparsers."""
    rewards = commands.add_parser("rewards", help="list registered rewards, their arguments and columns")
    rewards.add_argument("--reward-module", action="append", default=[], help="import this module first")
    rewards.set_defaults(run=_cmd_rewards)

    sample = commands.add_parser(
        "sample",
        help="sample N completions per prompt (prompt prefilled once), optionally scored by a reward",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sample.add_argument("--prompts", required=True, nargs="+", help="prompt-only or preference files")
    sample.add_argument("--output", required=True, help="samples file (.jsonl) to write")
    _add_sample_options(sample)
    add_reward_options(sample)
    sample.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    sample.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    sample.add_argument(
        "--resume", action="store_true", help="continue a stopped job (its .OUTPUT.partial) without redoing its batches"
    )
    sample.add_argument(
        "--no-shared-prefill", action="store_true", help="plain generate(num_return_sequences=N), for comparison"
    )
    sample.set_defaults(run=_cmd_sample)

    from prefopt.iterative.pairs import SELECTIONS

    pairs = commands.add_parser(
        "pairs",
        help="scored samples -> preference pairs, KTO data (--unpaired), SFT data (--best-of-n), arena battles",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pairs.add_argument("--samples", required=True, nargs="+", help="samples files from prefopt sample")
    pairs.add_argument("--output", required=True, help="file (.jsonl) to write")
    pairs.add_argument("--selection", default="best-worst", choices=SELECTIONS, help="which completions make pairs")
    pairs.add_argument("--min-margin", type=float, default=0.0, help="drop pairs whose reward gap is smaller")
    pairs.add_argument("--seed", type=int, default=0, help="for best-random")
    pairs.add_argument(
        "--unpaired", action="store_true", help="KTO data: every completion, label = reward >= threshold"
    )
    pairs.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="desirable from this reward on; with --refine-with: refine only the completions below it",
    )
    pairs.add_argument(
        "--best-of-n", action="store_true", help="SFT data: each prompt's best completion (rejection sampling)"
    )
    pairs.add_argument(
        "--against",
        default=None,
        metavar="COLUMN|FILE",
        help="battle each sample against a reference answer (a column, or another model's samples file); "
        "the policy's losses become pairs, the stronger answer chosen",
    )
    pairs.add_argument(
        "--refine-with",
        default=None,
        metavar="MODEL",
        help="refinement pairs: MODEL corrects each sampled answer (those below --threshold, if given); "
        "its refinement is chosen, the original rejected",
    )
    pairs.add_argument(
        "--refine-template",
        default=None,
        metavar="FILE",
        help="the refiner's request: text with {prompt} and {response}",
    )
    pairs.add_argument("--refine-max-new-tokens", type=int, default=128, help="tokens per refinement at most")
    pairs.add_argument("--refine-batch-size", type=int, default=8, help="requests per generate call")
    pairs.add_argument("--sft-output", default=None, help="with --refine-with: also write the refinements as SFT data")
    add_reward_options(pairs)
    pairs.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    pairs.set_defaults(run=_cmd_pairs)

    loop = commands.add_parser(
        "iterate",
        help="online iterative DPO / rejection sampling: sample, score, pair, train, for --rounds rounds",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # --model, --loss, --output-dir, ... as for train; the loop's own sampling and reward flags below
    add_train_options(
        loop,
        skip=("reward", "reward_weights", "reward_args", "reward_module", "max_new_tokens", "temperature", "top_p"),
    )
    s = argparse.SUPPRESS
    loop.add_argument("--prompts", nargs="+", default=s, help="prompt-only or preference files")
    loop.add_argument("--reward", default=s, help="registered reward name")
    loop.add_argument(
        "--reward-arg", dest="reward_args", action="append", type=parse_name_value, default=s, metavar="NAME=VALUE"
    )
    loop.add_argument("--reward-module", action="append", default=s, help="import this .py file first")
    loop.add_argument("--rounds", type=int, default=s, help="rounds of sample, score, pair, train (default 2)")
    loop.add_argument("--num-samples", type=int, default=s, help="completions per prompt (default 4)")
    loop.add_argument("--max-new-tokens", type=int, default=s, help="tokens per completion (default 64)")
    loop.add_argument("--temperature", type=float, default=s, help="sampling temperature (default 1.0)")
    loop.add_argument("--top-p", type=float, default=s, help="nucleus mass (default 1.0)")
    loop.add_argument("--sample-batch-size", type=int, default=s, help="prompts per generate call (default 8)")
    loop.add_argument("--prompts-per-round", type=int, default=s, help="default: training prompts / rounds")
    loop.add_argument("--held-out", type=int, default=s, help="first N prompts: never trained on, scored greedily")
    loop.add_argument("--selection", default=s, help="best-worst | best-random | all | best-of-n (default best-worst)")
    loop.add_argument("--min-margin", type=float, default=s, help="drop pairs with a smaller reward gap")
    loop.add_argument("--threshold", type=float, default=s, help="best-of-n: keep the best from this reward on")
    loop.set_defaults(run=_cmd_iterate)
