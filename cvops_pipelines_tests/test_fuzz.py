"""Property-based fuzzing of the two doors data comes in by: feedback batches from devices and
drop trees from uploaders. Whatever arrives, the answer is an accepted result or a stated
rejection (never another exception), and nothing goes unaccounted for. A fixed budget (examples,
derandomized) keeps CI's time bounded and its runs repeatable."""

import hashlib
import json
import zipfile
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvops_pipelines.core.base.images import REASONS
from cvops_pipelines.core.base.store import LocalStore
from cvops_pipelines.core.ingest.annotations import _read_json
from cvops_pipelines.core.ingest.formats.common import LabelProblem, LabelRecord
from cvops_pipelines.core.ingest.intake import IngestConfig, ingest_drop
from cvops_pipelines.core.learn.feedback import BatchRejected, batch_frame, parse_batch
from cvops_pipelines.demo.digit_model import png
from cvops_pipelines.edge.buffer import FeedbackBuffer
from cvops_pipelines.edge.wire import box_problem
from cvops_pipelines_tests.helpers import rezip

BUDGET = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,  # nothing written to .hypothesis/: every CI run is the same run
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def real_batch(tmp_path) -> tuple[str, bytes]:
    buffer = FeedbackBuffer(tmp_path / "device.db", "dev-1", "site-a")
    for i in range(3):
        image = png(i)
        record = buffer.record(
            "rel-1-abc", hashlib.sha256(image).hexdigest(), image, "1", 0.9, [("1", 0.9)]
        )
    buffer.correct(record, "7")
    batch = buffer.seal()
    payload = buffer.payload(batch)
    buffer.close()
    return batch, payload


# numbers of any size and value: 600-digit integers, NaN and the infinities (json.dumps writes
# them as NaN / Infinity, as a careless or hostile writer would)
numbers = (
    st.integers()
    | st.integers(min_value=-(10**600), max_value=10**600)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
)
boxes = st.lists(
    st.fixed_dictionaries(
        {"label": st.text(max_size=4), "box": st.lists(numbers, max_size=5)},
        optional={"score": numbers},
    ),
    max_size=3,
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000)),
    st.tuples(st.just("entry"), st.text(min_size=1, max_size=30), st.binary(max_size=200)),
    st.tuples(
        st.just("field"),
        st.integers(0, 2),
        st.sampled_from(
            [
                "record_id",
                "device_id",
                "image_id",
                "release",
                "confidence",
                "top_k",
                "batch_id",
                "corrected_label",
                "captured_at",
                "cohort",
            ]
        ),
        json_values,
    ),
    st.tuples(
        st.just("field"),
        st.integers(0, 2),
        st.sampled_from(["boxes", "corrected_boxes"]),
        boxes,
    ),
    st.tuples(st.just("lines"), st.binary(max_size=300)),
)


def mutate(payload: bytes, mutation) -> bytes:
    kind = mutation[0]
    if kind == "flip":
        data = bytearray(payload)
        data[mutation[1] % len(data)] ^= mutation[2]
        return bytes(data)
    if kind == "truncate":
        return payload[: mutation[1] % len(payload)]
    if kind == "entry":
        return rezip(payload, lambda f: f.update({mutation[1]: mutation[2]}))
    if kind == "lines":
        return rezip(payload, lambda f: f.update({"records.jsonl": mutation[1]}))

    def field(files):
        lines = [json.loads(x) for x in files["records.jsonl"].decode().splitlines()]
        if lines and all(isinstance(x, dict) for x in lines):
            lines[mutation[1] % len(lines)][mutation[2]] = mutation[3]
        files["records.jsonl"] = "\n".join(json.dumps(x) for x in lines).encode()

    return rezip(payload, field)


def test_any_mangled_batch_is_parsed_or_rejected_with_a_reason(tmp_path):
    batch, payload = real_batch(tmp_path)

    @BUDGET
    @given(st.lists(mutations, min_size=1, max_size=3))
    def check(steps):
        data = payload
        for step in steps:
            try:
                data = mutate(data, step) if data else data
            except (
                zipfile.BadZipFile,
                EOFError,
                zlib.error,
                UnicodeDecodeError,
                ValueError,
                KeyError,
            ):
                pass  # an earlier step broke the archive this step would rewrite: keep it broken
        try:
            parsed = parse_batch(data, batch)
        except BatchRejected as rejected:
            assert rejected.code and rejected.message
            return
        for record in parsed.records:  # accepted: every record is whole and its image proven
            assert isinstance(record["record_id"], str) and isinstance(record["top_k"], list)
            image = parsed.images[record["image_id"]]
            assert hashlib.sha256(image).hexdigest() == record["image_id"]
            for item in [*(record.get("boxes") or []), *(record.get("corrected_boxes") or [])]:
                assert box_problem(item) is None
        for record_id, code, reason in parsed.refused:  # turned away alone, with a reason
            assert record_id and code in ("invalid_box", "invalid_value") and reason
        frame = batch_frame(parsed)  # what the asset stores: typed, finite
        assert frame["confidence"].dropna().between(0, 1).all()

    check()


