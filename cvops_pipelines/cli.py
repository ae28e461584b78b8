"""`cvops`: the operator's commands: ingest a drop now, list drops, the loop's status, create the
release signing key, enrol devices, simulate a fleet. (The demo is `cvops-demo`.)

Runs go through the persistent Dagster instance ($DAGSTER_HOME, default ./.dagster_home), so every
run started here shows up in the Dagster UI (`./dev ui`).
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from cvops_pipelines import settings
from cvops_pipelines.runs import Runner, print_fleet, print_ingest, production_stream, progress


def cmd_keygen(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.ship.release import generate_keypair

    folder = Path(args.out) if args.out else settings.signing_key_path().parent
    try:
        private, public = generate_keypair(folder, "root" if args.root else "release_signing")
    except FileExistsError as exc:
        print(f"cvops keygen: {exc}", file=sys.stderr)
        return 2
    if args.root:
        print(
            f"root key (signs only releases/keys.json; move it OFF this machine): {private}\n"
            f"root public key (pin on devices as --public-key): {public}\n"
            f"next: cvops keys delegate --root-key {private}"
        )
    else:
        print(
            f"private key (sign releases; never commit): {private}\n"
            f"public key (pin on devices, or delegate it from a root key): {public}"
        )
    return 0


def _ledger(store):
    """The operator's own record of signed versions: the Dagster instance's ($DAGSTER_HOME), the
    one the pipeline's runs read, never the store."""
    from dagster import DagsterInstance

    from cvops_pipelines.core.base.ledger import instance_ledger
    from cvops_pipelines.runs import dagster_home

    dagster_home()
    return instance_ledger(DagsterInstance.get(), store)


def _positive_days(text: str) -> int:
    days = int(text)
    if days < 1:
        raise argparse.ArgumentTypeError(
            f"{days}: a delegation must last at least a day (devices refuse an expired one)"
        )
    return days


