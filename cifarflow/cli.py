"""The `cifarflow` command: thin wrappers that parse arguments, load params once, call a stage.

Stage modules are imported inside their commands, so `cifarflow params --check` stays fast
and never imports TensorFlow. Stage commands take every path as an option, from dvc.yaml: they
have no path defaults. Exit codes (`main`, from the `exit_code` of cifarflow.errors and its
subclasses): 0 ok; 2 bad configuration or input (ConfigError, InputError: not worth retrying);
3 out of memory in training (train's OutOfMemoryError: the next attempt resumes with a smaller
micro-batch); 130 interrupted (Ctrl-C); 1 anything else, including an unexpected exception (its
traceback is printed). When CIFARFLOW_STATUS_FILE is set, a failure also writes its class there as
JSON ("config", "input", "oom" or "runtime"), because `dvc repro` turns every stage failure into
exit 255 and a driver needs to know which it was.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cifarflow.config import DEFAULT_PARAMS, Params, load_params
from cifarflow.errors import STATUS_ENV, CifarflowError

log = logging.getLogger("cifarflow")

# What TensorFlow's native code prints in every process before absl's logging is initialised, so
# that TF_CPP_MIN_LOG_LEVEL does not reach it: the banner announcing exactly that, and the oneDNN
# notice (an INFO line, on CPUs where oneDNN is on by default, e.g. with AVX-512).
STARTUP_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
)
# What it prints on a machine with no NVIDIA driver: the CUDA runtime stub's probe and cuInit's
# failure (an ERROR line, so a log level that hid it would hide real errors too). Dropped only on
# such machines (see `gpu_expected`).
CPU_ONLY_NOISE = re.compile(
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
)


def gpu_expected() -> bool:
    """Whether an NVIDIA driver is present: then TensorFlow's CUDA messages may matter and are kept."""
    import ctypes.util

    return Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists() or ctypes.util.find_library("cuda") is not None


@contextmanager
def native_stderr_filtered(drop: re.Pattern[str]) -> Iterator[None]:
    """Capture file descriptor 2 (native code writes there directly), then replay it without the lines `drop` matches."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not drop.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def tensorflow_noise(gpu: bool) -> re.Pattern[str]:
    """The native start-up lines to drop: STARTUP_NOTICES, and CPU_ONLY_NOISE too when no GPU is expected."""
    return STARTUP_NOTICES if gpu else re.compile(f"{STARTUP_NOTICES.pattern}|{CPU_ONLY_NOISE.pattern}")


def quiet_tensorflow() -> None:
    """Import TensorFlow without its start-up notices, before any stage code does; its warnings and
    errors stay. TF_CPP_MIN_LOG_LEVEL=1 (unless set) drops the native INFO lines logged after start-up,
    and `tensorflow_noise` those logged before it (TF_ENABLE_ONEDNN_OPTS is left alone: it changes
    numerics). TF_CPP_MIN_LOG_LEVEL=0 keeps everything; no GPU is hidden anywhere."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # inherited by the processes a stage starts
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        return
    with native_stderr_filtered(tensorflow_noise(gpu_expected())):
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA platform probes (cuInit) here; the runtime stays unconfigured


def cmd_params(args: argparse.Namespace, params: Params) -> int:
    if not args.check:
        from cifarflow.redact import redact_text

        sys.stdout.write(redact_text(params.to_yaml()))  # a signed source URL's query is not for a terminal or log
    else:
        print(f"{args.params}: ok (profile {params.profile})")
    return 0


def cmd_synth_archive(args: argparse.Namespace, params: Params | None) -> int:
    from cifarflow.data.synth import write_synth_archive

    write_synth_archive(args.out, args.train, args.test, args.seed, args.mislabel)
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

    metrics = validate.run(params, args.shards, args.metrics, args.report, args.verdict, details_path=args.details)
    log.info("validate: counts %s, leakage %s", metrics["counts"], metrics["leakage"]["total"])
    return 0


def cmd_train(args: argparse.Namespace, params: Params) -> int:
    params.recipe(args.arch)  # an unknown arch is a config error before TensorFlow loads
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
        params, args.shards, args.models, args.evals, args.out, args.runinfo, args.train_runinfo, args.verdict, args.corrupt
    )
    log.info("export: %s, blessed=%s (%s)", card["arch"], card["blessed"], "; ".join(card["blessing_reasons"]))
    return 0


