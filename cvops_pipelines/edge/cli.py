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
  cvops-edge ... run --source incoming/ --interval 30          # a folder of images
  cvops-edge ... run --source gate.mp4 --fps 5                 # a video file
  cvops-edge ... run --source rtsp://user:pw@cam-1/stream --fps 5 --upload-rate 50000
  cvops-edge ... run --source udp://0.0.0.0:5000 --fps 2       # MPEG-TS over UDP
  cvops-edge ... run --source https://cam.example/live.m3u8    # HTTP(S): HLS, MJPEG, a file
  cvops-edge ... run --source /dev/video0 --fps 2 --upload-window 22:00-06:00  # a camera
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
            "buffer": agent.buffer.counts(),  # images waiting, their bytes, evicted so far
            "events": agent.events,
        }
    )
    return 0


def cmd_run(args) -> int:
    from cvops_pipelines.edge.link import Link, parse_windows
    from cvops_pipelines.edge.sources import Source

    if args.source and args.watch:
        raise SystemExit("run: give --source or --watch (a folder), not both")
    if args.max_frames is not None and args.max_frames < 1:
        raise SystemExit(f"run: --max-frames must be >= 1, got {args.max_frames}")
    spec = args.source or args.watch
    try:
        link = Link(args.upload_rate, parse_windows(args.upload_window))
        source = Source(spec, fps=args.fps) if spec else None
    except ValueError as exc:
        raise SystemExit(f"run: {exc}") from None
    if source is not None and source.live and args.once and not (args.max_frames or args.seconds):
        raise SystemExit("run --once on a live source needs --max-frames or --seconds to end")
    agent = _agent(args)
    finished = False  # a file is read through once per process (a restart skips what it did)
    while True:
        status = agent.sync().status
        if source is not None and agent.release and not finished:
            _stream(agent, source, args, link)
            finished = source.kind == "file"
            source = Source(spec, fps=args.fps)  # a folder is listed again next round
        _upload(agent, link, f"sync {status}")
        if args.once:
            return 0
        time.sleep(args.interval)


def _stream(agent, source, args, link) -> None:
    """Predict the source; on a live one, sync and upload every --interval seconds meanwhile."""
    import threading

    last = time.monotonic()

    def on_frame(frame, p) -> None:
        nonlocal last
        _print(
            {
                "source": frame.source,
                "frame": frame.key,
                "time": round(frame.time, 3),
                "label": p.label,
                "confidence": p.confidence,
            }
        )
        if source.live and time.monotonic() - last >= args.interval:
            last = time.monotonic()
            _upload(agent, link, f"sync {agent.sync().status}", source.stats)

    timer = threading.Timer(args.seconds, source.stop) if args.seconds else None
    if timer:
        timer.start()
    try:
        result = agent.stream(source, args.max_frames, on_frame)
    finally:
        if timer:
            timer.cancel()
    s = result.stats
    print(
        f"{result.source}: {result.predicted} frames predicted, {result.kept} images kept, "
        f"{result.evicted} evicted for the disk budget, {s.skipped_fps} skipped for --fps, "
        f"{s.skipped_behind} skipped to keep up, {s.corrupt} corrupt, {s.reconnects} "
        f"reconnects, {result.failed} failed to predict, {result.already} done before",
        file=sys.stderr,
    )
    for key, reason in result.failures:
        print(f"skipped {key}: {reason}", file=sys.stderr)
    for reason in s.errors:
        print(f"  the source dropped: {reason}", file=sys.stderr)


def _upload(agent, link, sync: str, stats=None) -> None:
    uploaded = agent.upload(link=link)
    print(
        f"{sync}; uploaded {uploaded.records} records ({uploaded.status}); "
        f"{agent.buffer.skipped()} bad frames skipped so far",
        file=sys.stderr,
    )


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
    p = sub.add_parser(
        "run",
        help="loop: sync, predict a source's frames, upload",
        description="Each round: sync the release, predict the source's new frames (every "
        "prediction is recorded; an image is kept when the release's buffer policy finds it "
        "worth sending, within its disk budget), upload the most valuable feedback first. A "
        "live source streams without end, syncing and uploading every --interval seconds; "
        "it reconnects with backoff when it drops.",
    )
    p.add_argument(
        "--source",
        help="a folder of images (new files each round), a video file (read once), a stream "
        "URL (rtsp://, udp://, http(s)://, rtmp://, srt://, tcp://) or a camera (/dev/videoN "
        "or camera:N)",
    )
    p.add_argument("--watch", help="a folder of incoming images (the same as --source FOLDER)")
    p.add_argument(
        "--fps",
        type=float,
        help="predict at most this many frames per second (of video time for a file, of wall "
        "time for a live source); frames between are decoded, skipped and counted",
    )
    p.add_argument("--max-frames", type=int, help="stop after predicting this many frames")
    p.add_argument("--seconds", type=float, help="stop a live source after this many seconds")
    p.add_argument(
        "--upload-rate",
        type=float,
        help="bytes per second the uploads may use at most (default: no cap)",
    )
    p.add_argument(
        "--upload-window",
        help="upload only within these UTC windows, e.g. 22:00-06:00,12:00-13:00",
    )
    p.add_argument("--interval", type=float, default=30.0, help="seconds between rounds")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
