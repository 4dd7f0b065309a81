"""The `cifarflow` command: thin wrappers that parse arguments, load params once, call a stage.

Stage modules are imported inside their commands, so `cifarflow params --check` stays fast
and never imports TensorFlow. Stage commands take every path as an option, from dvc.yaml: they
have no path defaults. Exit codes (`main`, from the `exit_code` of cifarflow.errors and its
subclasses): 0 ok; 2 bad configuration or input (ConfigError, InputError: not worth retrying);
3 out of memory in training (train's OutOfMemoryError: the next attempt resumes with a smaller
micro-batch); 130 interrupted (Ctrl-C); 1 anything else, including an unexpected exception (its
traceback is printed). When CIFARFLOW_STATUS_FILE is set, every failure also writes its class there
as JSON ("config", "input", "oom", "busy", "refused", "interrupted" or "runtime"), because `dvc repro` turns every
stage failure into exit 255 and a driver needs to know which it was; only a process killed outright
(SIGKILL) writes nothing, and its driver sees a runtime failure.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from cifarflow import console, native_stderr, portable
from cifarflow.errors import STATUS_ENV, CifarflowError
from cifarflow.flow_options import add_options as add_flow_options
from cifarflow.flow_options import seconds
from cifarflow.settings import DEFAULT_PARAMS, Params, load_params

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report a Ctrl-C

log = logging.getLogger("cifarflow")


def cmd_params(args: argparse.Namespace, params: Params) -> int:
    if not args.check:
        from cifarflow.redact import redact_text

        sys.stdout.write(redact_text(params.to_yaml()))  # a signed source URL's query is not for a terminal or log
    else:
        where = Path(args.params).resolve().parent
        print(f"{args.params}: ok; profile {params.profile} trains {', '.join(params.archs)} in {where}")
    return 0


def cmd_synth_archive(args: argparse.Namespace, params: Params | None) -> int:
    from cifarflow.data.synth import write_synth_archive
    from cifarflow.errors import ConfigError
    from cifarflow.sources import SynthSpec

    try:  # the bounds of a `synth:` source in params, for the same generator
        spec = SynthSpec.checked(train=args.train, test=args.test, seed=args.seed, mislabel=args.mislabel)
    except ValueError as exc:
        raise ConfigError(f"synth-archive: {exc}") from None
    write_synth_archive(args.out, spec.train, spec.test, spec.seed, spec.mislabel)
    print(args.out)
    return 0


def cmd_resolve(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import resolved

    written = resolved.run(params, args.out)
    log.info("resolve: %d settings files in %s", len(written), args.out)
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

    metrics = validate.run(params, args.shards, args.metrics, args.report, args.verdict, details_path=args.details)
    log.info("validate: counts %s, leakage %s", metrics["counts"], metrics["leakage"]["total"])
    return 0


def cmd_train(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.cluster import GATHER_ONLY_ENV
    from cifarflow.errors import ConfigError

    params.recipe(args.arch)  # an unknown arch is a config error before TensorFlow loads
    if os.environ.get(GATHER_ONLY_ENV):
        raise ConfigError(
            f"train@{args.arch}: this workspace gathers what the cluster trained and trains nothing; the DVC remote's "
            "run-cache has no entry for this training (did its child push it?)"
        )
    from cifarflow.training.trainer import train

    train(params, args.arch, args.shards, args.out, args.runinfo, args.checkpoints, args.verdict)
    return 0


def cmd_corrupt(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.data import corrupt

    manifest = corrupt.run(params, args.shards, args.verdict, args.out)
    log.info("corrupt: %d images x %d cells", manifest["counts"][corrupt.CLEAN], len(manifest["counts"]) - 1)
    return 0


def cmd_evaluate(args: argparse.Namespace, params: Params) -> int:
    params.recipe(args.arch)
    from cifarflow import evaluate

    metrics = evaluate.run(params, args.arch, args.shards, args.model, args.out, args.verdict, args.corrupt)
    log.info("evaluate@%s: val %.4f, test %.4f", args.arch, metrics["val"]["accuracy"], metrics["test"]["accuracy"])
    if evaluate.ROBUSTNESS in metrics:
        log.info("evaluate@%s: mean corruption accuracy %.4f", args.arch, metrics[evaluate.ROBUSTNESS]["mca"])
    return 0


def cmd_export(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import export

    card = export.run(
        params,
        args.shards,
        args.models,
        args.evals,
        args.out,
        registry_dir(args, params),
        Path(args.params).resolve().parent,
        args.runinfo,
        args.train_runinfo,
        args.verdict,
        args.corrupt,
    )
    verdict = card["verdict"]
    log.info("export: %s, blessed=%s (%s)", card["arch"], verdict["blessed"], "; ".join(c["reason"] for c in verdict["checks"]))
    return 0


def registry_dir(args: argparse.Namespace, params: Params) -> Path:
    """The champion registry: --champion, else export.champion_dir, resolved as every command resolves it
    (cifarflow.champion: `~` expanded, relative to the params file's folder, the folder rules checked)."""
    from cifarflow.champion import champion_dir
    from cifarflow.errors import ConfigError

    given = str(args.champion) if getattr(args, "champion", None) else params.export.champion_dir
    try:
        return champion_dir(given, Path(args.params).resolve().parent)
    except ValueError as exc:
        raise ConfigError(f"{'--champion' if getattr(args, 'champion', None) else 'export.champion_dir'}: {exc}") from None


def cmd_promote(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import promote

    return promote.run(args, params, registry_dir(args, params))


def cmd_predict(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import predict

    model = args.model or predict.default_model(registry_dir(args, params))
    data = params.data
    return predict.run(
        args.paths, model, args.format, data.max_image_pixels, max_files=data.max_members, max_chunks=data.max_image_chunks
    )


def cmd_report(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import report

    report.run(params, args.models, args.evals, args.export, args.runinfo, args.out)
    return 0


def cmd_flow_run(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.flows.pipeline import run_flow

    run_flow(args)
    return 0


def cmd_workspace(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.bounded_yaml import read_yaml
    from cifarflow.errors import ConfigError
    from cifarflow.workspace import RUNS, flow_lock, prepare

    known = ["full", *dict(read_yaml(args.params).get("profiles") or {})]  # params are valid: main() loaded them
    if args.profile not in known:
        raise ConfigError(f"unknown profile {args.profile!r}; valid: {', '.join(known)} (profiles: in {args.params})")
    project = Path(args.params).resolve().parent
    with flow_lock(project / RUNS / args.profile, "cifarflow workspace"):  # not under a flow that runs there
        print(prepare(project, args.profile))
    return 0


def cmd_verify_repro(args: argparse.Namespace, params: Params | None) -> int:
    from cifarflow import verify

    archs = args.archs.split(",") if args.archs else None
    return verify.main(args.repo, archs, args.real_data, args.keep, (args.real_train, args.real_test))


def cmd_compare_runs(args: argparse.Namespace, params: Params | None) -> int:
    from cifarflow.compare import compare_runs

    text, same = compare_runs(args.a, args.b)
    print(text)
    return 0 if same else 1


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class VersionAction(argparse.Action):
    """`--version`: the package's version, and the git commit of the code that runs (with "uncommitted
    changes" when its tracked files differ from it), computed only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="print the version and commit, then exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from cifarflow import __version__
        from cifarflow.provenance import commit_of

        code = commit_of(Path(__file__).resolve().parent.parent)
        if code["commit"] is None:
            where = "not a git checkout"
        else:
            where = f"commit {code['commit'][:12]}{', uncommitted changes' if code['dirty'] else ''}"
        print(f"cifarflow {__version__} ({where})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifarflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
        """A subcommand whose --help opens with its one-line description (the list's help line)."""
        return group.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}.")

    p = command(sub, "params", "print the resolved configuration")
    p.add_argument("--check", action="store_true", help="only validate; exit 0 if valid, 2 if not")
    p.set_defaults(func=cmd_params)

    p = command(sub, "synth-archive", "write a small synthetic archive in the official binary layout")
    p.add_argument("out", type=Path, help="the .tar.gz to write")
    p.add_argument("--train", type=positive_int, required=True, help="train images (spread over the five data batches)")
    p.add_argument("--test", type=positive_int, required=True, help="test images")
    p.add_argument(
        "--seed", type=int, default=0, help="generator seed; the same arguments give the same bytes (default: %(default)s)"
    )
    p.add_argument(
        "--mislabel",
        type=int,
        default=0,
        choices=range(91),
        metavar="PERCENT",
        help="percent of labels (train and test) replaced by another class, 0-90 (default: %(default)s)",
    )
    p.set_defaults(func=cmd_synth_archive, needs_params=False)

    p = command(sub, "resolve", "write what each stage reads of params.yaml, defaults filled in, and its code's digest")
    p.add_argument("--out", type=Path, required=True, help="folder of <stage>.json and <stage>/<arch>.json files")
    p.set_defaults(func=cmd_resolve)

    p = command(sub, "download", "obtain, verify and validate data.source")
    p.add_argument("--out", type=Path, required=True, help="batches folder + manifest")
    p.add_argument("--cache", type=Path, required=True, help="verified downloads, reused by later runs")
    p.add_argument("--runinfo", type=Path, help="side file: which mirror served, timings")
    p.set_defaults(func=cmd_download)

    p = command(sub, "preprocess", "split and write Parquet + TFRecord shards")
    p.add_argument("--raw", type=Path, required=True, help="the download stage's output: batches folder + manifest")
    p.add_argument("--out", type=Path, required=True, help="shards folder: parquet/, tfrecord/ and manifest.json")
    p.set_defaults(func=cmd_preprocess, tensorflow=True)

    p = command(sub, "validate", "data-validation report of the shards")
    p.add_argument("--shards", type=Path, required=True, help="the preprocess stage's shards folder")
    p.add_argument("--metrics", type=Path, required=True, help="JSON file to write: counts, duplicates, leakage (DVC metrics)")
    p.add_argument(
        "--details",
        type=Path,
        help="JSON file to write: per-class counts, pixel statistics (default: details.json beside --metrics)",
    )
    p.add_argument("--report", type=Path, required=True, help="markdown report to write")
    p.add_argument(
        "--verdict", type=Path, required=True, help="written only if the shards pass; train, evaluate and export require it"
    )
    p.set_defaults(func=cmd_validate)

    p = command(sub, "corrupt", "the corruption benchmark: CIFAR-10-C's corruptions of a test subset, as shards")
    p.add_argument("--shards", type=Path, required=True, help="the preprocess stage's shards folder")
    p.add_argument("--verdict", type=Path, required=True, help="the validate stage's verdict on these shards")
    p.add_argument("--out", type=Path, required=True, help="the folder to write: Parquet shards, manifest, verdict")
    p.set_defaults(func=cmd_corrupt)

    p = command(sub, "train", "train one architecture (a key of train: in params.yaml)")
    p.add_argument("arch", help="the architecture to train: a key of train: in params.yaml, e.g. lenet")
    p.add_argument("--shards", type=Path, required=True, help="the preprocess stage's shards folder")
    p.add_argument("--out", type=Path, required=True, help="model, weight digest, history, summary")
    p.add_argument("--runinfo", type=Path, required=True, help="side folder: timings, hardware, TensorBoard")
    p.add_argument(
        "--checkpoints",
        type=Path,
        required=True,
        help="resume state, kept until the run completes (runtime.checkpoint_store, when set, is used instead)",
    )
    p.add_argument("--verdict", type=Path, required=True, help="the validate stage's verdict on these shards")
    p.set_defaults(func=cmd_train, tensorflow=True)

    p = command(sub, "evaluate", "score one architecture's best checkpoint on val and test")
    p.add_argument("arch", help="the architecture to score: a key of train: in params.yaml, e.g. lenet")
    p.add_argument("--shards", type=Path, required=True, help="the preprocess stage's shards folder")
    p.add_argument("--model", type=Path, required=True, help="the train stage's output folder")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics, details, predictions and plots")
    p.add_argument("--verdict", type=Path, required=True, help="the validate stage's verdict on these shards")
    p.add_argument("--corrupt", type=Path, help="the corrupt stage's folder: also score the corruption benchmark")
    p.set_defaults(func=cmd_evaluate, tensorflow=True)

    p = command(sub, "export", "select the best of archs on val, bless it, write the servable export")
    p.add_argument("--shards", type=Path, required=True, help="the shards folder (the test split runs the serving check)")
    p.add_argument("--models", type=Path, required=True, help="the train stages' folder: <arch>/model.keras, summary.json")
    p.add_argument("--evals", type=Path, required=True, help="the evaluate stages' folder: <arch>/metrics.json, predictions")
    p.add_argument("--out", type=Path, required=True, help="the export folder to write: SavedModel, model.keras, model card")
    p.add_argument("--runinfo", type=Path, help="side file for run-dependent facts")
    p.add_argument("--train-runinfo", type=Path, help="the train stages' run-info folder")
    p.add_argument(
        "--verdict",
        type=Path,
        help="the validate stage's verdict on these shards (without it the shard digests are still checked)",
    )
    p.add_argument("--corrupt", type=Path, help="the corrupt stage's folder: re-scores the champion's mCA when a gate asks")
    p.set_defaults(func=cmd_export, tensorflow=True)

    p = command(sub, "promote", "make a blessed export the champion: a new version in the registry")
    # Not a DVC stage: these defaults are where dvc.yaml's export and preprocess stages write.
    p.add_argument("--export", type=Path, default=Path("data/export"), help="the export to promote (default: %(default)s)")
    p.add_argument(
        "--shards",
        type=Path,
        default=Path("data/shards"),
        help="the test split the champion is re-scored on (default: %(default)s)",
    )
    p.add_argument(
        "--corrupt",
        type=Path,
        default=Path("data/corrupt"),
        help="the corruption benchmark the champion is re-scored on when a robustness gate asks (default: %(default)s)",
    )
    p.add_argument("--champion", type=Path, help="the registry folder (default: export.champion_dir)")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even if not blessed, synthetic, rolled back or worse than the champion (recorded)",
    )
    p.add_argument("--by", help="who or what promotes, for the history (default: user@host)")
    p.add_argument(
        "--wait",
        type=seconds(86_400, zero=True),
        default=600.0,
        help="seconds to wait for another promotion (default: %(default)s)",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="show the versions, the champion and the history")
    action.add_argument(
        "--rollback",
        nargs="?",
        const="",
        metavar="VERSION",
        help="make VERSION (default: the one served before) the champion again",
    )
    action.add_argument("--gc", action="store_true", help="remove old versions (see --keep)")
    action.add_argument(
        "--repair",
        action="store_true",
        help="rebuild a lost or cut-short history from the versions' own records, adopt an older registry; deletes nothing",
    )
    action.add_argument(
        "--archive-history",
        action="store_true",
        help="move history.jsonl aside and start a new one carrying what it decided (when it nears its size cap)",
    )
    p.add_argument(
        "--keep",
        type=positive_int,
        default=5,
        help="with --gc: versions kept besides the champion and the one before it (default: %(default)s)",
    )
    p.set_defaults(func=cmd_promote, tensorflow=True)

    p = command(sub, "predict", "classify PNG/JPEG files and folders")
    p.add_argument(
        "paths", type=Path, nargs="+", metavar="PATH", help="PNG/JPEG files, or folders of them (searched recursively)"
    )
    p.add_argument("--model", type=Path, help="an export folder, e.g. data/export (default: the registry's champion)")
    p.add_argument(
        "--format",
        choices=["table", "json", "csv"],
        default="table",
        help="output on stdout: an aligned table, a JSON list, or CSV; each with path, label, confidence, top-3 "
        "(default: %(default)s)",
    )
    p.set_defaults(func=cmd_predict, tensorflow=True)

    p = command(sub, "report", "the leaderboard as markdown and JSON")
    p.add_argument("--models", type=Path, required=True, help="the train stages' folder: <arch>/summary.json")
    p.add_argument("--evals", type=Path, required=True, help="the evaluate stages' folder: <arch>/metrics.json")
    p.add_argument("--export", type=Path, required=True, help="the export stage's folder (its model card, if any)")
    p.add_argument("--runinfo", type=Path, required=True, help="run-info folder: reads train/<arch>/run.json, writes speeds.json")
    p.add_argument("--out", type=Path, required=True, help="folder for leaderboard.md and leaderboard.json")
    p.set_defaults(func=cmd_report)

    p = command(sub, "flow", "run the Prefect flow locally (ephemeral server)")
    flow_sub = p.add_subparsers(dest="flow_command", required=True, metavar="COMMAND")
    p = command(flow_sub, "run", "the whole pipeline as the cifar10-pipeline flow")
    add_flow_options(p)
    p.set_defaults(func=cmd_flow_run, needs_params=False)  # the flow checks its workspace's params.yaml

    p = command(
        sub,
        "workspace",
        "create or refresh runs/PROFILE/, a private copy of the project that runs PROFILE (make pipeline PROFILE=smoke)",
    )
    p.add_argument("profile", help="a profile of params.yaml, e.g. smoke")
    p.set_defaults(func=cmd_workspace)

    p = command(sub, "verify-repro", "two clean clones run the smoke pipeline; outputs must be identical")
    p.add_argument("--repo", type=Path, default=Path("."), help="the git repository to clone (its HEAD)")
    p.add_argument("--archs", help="comma-separated architectures (default: params.yaml archs)")
    p.add_argument("--real-data", type=Path, help="run on an archive built from this folder (e.g. ../shared/data)")
    p.add_argument("--real-train", type=positive_int, default=5000, help="train images taken from --real-data")
    p.add_argument("--real-test", type=positive_int, default=1000, help="test images taken from --real-data")
    p.add_argument("--keep", type=Path, help="work in this folder and keep the clones (default: a temp folder)")
    p.set_defaults(func=cmd_verify_repro, needs_params=False)

    p = command(sub, "compare-runs", "two trainings: the same weights? on comparable hosts? (exit 1: weights differ)")
    p.add_argument("a", type=Path, help="a summary.json, model_card.json or run info, or a folder holding one")
    p.add_argument("b", type=Path, help="the other run's")
    p.set_defaults(func=cmd_compare_runs, needs_params=False)
    return parser


def uses_tensorflow(args: argparse.Namespace) -> bool:
    """Whether the command imports TensorFlow (promote only to re-score the champion, not to list, gc or roll back)."""
    if args.command == "promote":
        return not (args.list or args.gc or args.repair or args.archive_history or args.rollback is not None)
    return bool(getattr(args, "tensorflow", False))


def write_status(error: BaseException, exit_code: int, failure_class: str) -> None:
    path = os.environ.get(STATUS_ENV)
    if path:
        from cifarflow.fileio import write_json_atomic

        write_json_atomic(Path(path), {"class": failure_class, "exit_code": exit_code, "message": str(error)})


# What the system says when it cannot write: a full disk or quota, a read-only file system, a file
# over the size limit. Nothing the program can fix by itself, so one line naming the file, not a traceback.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}


def write_failure(exc: OSError, stdout_failed: bool) -> CifarflowError | None:
    """The error to report for an OSError that means "cannot write" (EIO: cannot read or write),
    None for any other. Outputs written through cifarflow.fileio carry their file name."""
    if exc.errno not in WRITE_ERRNOS:
        return None
    verb = "read or write" if exc.errno == errno.EIO else "write"
    where = exc.filename if exc.filename is not None else "the output" if stdout_failed else "a file"
    return CifarflowError(f"cannot {verb} {where}: {exc.strerror or exc}; nothing half-written was kept")


def stdout_fails() -> bool:
    """Whether standard output cannot take what it holds (a full device, a vanished terminal)."""
    try:
        sys.stdout.flush()
    except OSError:
        return True
    except ValueError:  # closed
        return False
    return False


def silence_stdout() -> None:
    """Point stdout at /dev/null: what could not be written is dropped, so Python's flush at exit
    does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (a test's capture): nothing to flush at exit
        pass
    finally:
        os.close(devnull)


def report(exc: CifarflowError) -> int:
    """One line on stderr, the failure class in the status file (CIFARFLOW_STATUS_FILE), the exit code."""
    print(f"error: {exc}", file=sys.stderr)
    write_status(exc, exc.exit_code, exc.failure_class)
    return exc.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(args.verbose)
    for stream in (sys.stdout, sys.stderr):  # a character the terminal's encoding lacks is escaped, never fatal
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        params = load_params(args.params) if getattr(args, "needs_params", True) else None
        if uses_tensorflow(args):
            if params is not None:  # before anything loads numpy: the libraries read it only then
                portable.apply(params.runtime.portable, params.runtime.threads)
            native_stderr.quiet_tensorflow()
        return args.func(args, params)
    except CifarflowError as exc:
        return report(exc)
    except KeyboardInterrupt as exc:
        write_status(exc, INTERRUPTED_EXIT, "interrupted")
        return INTERRUPTED_EXIT
    except BrokenPipeError:  # `cifarflow predict ... | head`: the reader has all it wanted
        silence_stdout()
        return 1
    except OSError as exc:
        stdout_failed = exc.filename is None and stdout_fails()
        failure = write_failure(exc, stdout_failed)
        if failure is None:
            write_status(exc, 1, "runtime")
            raise
        if stdout_failed:
            silence_stdout()
        return report(failure)
    except Exception as exc:  # a bug or an unexpected runtime failure: keep the traceback
        write_status(exc, 1, "runtime")
        raise