entry_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", ".."))
contents = st.one_of(st.just("png"), st.just("empty"), st.just("truncated"), st.binary(max_size=64))


def test_any_drop_tree_is_fully_accounted_for(tmp_path):
    counter = iter(range(10**6))

    @BUDGET
    @given(
        st.lists(
            st.tuples(st.lists(entry_names, min_size=1, max_size=3), contents),
            min_size=1,
            max_size=8,
        )
    )
    def check(files):
        root = tmp_path / f"case{next(counter)}"
        drop, written = root / "drop", set()
        for i, (parts, content) in enumerate(files):
            *folders, name = parts
            path = drop.joinpath(*folders, f"{name}.{i}.png")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError, OSError):
                continue  # a file already sits where a folder would go: not this file
            data = {"png": png(i), "empty": b"", "truncated": png(i)[:40]}.get(content, content)
            try:
                path.write_bytes(data)
            except (IsADirectoryError, OSError):
                continue
            written.add(path)
        result = ingest_drop(
            LocalStore(drop), LocalStore(root / "store"), "d1", IngestConfig(workers=1)
        )
        accounted = len(result.manifest) + result.duplicates + len(result.quarantine)
        assert accounted == result.files_seen == len(written)
        assert set(result.quarantine["reason_code"]) <= set(REASONS)
        store = LocalStore(root / "store")
        assert all(store.exists(key) for key in result.manifest["key"])

    check()


def test_any_signed_channel_or_key_document_is_used_or_refused_with_a_reason():
    """Past the signature (a trusted key signed it, by mistake or by a bug in a tool), any JSON is
    either a well-formed document or a ValueError: never a crash of the device's sync."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cvops_pipelines.edge.agent import read_channel, read_delegation

    key = Ed25519PrivateKey.generate()
    fields = st.fixed_dictionaries(
        {},
        optional={
            "release": json_values,
            "share": json_values,
            "cohorts": json_values,
            "version": json_values | st.integers(0, 5),
            "expires": json_values | st.just("2999-01-01T00:00:00+00:00"),
            "release_keys": json_values,
        },
    )

    @BUDGET
    @given(fields | json_values)
    def check(doc):
        raw = json.dumps(doc).encode()
        for read in (
            lambda: read_channel(raw, key.sign(raw), "stable", key.public_key()),
            lambda: read_delegation(raw, key.sign(raw), key.public_key()),
        ):
            try:
                read()
            except ValueError as refused:
                assert str(refused)

    check()


def test_any_annotation_file_gives_records_or_problems_with_a_reason():
    """The other parser: COCO and Label Studio documents with numbers of any size and boxes of
    any value give label records with finite boxes, or problems with a code; nothing raises."""
    coco = st.fixed_dictionaries(
        {
            "images": st.lists(
                st.fixed_dictionaries(
                    {"id": numbers | st.text(max_size=3), "file_name": st.text(max_size=5)}
                ),
                max_size=3,
            ),
            "categories": st.lists(
                st.fixed_dictionaries({"id": numbers, "name": json_values}), max_size=3
            ),
            "annotations": st.lists(
                st.fixed_dictionaries(
                    {"image_id": numbers, "category_id": numbers},
                    optional={
                        "id": json_values,
                        "bbox": st.lists(numbers, max_size=5) | json_values,
                    },
                ),
                max_size=4,
            ),
        }
    )
    value = st.fixed_dictionaries(
        {k: numbers | json_values for k in ("x", "y", "width", "height")},
        optional={
            "rotation": numbers,
            "rectanglelabels": st.lists(st.text(max_size=3), max_size=2),
        },
    )
    result = st.fixed_dictionaries(
        {"type": st.sampled_from(["rectanglelabels", "choices", "polygon"]), "value": value},
        optional={"original_width": numbers, "original_height": numbers},
    )
    task = st.fixed_dictionaries(
        {
            "data": st.fixed_dictionaries({"image": st.text(min_size=1, max_size=8)}),
            "annotations": st.lists(
                st.fixed_dictionaries({"result": st.lists(result, max_size=3)}), max_size=2
            ),
        }
    )

    @BUDGET
    @given(coco | st.lists(task, max_size=3))
    def check(doc):
        text = json.dumps(doc).encode()  # NaN, Infinity and long integers written as they come
        for _, item in _read_json("export.json", text):
            if isinstance(item, LabelProblem):
                assert item.code and item.message
                continue
            assert isinstance(item, LabelRecord)
            if item.box is not None:
                assert all(isinstance(v, float) and abs(v) < 1e7 for v in item.box), item.box

    check()
