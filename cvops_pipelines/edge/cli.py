"""`cvops-edge`: the device agent from the command line (no torch, no Dagster)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EPILOG = """environment (defaults for the options):
  CVOPS_EDGE_STATE       state directory            CVOPS_EDGE_STORE   release/feedback store
  CVOPS_EDGE_PUBLIC_KEY  pinned release public key  CVOPS_EDGE_DEVICE  device id
  CVOPS_EDGE_COHORT      cohort (default: default)

examples:
  cvops-edge --state st --device-id cam-1 identity > cam-1.pub   # then: cvops enrol cam-1 ...
  cvops-edge --store .cvops --public-key .cvops/keys/release_signing.pub --device-id cam-1 sync
  cvops-edge ... predict photo.jpg             # JSON line per image: class, confidence, top-k
  cvops-edge ... run --watch incoming/ --interval 30
"""


def _agent(args):
    from cvops_pipelines.edge.agent import EdgeAgent
    from cvops_pipelines.edge.remote import remote_from

    missing = [n for n in ("state", "store", "public_key", "device_id") if not getattr(args, n)]
    if missing:
        raise SystemExit(
            f"cvops-edge: missing {', '.join('--' + m.replace('_', '-') for m in missing)}"
        )
    return EdgeAgent(
        args.state,
        remote_from(args.store),
        Path(args.public_key).read_bytes(),
        args.device_id,
        args.cohort,
    )


def _print(obj) -> None:
    print(json.dumps(obj, default=lambda o: o.__dict__))


def cmd_identity(args) -> int:
    """Needs only --state: the key is made there on first use."""
    from cvops_pipelines.edge import identity

    if not args.state:
        raise SystemExit("cvops-edge: missing --state")
    Path(args.state).mkdir(parents=True, exist_ok=True)
    sys.stdout.write(identity.public_pem(identity.load_or_create(Path(args.state))).decode())
    return 0


def cmd_sync(args) -> int:
    result = _agent(args).sync()
    _print(result)
    return 0 if result.status in ("updated", "up-to-date") else 1


def cmd_predict(args) -> int:
    agent = _agent(args)
    for path in args.images:
        p = agent.predict(Path(path).read_bytes())
        _print(
            {
                "image": path,
                "record_id": p.record_id,
                "label": p.label,
                "confidence": p.confidence,
                "top_k": p.top_k,
                "release": p.release,
                **({"boxes": p.boxes} if p.boxes is not None else {}),
            }
        )
    return 0


def cmd_correct(args) -> int:
    agent = _agent(args)
    if args.boxes is None:
        if args.label is None:
            raise SystemExit("correct: give the right LABEL, or --boxes for a detector's record")
        agent.correct(args.record_id, args.label)
        return 0
    try:
        boxes = json.loads(
            Path(args.boxes).read_text() if Path(args.boxes).is_file() else args.boxes
        )
        agent.correct_boxes(args.record_id, boxes)
    except ValueError as exc:
        raise SystemExit(f"correct --boxes: {exc}") from None
    return 0


def cmd_upload(args) -> int:
    result = _agent(args).upload()
    _print(result)
    return 0 if result.status == "ok" else 1


def cmd_status(args) -> int:
    agent = _agent(args)
    _print(
        {
            "device_id": agent.device_id,
            "cohort": agent.cohort,
            "release": agent.release,
            "pending_feedback": agent.buffer.pending(),
            "events": agent.events,
        }
    )
    return 0


def cmd_run(args) -> int:
    agent = _agent(args)
    while True:
        status = agent.sync().status
        if args.watch and agent.release:
            done, bad = agent.watch(Path(args.watch))
            for path, p in done:
                _print({"image": str(path), "label": p.label, "confidence": p.confidence})
            for path, reason in bad:
                print(f"skipped {path}: {reason}", file=sys.stderr)
        uploaded = agent.upload()
        print(
            f"sync {status}; uploaded {uploaded.records} records ({uploaded.status}); "
            f"{agent.buffer.skipped()} bad frames skipped so far",
            file=sys.stderr,
        )
        if args.once:
            return 0
        time.sleep(args.interval)


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="cvops-edge",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--state", default=env("CVOPS_EDGE_STATE"), help="state directory")
    parser.add_argument(
        "--store",
        default=env("CVOPS_EDGE_STORE"),
        help="release/feedback store: a folder or an http(s) URL",
    )
    parser.add_argument(
        "--public-key",
        default=env("CVOPS_EDGE_PUBLIC_KEY"),
        help="PEM ed25519 public key releases must be signed with",
    )
    parser.add_argument("--device-id", default=env("CVOPS_EDGE_DEVICE"))
    parser.add_argument("--cohort", default=env("CVOPS_EDGE_COHORT", "default"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "identity",
        help="print this device's public key (made on first use) for `cvops enrol`",
    ).set_defaults(func=cmd_identity)
    sub.add_parser("sync", help="fetch, verify and activate this device's release").set_defaults(
        func=cmd_sync
    )
    p = sub.add_parser("predict", help="predict images and record them for feedback")
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("correct", help="record a human correction of a prediction")
    p.add_argument("record_id")
    p.add_argument("label", nargs="?", help="the right class (a classifier's record)")
    p.add_argument(
        "--boxes",
        help="a detector's record: the whole corrected box set, as JSON or a JSON file: "
        '[{"label": "7", "box": [x0, y0, x1, y1]}, ...] in the image\'s pixels ([] = nothing '
        "there); boxes added, deleted, moved or relabelled are simply the new set",
    )
    p.set_defaults(func=cmd_correct)
    sub.add_parser("upload", help="send buffered feedback batches").set_defaults(func=cmd_upload)
    sub.add_parser("status", help="active release and buffered feedback").set_defaults(
        func=cmd_status
    )
    p = sub.add_parser("run", help="loop: sync, predict new images in --watch, upload")
    p.add_argument("--watch", help="folder of incoming images")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between rounds")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
