"""The `cifarflow` command: thin wrappers that parse arguments, load params once, call a stage.

Stage modules are imported inside their commands, so `cifarflow params --check` stays fast
and never imports TensorFlow. Exit codes: 0 ok, 2 bad configuration or input, 1 anything else.
When CIFARFLOW_STATUS_FILE is set, a failure also writes its class there as JSON, because
`dvc repro` turns every stage failure into exit 255 and a driver needs to know which it was.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cifarflow.config import DEFAULT_PARAMS, Params, load_params
from cifarflow.errors import CifarflowError

log = logging.getLogger("cifarflow")
STATUS_ENV = "CIFARFLOW_STATUS_FILE"


def cmd_params(args: argparse.Namespace, params: Params) -> int:
    if not args.check:
        sys.stdout.write(params.to_yaml())
    else:
        print(f"{args.params}: ok (profile {params.profile})")
    return 0


def cmd_synth_archive(args: argparse.Namespace, params: Params | None) -> int:
    from cifarflow.data.synth import write_synth_archive

    write_synth_archive(args.out, args.train, args.test, args.seed)
    print(args.out)
    return 0


def cmd_download(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.data import download

    download.run(params, args.out, args.cache, args.runinfo)
    return 0


def cmd_preprocess(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.data import preprocess

    manifest = preprocess.run(params, args.raw, args.out)
    log.info("preprocess: %s", manifest["counts"])
    return 0


def cmd_validate(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.data import validate

    metrics = validate.run(params, args.shards, args.metrics, args.report)
    log.info("validate: counts %s, leakage %s", metrics["counts"], metrics["leakage"]["total"])
    return 0


def cmd_train(args: argparse.Namespace, params: Params) -> int:
    params.recipe(args.arch)  # an unknown arch is a config error before TensorFlow loads
    from cifarflow.training.trainer import train

    train(params, args.arch, args.shards, args.out, args.runinfo, args.checkpoints)
    return 0


def cmd_evaluate(args: argparse.Namespace, params: Params) -> int:
    params.recipe(args.arch)
    from cifarflow import evaluate

    metrics = evaluate.run(params, args.arch, args.shards, args.model, args.out)
    log.info("evaluate@%s: val %.4f, test %.4f", args.arch, metrics["val"]["accuracy"], metrics["test"]["accuracy"])
    return 0


def cmd_export(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import export

    card = export.run(params, args.shards, args.models, args.evals, args.out, args.runinfo, args.train_runinfo)
    log.info("export: %s, blessed=%s (%s)", card["arch"], card["blessed"], "; ".join(card["blessing_reasons"]))
    return 0


def cmd_promote(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.promote import promote

    promote(args.export, args.champion or Path(params.export.champion_dir), args.force)
    return 0


def cmd_predict(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import predict

    model = args.model or predict.default_model(Path(params.export.champion_dir), Path("data/export"))
    return predict.run(args.paths, model, args.format)


def cmd_report(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import report

    report.run(params, args.models, args.evals, args.export, args.runinfo, args.out)
    return 0


def cmd_flow_run(args: argparse.Namespace, params: Params) -> int:
    sys.path.insert(0, str(Path.cwd()))  # flows/ and tasks/ live in the project, beside params.yaml
    from flows.pipeline import main as run_flow

    run_flow([*(["--archs", args.archs] if args.archs else []), *(["--profile", args.profile] if args.profile else []),
              *(["--webhook-url", args.webhook_url] if args.webhook_url else [])])
    return 0


def cmd_verify_repro(args: argparse.Namespace, params: Params | None) -> int:
    from cifarflow import verify

    archs = args.archs.split(",") if args.archs else None
    return verify.main(args.repo, archs, args.real_data, args.keep, (args.real_train, args.real_test))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifarflow", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("params", help="print the resolved configuration")
    p.add_argument("--check", action="store_true", help="only validate; exit 0 if valid, 2 if not")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("synth-archive", help="write a small synthetic archive in the official binary layout")
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=positive_int, required=True)
    p.add_argument("--test", type=positive_int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synth_archive, needs_params=False)

    p = sub.add_parser("download", help="obtain, verify and validate data.source")
    p.add_argument("--out", type=Path, required=True, help="batches folder + manifest")
    p.add_argument("--cache", type=Path, required=True, help="verified downloads, reused by later runs")
    p.add_argument("--runinfo", type=Path, help="side file: which mirror served, timings")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("preprocess", help="split and write Parquet + TFRecord shards")
    p.add_argument("--raw", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("validate", help="data-validation report of the shards")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("train", help="train one architecture (a key of train: in params.yaml)")
    p.add_argument("arch")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="model, weight digest, history, summary")
    p.add_argument("--runinfo", type=Path, required=True, help="side folder: timings, hardware, TensorBoard")
    p.add_argument("--checkpoints", type=Path, required=True, help="resume state (kept until the run completes)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score one architecture's best checkpoint on val and test")
    p.add_argument("arch")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="the train stage's output folder")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="select the best of archs on val, bless it, write the servable export")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--evals", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runinfo", type=Path, help="side file for run-dependent facts")
    p.add_argument("--train-runinfo", type=Path, help="the train stages' run-info folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("promote", help="copy a blessed export to the champion folder (keeps a backup)")
    p.add_argument("--export", type=Path, default=Path("data/export"))
    p.add_argument("--champion", type=Path, help="default: export.champion_dir")
    p.add_argument("--force", action="store_true", help="promote even if not blessed")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("predict", help="classify PNG/JPEG files and folders")
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--model", type=Path, help="an export folder (default: the champion, else data/export)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="the leaderboard as markdown and JSON")
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--evals", type=Path, required=True)
    p.add_argument("--export", type=Path, required=True)
    p.add_argument("--runinfo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("flow", help="run the Prefect flow locally (ephemeral server)")
    flow_sub = p.add_subparsers(dest="flow_command", required=True)
    p = flow_sub.add_parser("run", help="the whole pipeline as the cifar10-pipeline flow")
    p.add_argument("--archs", help="comma-separated architectures (default: params.yaml archs)")
    p.add_argument("--profile", help="params profile, e.g. smoke")
    p.add_argument("--webhook-url", help="where alerts go (Slack-compatible JSON)")
    p.set_defaults(func=cmd_flow_run)

    p = sub.add_parser("verify-repro", help="two clean clones run the smoke pipeline; outputs must be identical")
    p.add_argument("--repo", type=Path, default=Path("."), help="the git repository to clone (its HEAD)")
    p.add_argument("--archs", help="comma-separated architectures (default: params.yaml archs)")
    p.add_argument("--real-data", type=Path, help="run on an archive built from this folder (e.g. ../shared/data)")
    p.add_argument("--real-train", type=positive_int, default=5000, help="train images taken from --real-data")
    p.add_argument("--real-test", type=positive_int, default=1000, help="test images taken from --real-data")
    p.add_argument("--keep", type=Path, help="work in this folder and keep the clones (default: a temp folder)")
    p.set_defaults(func=cmd_verify_repro, needs_params=False)
    return parser


def write_status(error: BaseException, exit_code: int, failure_class: str) -> None:
    path = os.environ.get(STATUS_ENV)
    if path:
        from cifarflow.fileio import write_json_atomic

        write_json_atomic(Path(path), {"class": failure_class, "exit_code": exit_code, "message": str(error)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params) if getattr(args, "needs_params", True) else None
        return args.func(args, params)
    except CifarflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        write_status(exc, exc.exit_code, exc.failure_class)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or an unexpected runtime failure: keep the traceback
        write_status(exc, 1, "runtime")
        raise
