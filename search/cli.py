"""The ``slimsearch`` command: run, setup, pareto."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimsearch.search.results_cli import add_commands
from slimsearch.search.study_file import StudyError, parse_duration


def _cmd_run(args: argparse.Namespace) -> int:
    from slimsearch.search.driver import run_study

    timeout = parse_duration(args.timeout, "--timeout") if args.timeout else None
    result = run_study(
        args.study,
        trials=args.trials,
        timeout_s=timeout,
        executor=args.executor,
        address=args.address,
        output=args.output,
    )
    if result.error:
        print(f"slimsearch: error: {result.error}", file=sys.stderr)
    return result.exit_code


def _cmd_setup(args: argparse.Namespace) -> int:
    from slimsearch.search import models, preflight
    from slimsearch.search.log import say
    from slimsearch.search.study_file import load_study

    spec = load_study(args.study)
    preflight.check_folder("cache", spec.cache)
    preflight.check_data(spec)
    preflight.check_model(spec)
    folder = models.prepare_baseline(spec)
    say(f"baseline ready: {folder}")
    return 0


def _cmd_pareto(args: argparse.Namespace) -> int:
    import optuna

    from slimsearch.search import pareto
    from slimsearch.search.driver import RUN_INFO
    from slimsearch.search.storage import open_for_reading

    info_path = Path(args.run) / RUN_INFO
    if not info_path.is_file():
        raise StudyError(
            f"{args.run}: not a slimsearch run folder (no {RUN_INFO}); give the study's output folder"
        )
    info = json.loads(info_path.read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=info["study_name"], storage=open_for_reading(info["storage"], info["url"])
    )
    baseline = dict(study.user_attrs.get("baseline", {}))
    rows = pareto.front_rows(study, info["objectives"], baseline)
    if args.sort:
        if rows and args.sort not in rows[0]:
            raise StudyError(f"--sort {args.sort!r}: choose a column of {list(rows[0])}")
        rows.sort(key=lambda r: r[args.sort], reverse=args.descending)
    if args.max_accuracy_drop is not None:
        rows = [r for r in rows if r.get("accuracy_drop", 0.0) <= args.max_accuracy_drop]
    print(pareto.format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimsearch", description="Per-layer compression search for Transformers"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run or resume a study")
    run.add_argument("study", help="study file (YAML), e.g. studies/minilm-sentiment.yaml")
    run.add_argument("--trials", type=int, help="total trials in the study (overrides budget.trials)")
    run.add_argument("--timeout", help="wall-time budget for this run, e.g. 8h, 15m, 90s")
    run.add_argument("--executor", choices=["ray", "inprocess"], help="where trials run")
    run.add_argument("--address", help="Ray cluster address to connect to (implies --executor ray)")
    run.add_argument("--output", help="run folder (overrides the study's output)")
    run.set_defaults(func=_cmd_run)

    setup = sub.add_parser("setup", help="fetch the study's model and data and prepare its baseline")
    setup.add_argument("study")
    setup.set_defaults(func=_cmd_setup)

    par = sub.add_parser("pareto", help="print the Pareto front of a run folder")
    par.add_argument("run", help="the study's output folder")
    par.add_argument("--sort", help="column to sort by")
    par.add_argument("--descending", action="store_true")
    par.add_argument(
        "--max-accuracy-drop", type=float, help="only rows within this many points of the baseline"
    )
    par.set_defaults(func=_cmd_pareto)
    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except StudyError as exc:
        print(f"slimsearch: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from slimsearch.search.export import ExportMismatch

        if not isinstance(exc, ExportMismatch):
            raise
        print(f"slimsearch: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
