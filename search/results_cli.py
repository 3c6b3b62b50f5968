"""The ``export`` and ``report`` subcommands; cli.build_parser() adds them with add_commands."""

from __future__ import annotations

import argparse

from slimsearch.search.study_file import StudyError


def _cmd_export(args: argparse.Namespace) -> int:
    from slimsearch.search.export import export_trial
    from slimsearch.search.results import open_run

    if args.repeats is not None and args.repeats < 1:
        raise StudyError(f"--repeats {args.repeats}: give at least 1 timed pass")
    run = open_run(args.run)
    report = export_trial(
        run,
        args.trial,
        args.out,
        overwrite=args.force,
        repeats=args.repeats,
        allow_mismatch=args.allow_mismatch,
        format=args.format,
    )
    lat = report.latency
    print(f"exported trial {report.trial} of {report.study} to {report.out}")
    for name, value in report.measured.items():
        search = report.search.get(name)
        note = f" (search: {search:.4g})" if search is not None else ""
        print(f"  {name}: {value:.4g}{note}")
    print(
        f"  latency vs baseline (interleaved, {lat.repeats} passes each): "
        f"{lat.candidate_ms:.3f} ms / {lat.baseline_ms:.3f} ms = {lat.ratio:.3f}x"
        + (" (noisy machine: rough)" if lat.noisy else "")
    )
    print(f"  weights: {report.size_bytes} bytes in {report.out / 'model.safetensors'}")
    print(f"  load it: slimsearch.load({str(report.out)!r})")
    if report.gguf is not None:
        g = report.gguf
        back = g["read_back"]
        print(
            f"  GGUF: {report.out / g['file']} ({g['bytes']} bytes; {g['tensor_types']}); read back: "
            f"{back['bit_exact']}/{back['tensors']} tensors bit-exact, max relative error "
            f"{back['max_relative_error']:.2g}"
        )
        check = g["llama_cpp"]
        if "error" in check:
            print(f"  not checked in llama.cpp: {check['error']}")
        else:
            print(
                f"  llama.cpp perplexity {check['perplexity']:.4g} on {check['tokens']} tokens"
                + (f" ({check['ratio']:.4f}x slimsearch's)" if "ratio" in check else "")
            )
    if report.onnx is not None:
        o = report.onnx
        if "perplexity" in o:
            versus = f", {o['ratio']:.4f}x slimsearch's" if "ratio" in o else ""
            quality = (
                f"perplexity {o['perplexity']:.4g} on {o['tokens']} tokens "
                f"(baseline {o['baseline_perplexity']:.4g}{versus})"
            )
        else:
            quality = f"accuracy {o['accuracy']:.2f} (baseline {o['baseline_accuracy']:.2f})"
        print(
            f"  ONNX: {report.out / o['file']} ({o['bytes']} bytes; {o['operators']}); in {o['runtime']}: "
            f"{quality}, latency {o['latency_ratio']:.3f}x the baseline's"
        )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from slimsearch.search.report import write_report

    files = write_report(args.run, args.out)
    print(f"report: {files.html}")
    print(f"front: {files.front_csv}  trials: {files.trials_csv}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``export`` and ``report`` to the ``slimsearch`` command's subparsers."""
    exp = sub.add_parser(
        "export",
        help="rebuild a trial's model, re-validate it, and write a loadable folder",
        description="Rebuild trial N from its stored plan and the baseline, re-measure quality on the "
        "full test split and latency against the baseline, and write OUT/ (weights, config, plan, "
        "tokenizer, model card). Load it back with slimsearch.load(OUT).",
    )
    exp.add_argument("run", help="the study's output folder, e.g. runs/minilm-sentiment")
    exp.add_argument("out", help="the folder to write (must be new or empty unless --force)")
    exp.add_argument("--trial", type=int, required=True, help="trial number (see `slimsearch pareto RUN`)")
    exp.add_argument("--force", action="store_true", help="replace OUT if it holds files")
    exp.add_argument("--repeats", type=int, help="timed passes per model (default: the study's, at least 20)")
    exp.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="write the export even when the rebuild differs from the searched model (the card says so)",
    )
    exp.add_argument(
        "--format",
        choices=["hf", "gguf", "onnx"],
        default="hf",
        help="hf: the slimsearch folder (always written); gguf: also model.gguf for llama.cpp "
        "(Llama-architecture decoders), read back and scored in llama.cpp where it is installed; "
        "onnx: also model.onnx (classifiers, causal LMs), its accuracy or perplexity and latency "
        "checked in ONNX Runtime",
    )
    exp.set_defaults(func=_cmd_export)

    rep = sub.add_parser("report", help="write an HTML report (offline, plotly inline) and CSVs of a run")
    rep.add_argument("run", help="the study's output folder")
    rep.add_argument("--out", help="HTML file to write (default RUN/report.html); CSVs go beside it")
    rep.set_defaults(func=_cmd_report)