def cmd_enrol(args: argparse.Namespace) -> int:
    import getpass

    from cvops_pipelines.core.learn.enrolment import enrol_device
    from cvops_pipelines.core.ship.release import SigningKeyMissing, load_private_key

    if not args.revoke and not args.public_key:
        print("cvops enrol: give --public-key FILE (or --revoke)", file=sys.stderr)
        return 2
    try:
        key = load_private_key(settings.signing_key_path())
        pem = b"" if args.revoke else Path(args.public_key).read_bytes()
        store = settings.cvops_store()
        enrol_device(
            store,
            key,
            args.device,
            pem,
            f"{getpass.getuser()} via cvops enrol",
            revoked=args.revoke,
            ledger=_ledger(store),
        )
    except (SigningKeyMissing, OSError, ValueError) as exc:
        print(f"cvops enrol: {exc}", file=sys.stderr)
        return 2
    what = "revoked: its batches are refused from now on" if args.revoke else "enrolled"
    print(f"device {args.device} {what}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    import getpass

    from cvops_pipelines.core.ship import keys
    from cvops_pipelines.core.ship.release import SigningKeyMissing, load_private_key

    store = settings.cvops_store()
    if args.action == "show":
        doc = keys.delegation(store, keys.root_public_key(settings.root_public_key_path()))
        if doc is None:
            print(
                "no root delegation the root signed (or no root public key at "
                f"{settings.root_public_key_path()}): devices pin the release key itself"
            )
        else:
            print(f"delegation version {doc['version']}, expires {doc['expires']}")
            print(f"{len(doc['release_keys'])} release key(s) trusted")
        return 0
    if not args.root_key:
        print(f"cvops keys {args.action}: give --root-key FILE", file=sys.stderr)
        return 2
    try:
        root = load_private_key(Path(args.root_key))
        path = settings.signing_key_path()
        ledger = _ledger(store)
        if args.action == "delegate":
            release_key = keys.pem(load_private_key(path))
            doc = keys.delegate(store, root, [release_key], timedelta(days=args.days), ledger)
            print(f"delegated {path.name}: {keys.KEYS} version {doc['version']}")
            return 0
        actor = f"{getpass.getuser()} via cvops keys rotate"
        done = keys.rotate(store, root, path, actor, args.revoke_old, ledger)
    except (SigningKeyMissing, OSError, ValueError) as exc:
        print(f"cvops keys {args.action}: {exc}", file=sys.stderr)
        return 2
    print(
        f"new release key {done.new_key} (old kept as {done.retired_key.name}); delegation "
        f"version {done.delegation_version}; re-signed {done.manifests} manifests, channels "
        f"{', '.join(done.channels) or 'none'} and {done.enrolments} enrolments"
        + (
            "; the old key is revoked"
            if args.revoke_old
            else "; the old key stays trusted until `cvops keys delegate`"
        )
    )
    for problem in done.refused_channels:
        print(f"not re-signed: {problem}", file=sys.stderr)
    return 0


def cmd_fleet(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.base.store import LocalStore
    from cvops_pipelines.core.learn.enrolment import enroller
    from cvops_pipelines.core.ship.release import load_private_key
    from cvops_pipelines.edge.remote import DirRemote
    from cvops_pipelines.edge.simulator import FleetConfig, Shift, run_fleet

    if settings.s3_settings()["bucket"]:
        print(
            "cvops fleet: the simulator drives devices against the local store; unset "
            "CVOPS_S3_BUCKET (real devices reach S3 over HTTP: cvops-edge --store https://...)",
            file=sys.stderr,
        )
        return 2
    stream_dir = Path(args.stream or settings.cvops_home() / "holdback" / "production")
    if not (stream_dir / "ground_truth.csv").exists():
        print(
            f"cvops fleet: no production stream in {stream_dir} (run `cvops-demo --data-only`)",
            file=sys.stderr,
        )
        return 2
    config = FleetConfig(
        devices=args.devices,
        steps=args.steps,
        images_per_step=args.images_per_step,
        p_offline=args.p_offline,
        p_crash=args.p_crash,
        review_share=args.review_share,
        shift=Shift(args.brightness, args.blur, args.rotate),
        seed=args.seed,
        video_hold=args.video_hold,
    )
    home = settings.cvops_home()
    public = settings.signing_key_path().with_suffix(".pub").read_bytes()
    stream = production_stream(stream_dir)
    enrol = enroller(LocalStore(home), load_private_key(settings.signing_key_path()), "cvops fleet")
    with progress(config.steps, "fleet", "step") as bar:
        result = run_fleet(
            DirRemote(home), home / "fleet", public, stream, config, bar.update, enrol
        )
    print_fleet(result, config)
    return 0


def _drop_source():
    from cvops_pipelines.core.base.store import store_from_uri

    s3 = settings.s3_settings()
    return store_from_uri(
        settings.drops_uri(), region=s3["region"], endpoint_url=s3["endpoint_url"]
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.ingest.drops import DropNotReady, require_complete

    try:
        require_complete(_drop_source(), args.drop)
    except DropNotReady as exc:
        print(f"cvops ingest: {exc}", file=sys.stderr)
        return 2
    run = Runner().job("ingest_job", args.drop)
    print_ingest(args.drop, run)
    return 0 if run.ok else 1


def cmd_drops(args: argparse.Namespace) -> int:
    from cvops_pipelines.core.ingest.drops import scan_drops

    scan = scan_drops(_drop_source())
    for status, names in (
        ("complete", scan.complete),
        ("waiting for _SUCCESS", scan.incomplete),
        ("invalid name", scan.invalid),
    ):
        for name in names:
            print(f"{name}\t{status}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The operator's one-screen view: what runs where, how it does, what waits for people."""
    import json

    from cvops_pipelines.core.base.tables import read_table, record_key, table_key
    from cvops_pipelines.core.base.tracking import Tracking, TrackingUnavailable
    from cvops_pipelines.core.learn.active import expert_labeled
    from cvops_pipelines.core.ship.release import ReleaseStore

    store = settings.cvops_store()
    releases = ReleaseStore(store)
    print(f"cvops status ({store.uri()})")
    orphans = store.orphans() if hasattr(store, "orphans") else []
    if orphans:
        print(
            f"   store     : {len(orphans)} temp file(s) of writers killed mid-write, e.g. "
            f"{orphans[0]} (the next write to each folder removes them)"
        )
    for channel in ("stable", "canary"):
        pointer = releases.channel(channel) or {}
        release = pointer.get("release")
        if not release:
            print(f"   {channel:<10}: none")
            continue
        manifest = releases.manifest(release)
        extra = (
            f", {pointer.get('share', 0):.0%} of devices"
            + (f" + cohorts {', '.join(pointer['cohorts'])}" if pointer.get("cohorts") else "")
            if channel == "canary"
            else ""
        )
        print(
            f"   {channel:<10}: {release} (model v{manifest['model_version']}, "
            f"{manifest['artifact']}, dataset {manifest['dataset_version']}{extra}; "
            f"since {pointer.get('updated_at', '?')})"
        )
    tracking = Tracking(settings.mlflow_tracking_uri(), model_name=settings.model_name())
    local_db = tracking.tracking_uri.removeprefix("sqlite:///")
    if tracking.tracking_uri.startswith("sqlite:///") and not Path(local_db).exists():
        print(f"   MLflow    : no tracking database yet ({local_db})")
    else:
        try:
            for alias in ("champion", "challenger"):
                version = tracking.alias_version(alias)
                print(
                    f"   {alias:<10}: {tracking.model_name} v{version} "
                    f"(MLflow run {tracking.version_run_id(version)})"
                    if version
                    else f"   {alias:<10}: not set"
                )
        except TrackingUnavailable as exc:
            print(f"   MLflow    : {exc}")
    metrics_key = record_key("production_metrics")
    if store.exists(metrics_key):
        metrics = json.loads(store.read_bytes(metrics_key))
        print(
            f"   field     : {metrics['records']} records, {metrics['reviewed']} reviewed; SLA "
            f"{'met' if metrics['sla_ok'] else 'MISSED'}, drift "
            f"{'FLAGGED' if metrics['drift_flagged'] else 'not flagged'}"
        )
        for line in metrics.get("release_lines", []):  # each task says its own figures
            print(f"               {line}")
    else:
        print("   field     : no production_metrics yet (learn_job / learn_schedule)")
    queue_key, pool_key = table_key("annotation_queue"), table_key("labeled_pool")
    if store.exists(queue_key):
        queue = read_table(store, queue_key)
        done = expert_labeled(read_table(store, pool_key)) if store.exists(pool_key) else set()
        pending = queue[~queue["image_id"].isin(done)]
        queue_id = queue["queue_id"].iloc[0] if len(queue) else "-"
        print(
            f"   labels    : {len(pending)} of {len(queue)} queued images still to annotate "
            f"(queue {queue_id}: {store.uri(f'annotation/queues/{queue_id}/tasks.json')})"
        )
        if len(pending):
            print(f"               by reason: {pending['reason'].value_counts().to_dict()}")
    else:
        print("   labels    : no annotation queue yet")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvops",
        description="cvops: the Lean AI loop for computer vision on Dagster.",
        epilog=settings.ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("ingest", help="ingest one drop from the drop source now (no sensor)")
    p.add_argument("drop", help="the drop's folder name under $CVOPS_DROPS")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("drops", help="list drops in the drop source and whether they are complete")
    p.set_defaults(func=cmd_drops)

    p = sub.add_parser(
        "status",
        help="champion, stable and canary releases, the latest "
        "production metrics and pending annotation work",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keygen", help="create the ed25519 key pair that signs edge releases")
    p.add_argument(
        "--out", help="folder (default: the folder of $CVOPS_SIGNING_KEY, $CVOPS_HOME/keys)"
    )
    p.add_argument(
        "--root",
        action="store_true",
        help="create the root key instead (root.key/root.pub): it only vouches for release "
        "keys, so they can be rotated without touching devices",
    )
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "keys",
        help="root delegation of release keys: show, delegate, rotate",
        description="Devices that pin the root public key trust the release keys named in "
        "releases/keys.json, signed by the root. `delegate` names exactly the current release "
        "key; `rotate` makes a new release key, delegates it (with the old one unless "
        "--revoke-old), and re-signs every manifest, channel and enrolment with it.",
    )
    p.add_argument("action", choices=["show", "delegate", "rotate"])
    p.add_argument("--root-key", help="the root private key (kept offline)")
    p.add_argument(
        "--days", type=_positive_days, default=365, help="delegation lifetime, >= 1 (delegate)"
    )
    p.add_argument(
        "--revoke-old",
        action="store_true",
        help="rotate: stop trusting the old release key at once (it leaked)",
    )
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser(
        "enrol",
        help="let a device send feedback: record its public key, signed by the release key",
        description="Record a device's public key (print it on the device with "
        "`cvops-edge identity`), signed by the release key. The feedback asset accepts a "
        "batch only when its device's enrolled key signed it. Re-enrolling replaces the key.",
    )
    p.add_argument("device", help="the device id (cvops-edge --device-id)")
    p.add_argument("--public-key", help="the device's PEM public key file")
    p.add_argument("--revoke", action="store_true", help="refuse this device's batches from now on")
    p.set_defaults(func=cmd_enrol)

    p = sub.add_parser(
        "fleet",
        help="simulate edge devices running the released model on the "
        "production stream, with outages, crashes and operators",
    )
    p.add_argument(
        "--stream",
        help="folder with ground_truth.csv + images/ (default $CVOPS_HOME/holdback/production)",
    )
    p.add_argument("--devices", type=int, default=6)
    p.add_argument("--steps", type=int, default=30, help="rounds of sync, predict, upload")
    p.add_argument("--images-per-step", type=int, default=4)
    p.add_argument(
        "--p-offline", type=float, default=0.25, help="chance a device is offline in a step"
    )
    p.add_argument(
        "--p-crash", type=float, default=0.03, help="chance a store call crashes the device"
    )
    p.add_argument(
        "--review-share",
        type=float,
        default=0.6,
        help="share of predictions an operator reviews (top-2 choice)",
    )
    p.add_argument("--brightness", type=float, default=0.0, help="shift: brightness change limit")
    p.add_argument("--blur", type=int, default=0, help="shift: max Gaussian blur kernel (odd)")
    p.add_argument("--rotate", type=float, default=0.0, help="shift: rotation limit in degrees")
    p.add_argument(
        "--video-hold",
        type=int,
        default=0,
        help="devices watch video: each image is filmed for this many frames of a 640x480 clip "
        "the device streams, keeping images by its release's buffer policy (0: images one by "
        "one, every image kept)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_fleet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