def registry_dir(args: argparse.Namespace, params: Params) -> Path:
    """The champion registry: --champion, else export.champion_dir relative to the params file's folder
    (the project), checked by the same rules as `params --check`."""
    from cifarflow.config import check_champion_dir
    from cifarflow.errors import ConfigError

    root = Path(args.params).resolve().parent
    given = str(args.champion) if getattr(args, "champion", None) else params.export.champion_dir
    try:
        check_champion_dir(given, root)
    except ValueError as exc:
        raise ConfigError(f"{'--champion' if getattr(args, 'champion', None) else 'export.champion_dir'}: {exc}") from None
    path = Path(os.path.expanduser(given))
    return path if path.is_absolute() else root / path


def cmd_promote(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import promote

    return promote.run(args, params, registry_dir(args, params))


def cmd_predict(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import predict

    model = args.model or predict.default_model(registry_dir(args, params))
    return predict.run(args.paths, model, args.format, params.data.max_image_pixels, max_files=params.data.max_members)


def cmd_report(args: argparse.Namespace, params: Params) -> int:
    from cifarflow import report

    report.run(params, args.models, args.evals, args.export, args.runinfo, args.out)
    return 0


def cmd_flow_run(args: argparse.Namespace, params: Params) -> int:
    sys.path.insert(0, str(Path.cwd()))  # flows/ and tasks/ live in the project, beside params.yaml
    from flows.pipeline import main as run_flow

    run_flow(
        [
            *(["--archs", args.archs] if args.archs else []),
            *(["--profile", args.profile] if args.profile else []),
            *(["--webhook-secret", args.webhook_secret] if args.webhook_secret else []),
        ]
    )
    return 0


def cmd_workspace(args: argparse.Namespace, params: Params) -> int:
    from cifarflow.config import read_yaml
    from cifarflow.errors import ConfigError
    from cifarflow.workspace import prepare

    known = ["full", *dict(read_yaml(args.params).get("profiles") or {})]  # params are valid: main() loaded them
    if args.profile not in known:
        raise ConfigError(f"unknown profile {args.profile!r}; valid: {', '.join(known)} (profiles: in {args.params})")
    print(prepare(Path(args.params).resolve().parent, args.profile))
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


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text[:40]!r}") from None
    if not 0 <= value <= 86_400:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be 0-86400 seconds, got {text[:40]!r}")
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

    p = sub.add_parser("download", help="obtain, verify and validate data.source")
    p.add_argument("--out", type=Path, required=True, help="batches folder + manifest")
    p.add_argument("--cache", type=Path, required=True, help="verified downloads, reused by later runs")
    p.add_argument("--runinfo", type=Path, help="side file: which mirror served, timings")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("preprocess", help="split and write Parquet + TFRecord shards")
    p.add_argument("--raw", type=Path, required=True, help="the download stage's output: batches folder + manifest")
    p.add_argument("--out", type=Path, required=True, help="shards folder: parquet/, tfrecord/ and manifest.json")
    p.set_defaults(func=cmd_preprocess, tensorflow=True)

    p = sub.add_parser("validate", help="data-validation report of the shards")
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

    p = sub.add_parser("corrupt", help="the corruption benchmark: CIFAR-10-C's corruptions of a test subset, as shards")
    p.add_argument("--shards", type=Path, required=True, help="the preprocess stage's shards folder")
    p.add_argument("--verdict", type=Path, required=True, help="the validate stage's verdict on these shards")
    p.add_argument("--out", type=Path, required=True, help="the folder to write: Parquet shards, manifest, verdict")
    p.set_defaults(func=cmd_corrupt)

    p = sub.add_parser("train", help="train one architecture (a key of train: in params.yaml)")
    p.add_argument("arch", help="the architecture to train: a key of train: in params.yaml, e.g. lenet")
    p.add_argument("--shards", type=Path, required=True, help="the preprocess stage's shards folder")
    p.add_argument("--out", type=Path, required=True, help="model, weight digest, history, summary")
    p.add_argument("--runinfo", type=Path, required=True, help="side folder: timings, hardware, TensorBoard")
    p.add_argument("--checkpoints", type=Path, required=True, help="resume state (kept until the run completes)")
    p.add_argument("--verdict", type=Path, required=True, help="the validate stage's verdict on these shards")
    p.set_defaults(func=cmd_train, tensorflow=True)

    p = sub.add_parser("evaluate", help="score one architecture's best checkpoint on val and test")
    p.add_argument("arch", help="the architecture to score: a key of train: in params.yaml, e.g. lenet")
    p.add_argument("--shards", type=Path, required=True, help="the preprocess stage's shards folder")
    p.add_argument("--model", type=Path, required=True, help="the train stage's output folder")
    p.add_argument("--out", type=Path, required=True, help="folder for metrics, details, predictions and plots")
    p.add_argument("--verdict", type=Path, required=True, help="the validate stage's verdict on these shards")
    p.add_argument("--corrupt", type=Path, help="the corrupt stage's folder: also score the corruption benchmark")
    p.set_defaults(func=cmd_evaluate, tensorflow=True)

    p = sub.add_parser("export", help="select the best of archs on val, bless it, write the servable export")
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

    p = sub.add_parser("promote", help="make a blessed export the champion: a new version in the registry")
    # Not a DVC stage: these defaults are where dvc.yaml's export and preprocess stages write.
    p.add_argument("--export", type=Path, default=Path("data/export"), help="the export to promote (default: %(default)s)")
    p.add_argument(
        "--shards",
        type=Path,
        default=Path("data/shards"),
        help="the test split the champion is re-scored on (default: %(default)s)",
    )
    p.add_argument("--champion", type=Path, help="the registry folder (default: export.champion_dir)")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote even if not blessed, synthetic, rolled back or worse than the champion (recorded)",
    )
    p.add_argument("--by", help="who or what promotes, for the history (default: user@host)")
    p.add_argument("--wait", type=seconds, default=600.0, help="seconds to wait for another promotion (default: %(default)s)")
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
    p.add_argument(
        "--keep",
        type=positive_int,
        default=5,
        help="with --gc: versions kept besides the champion and the one before it (default: %(default)s)",
    )
    p.set_defaults(func=cmd_promote, tensorflow=True)

    p = sub.add_parser("predict", help="classify PNG/JPEG files and folders")
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

    p = sub.add_parser("report", help="the leaderboard as markdown and JSON")
    p.add_argument("--models", type=Path, required=True, help="the train stages' folder: <arch>/summary.json")
    p.add_argument("--evals", type=Path, required=True, help="the evaluate stages' folder: <arch>/metrics.json")
    p.add_argument("--export", type=Path, required=True, help="the export stage's folder (its model card, if any)")
    p.add_argument("--runinfo", type=Path, required=True, help="run-info folder: reads train/<arch>/run.json, writes speeds.json")
    p.add_argument("--out", type=Path, required=True, help="folder for leaderboard.md and leaderboard.json")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("flow", help="run the Prefect flow locally (ephemeral server)")
    flow_sub = p.add_subparsers(dest="flow_command", required=True, metavar="COMMAND")
    p = flow_sub.add_parser("run", help="the whole pipeline as the cifar10-pipeline flow")
    p.add_argument("--archs", help="comma-separated architectures (default: params.yaml archs)")
    p.add_argument("--profile", help="params profile, e.g. smoke")
    p.add_argument(
        "--webhook-secret",
        metavar="NAME",
        help="Prefect Secret block holding the alert webhook URL "
        "(Slack-compatible JSON; default: $CIFARFLOW_WEBHOOK_URL, else no alerts)",
    )
    p.set_defaults(func=cmd_flow_run)

    p = sub.add_parser(
        "workspace",
        help="create or refresh runs/PROFILE/, a private copy of the project that runs PROFILE (make pipeline PROFILE=smoke)",
    )
    p.add_argument("profile", help="a profile of params.yaml, e.g. smoke")
    p.set_defaults(func=cmd_workspace)

    p = sub.add_parser("verify-repro", help="two clean clones run the smoke pipeline; outputs must be identical")
    p.add_argument("--repo", type=Path, default=Path("."), help="the git repository to clone (its HEAD)")
    p.add_argument("--archs", help="comma-separated architectures (default: params.yaml archs)")
    p.add_argument("--real-data", type=Path, help="run on an archive built from this folder (e.g. ../shared/data)")
    p.add_argument("--real-train", type=positive_int, default=5000, help="train images taken from --real-data")
    p.add_argument("--real-test", type=positive_int, default=1000, help="test images taken from --real-data")
    p.add_argument("--keep", type=Path, help="work in this folder and keep the clones (default: a temp folder)")
    p.set_defaults(func=cmd_verify_repro, needs_params=False)
    return parser


def uses_tensorflow(args: argparse.Namespace) -> bool:
    """Whether the command imports TensorFlow (promote only to re-score the champion, not to list, gc or roll back)."""
    if args.command == "promote":
        return not (args.list or args.gc or args.rollback is not None)
    return bool(getattr(args, "tensorflow", False))


def write_status(error: BaseException, exit_code: int, failure_class: str) -> None:
    path = os.environ.get(STATUS_ENV)
    if path:
        from cifarflow.fileio import write_json_atomic

        write_json_atomic(Path(path), {"class": failure_class, "exit_code": exit_code, "message": str(error)})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = load_params(args.params) if getattr(args, "needs_params", True) else None
        if uses_tensorflow(args):
            quiet_tensorflow()
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
