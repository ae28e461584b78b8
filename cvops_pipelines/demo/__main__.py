"""`cvops-demo` (or `python -m cvops_pipelines.demo`): the whole loop on the bundled demo data."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from cvops_pipelines.settings import ENVIRONMENT_HELP


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvops-demo",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turns of the loop (two by default) on the bundled demo data "
        "(scikit-learn's digits rendered to PNG): ingest, curate, train, evaluate, export, "
        "release to a simulated fleet, feedback, canary decision, production metrics and "
        "drift, an annotation queue answered by an oracle, retrain, release again. Runs go "
        "through the persistent Dagster instance, so they show in `./dev ui`.",
    )
    parser.add_argument(
        "--turns",
        type=_turns,
        default=2,
        help="hands-off turns of the loop (classification); the summary shows, per turn, the "
        "labels bought, the shipped model's audit accuracy, the gate's and the canary's "
        "verdicts, the turn's wall time and its loop latency (default 2)",
    )
    parser.add_argument(
        "--explore-share",
        type=float,
        help="share of each annotation queue drawn at random (default: annotation_queue's "
        "own); 1.0 gives a random queue, the baseline `./dev bench loop_convergence` runs",
    )
    parser.add_argument(
        "--init-from",
        choices=("auto", "none"),
        help="how each retrain starts (default: trained_model's own, auto: a short fine-tune "
        "of the champion while the ontology is unchanged); none trains from scratch every "
        "turn, the comparison `./dev bench loop_latency` runs",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the demo data split, the training runs and the fleet",
    )
    parser.add_argument(
        "--task",
        choices=("classification", "detection"),
        default="classification",
        help="detection: two turns of the loop on boxes, on synthetic scenes the project "
        "renders (digits pasted on noisy backgrounds), as its own loop `detection` "
        "(data in $CVOPS_HOME-detection, data_contracts/scenes.yaml, asset keys under "
        "detection/) beside the classification loop in the same Dagster instance",
    )
    sizes = parser.add_argument_group("detection sizes (with --task detection)")
    sizes.add_argument("--scenes", type=int, default=320, help="labelled scenes in the drop")
    sizes.add_argument(
        "--frames", type=int, default=120, help="production frames shot in each turn"
    )
    sizes.add_argument("--epochs", type=int, default=10, help="detector training epochs")
    parser.add_argument(
        "--annotator",
        choices=("files", "labelstudio"),
        default="files",
        help="who answers the annotation queue: the oracle writing a Label Studio export drop "
        "(files), or the oracle as an annotator in a local Label Studio the demo starts "
        "(its own venv, data under $CVOPS_HOME/labelstudio), which the pipeline pushes the "
        "queue to in sub-batches and polls for answers",
    )
    parser.add_argument("--timings", help="write where the time went (JSON) to this file")
    parser.add_argument(
        "--report",
        help="write every turn's decisions and figures (JSON) to "
        "this file: gate and canary verdicts, channels before "
        "and after, the oracle's audit of the releases",
    )
    parser.add_argument(
        "--data-only",
        action="store_true",
        help="only render the demo drops (initial drop + held-back drops and "
        "production stream), then stop",
    )
    parser.add_argument(
        "--drops", help="with --data-only: drop source folder (default $CVOPS_DROPS)"
    )
    parser.add_argument(
        "--holdback",
        help="with --data-only: folder for later drops and the "
        "production stream (default $CVOPS_HOME/holdback)",
    )
    return parser


def _turns(text: str) -> int:
    turns = int(text)
    if turns < 1:
        raise argparse.ArgumentTypeError(f"{turns}: the loop runs at least one turn")
    return turns


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.explore_share is not None and not 0 <= args.explore_share <= 1:
        parser.error(f"--explore-share {args.explore_share}: a share, between 0 and 1")
    if args.task == "detection" and (args.turns, args.explore_share, args.init_from) != (
        2,
        None,
        None,
    ):
        parser.error(
            "--turns, --explore-share and --init-from drive the classification demo; the "
            "detection demo runs its two turns"
        )
    if args.task == "detection":
        from cvops_pipelines.demo import detection

        detection.use_detection_project()
    try:
        if args.data_only and args.task != "detection":
            from cvops_pipelines.demo.harness import make_data

            return make_data(args.drops, args.holdback, args.seed)
        if args.annotator == "labelstudio":
            with _labelstudio() as annotator:
                return _run(args, annotator)
        return _run(args, None)
    except KeyboardInterrupt:
        return 130


def _run(args, annotator) -> int:
    if args.task == "detection":
        from cvops_pipelines.demo import detection

        config = detection.DetectionDemoConfig(
            scenes=args.scenes, frames=args.frames, epochs=args.epochs, seed=args.seed
        )
        return detection.run(config, args.report, annotator)
    from cvops_pipelines.demo.harness import Demo

    demo = Demo(args.seed, annotator, args.turns, args.explore_share, args.init_from)
    return demo.run(args.report, args.timings)


@contextmanager
def _labelstudio():
    """A local Label Studio for this demo's loop, and the pipeline pointed at it (the
    environment the resources read); stopped when the demo ends."""
    import os

    from cvops_pipelines import settings
    from cvops_pipelines.demo.labelstudio import (
        ADMIN_TOKEN,
        LabelStudioAnnotator,
        LabelStudioServer,
    )

    home = settings.cvops_home()
    root = home / "labelstudio"
    root.mkdir(parents=True, exist_ok=True)
    print(f"cvops demo: starting Label Studio (data in {root}); about a minute")
    with LabelStudioServer.start(root, files_root=home) as server:
        os.environ.update(
            CVOPS_LABELSTUDIO_URL=server.url,
            CVOPS_LABELSTUDIO_TOKEN=ADMIN_TOKEN,
            CVOPS_LABELSTUDIO_FILES_ROOT=str(home),
        )
        print(f"cvops demo: Label Studio at {server.url} (admin, token in the demo's code)")
        yield LabelStudioAnnotator(server)


if __name__ == "__main__":
    sys.exit(main())
