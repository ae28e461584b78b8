"""What to annotate next: field errors first, then the most uncertain, kept diverse.

Order of the queue:
1. records the model got wrong (an operator's correction differs from the prediction), most
   confident first: confidently wrong images teach the most, and an expert confirms the
   operator's quick fix before it weighs on training;
2. unreviewed records by uncertainty, the margin between the top two probabilities (small
   margin = the model hesitates between two classes).
Diversity: a candidate's score is multiplied by `decay` for every image already queued with the
same (top-1, top-2) class pair, and near-duplicates (pHash) of queued images are skipped, so the
queue is not 50 copies of one confusion.
Exploration: `explore_share` of the queue is a seeded random sample of the other candidates. A
young model's uncertainty is least reliable exactly when labels are scarce (measured in
benchmarks/active_learning.py: without it the worst seed needed 0.60x random's labels, with a
fifth of the queue random 0.50x), and random picks are an unbiased sample of the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from cvops_pipelines.core.base.images import phash_distance
from cvops_pipelines.core.base.store import Store
from cvops_pipelines.core.curate.label_qa import export_json
from cvops_pipelines.core.curate.neardup import NearDupConfig
from cvops_pipelines.edge.wire import OPERATOR_PREFIX

QUEUE_COLUMNS = [
    "rank",
    "image_id",
    "reason",
    "score",
    "predicted",
    "second",
    "confidence",
    "margin",
    "corrected_label",
    "record_id",
    "release",
    "device_id",
    "uri",
    "key",
]


@dataclass(frozen=True)
class QueuePolicy:
    size: int = 100
    decay: float = 0.5  # score factor per already-queued image with the same class pair
    max_hamming: int = NearDupConfig.max_hamming  # pHash bits from a queued image: near-duplicate
    explore_share: float = 0.2  # of the queue: a seeded random sample of the other candidates
    seed: int = 0


def margins(top_k: pd.Series) -> pd.DataFrame:
    """top-1, top-2 class and the margin between their probabilities, from top-k JSON text."""
    rows = []
    for text in top_k:
        top = json.loads(text) if isinstance(text, str) else list(text)
        first = top[0] if top else (None, 0.0)
        second = top[1] if len(top) > 1 else (None, 0.0)
        rows.append((first[0], second[0], float(first[1]) - float(second[1])))
    return pd.DataFrame(rows, columns=["predicted", "second", "margin"], index=top_k.index)


def candidates(records: pd.DataFrame, labeled_elsewhere: set[str]) -> pd.DataFrame:
    """Field records worth an expert's time, one per image, with `reason` and a raw `score`."""
    frame = records[~records["image_id"].isin(labeled_elsewhere)]
    frame = pd.concat([frame.drop(columns=["predicted"]), margins(frame["top_k"])], axis=1)
    wrong = frame["corrected_label"].notna() & (frame["corrected_label"] != frame["predicted"])
    unreviewed = frame["corrected_label"].isna()
    out = pd.concat(
        [
            frame[wrong].assign(reason="wrong", score=2.0 + frame.loc[wrong, "confidence"]),
            frame[unreviewed].assign(
                reason="uncertain", score=1.0 - frame.loc[unreviewed, "margin"]
            ),
        ]
    )
    return out.sort_values("score", ascending=False, kind="stable").drop_duplicates("image_id")


def diverse_top(frame: pd.DataFrame, policy: QueuePolicy) -> pd.DataFrame:
    return frame.iloc[diverse_positions(frame, policy)].reset_index(drop=True)


def diverse_positions(frame: pd.DataFrame, policy: QueuePolicy) -> list[int]:
    """Greedy: take the best adjusted score, then discount its class pair and skip its
    near-duplicates. `frame` needs score, predicted, second, phash."""
    score = frame["score"].to_numpy(dtype=float).copy()
    pairs = list(zip(frame["predicted"], frame["second"]))
    hashes = list(frame["phash"])
    taken_per_pair: dict = {}
    chosen: list[int] = []
    alive = np.ones(len(frame), bool)
    while len(chosen) < policy.size and alive.any():
        adjusted = np.where(
            alive,
            score * np.array([policy.decay ** taken_per_pair.get(p, 0) for p in pairs]),
            -np.inf,
        )
        best = int(adjusted.argmax())
        alive[best] = False
        if any(phash_distance(hashes[best], hashes[c]) <= policy.max_hamming for c in chosen):
            continue
        chosen.append(best)
        taken_per_pair[pairs[best]] = taken_per_pair.get(pairs[best], 0) + 1
    return chosen


def choose(ranked: pd.DataFrame, policy: QueuePolicy) -> pd.DataFrame:
    """`policy.size` rows of `ranked` (best score first): the diverse top, then the exploration
    sample (reason `explore`) from the rest."""
    explore = min(round(policy.size * policy.explore_share), policy.size)
    chosen = diverse_positions(ranked, replace(policy, size=policy.size - explore))
    hashes, sample = list(ranked["phash"]), []
    rest = np.setdiff1d(np.arange(len(ranked)), chosen)
    for position in np.random.default_rng(policy.seed).permutation(rest):
        if len(sample) == explore:
            break
        if all(
            phash_distance(hashes[position], hashes[c]) > policy.max_hamming
            for c in chosen + sample
        ):
            sample.append(int(position))
    return pd.concat(
        [ranked.iloc[chosen], ranked.iloc[sorted(sample)].assign(reason="explore")],
        ignore_index=True,
    )


def annotation_queue(
    records: pd.DataFrame, labeled_elsewhere: set[str], policy: QueuePolicy = QueuePolicy()
) -> pd.DataFrame:
    queue = choose(candidates(records, labeled_elsewhere), policy)
    queue["rank"] = np.arange(1, len(queue) + 1)
    queue["score"] = queue["score"].round(4)
    queue["margin"] = queue["margin"].round(4)
    return queue[QUEUE_COLUMNS]


def labelstudio_queue_tasks(
    queue: pd.DataFrame, queue_id: str, saliency: dict[str, str] | None = None
) -> list[dict]:
    """Tasks for Label Studio's local-files storage pointed at the queue folder (images/ beside
    the JSON). The model's guess is a pre-filled prediction; `cvops_queue` marks the labels that
    come back as annotation-queue labels. `saliency`: image_id -> the Grad-CAM overlay's path
    in the folder, shown beside the image."""
    tasks = []
    saliency = saliency or {}
    for r in queue.itertuples():
        guess = r.corrected_label if isinstance(r.corrected_label, str) else r.predicted
        tasks.append(
            {
                "data": {
                    "image": f"/data/local-files/?d=images/{r.key.rsplit('/', 1)[-1]}",
                    "image_id": r.image_id,
                    "cvops_queue": queue_id,
                    "reason": r.reason,
                    "predicted": r.predicted,
                    "second": r.second,
                    "operator_label": r.corrected_label
                    if isinstance(r.corrected_label, str)
                    else "",
                    "rank": int(r.rank),
                    "saliency": f"/data/local-files/?d={saliency[r.image_id]}"
                    if r.image_id in saliency
                    else "",
                },
                "predictions": [
                    {
                        "model_version": str(r.release),
                        "score": float(r.score),
                        "result": [
                            {
                                "from_name": "label",
                                "to_name": "image",
                                "type": "choices",
                                "value": {"choices": [guess]},
                            }
                        ],
                    }
                ],
            }
        )
    return tasks


def labelstudio_queue_config(classes: list[str]) -> str:
    choices = "\n".join(f'    <Choice value="{c}"/>' for c in classes)
    return (
        '<View>\n  <Image name="image" value="$image"/>\n'
        '  <Image name="saliency" value="$saliency"/>\n'
        '  <Header value="#$rank ($reason) · model: $predicted or $second · operator: '
        '$operator_label · right: where the model looked"/>\n'
        '  <Choices name="label" toName="image" choice="single" showInline="true">\n'
        f"{choices}\n  </Choices>\n</View>\n"
    )


def expert_labeled(labeled_pool: pd.DataFrame) -> set[str]:
    """Images an expert (not only a device operator) has labelled: not queued again."""
    if not len(labeled_pool):
        return set()
    expert = labeled_pool["annotators"].map(
        lambda names: any(not str(n).startswith(OPERATOR_PREFIX) for n in names)
    )
    return set(labeled_pool.loc[expert, "image_id"])


def publish_queue(
    store: Store, queue: pd.DataFrame, classes: list[str], explained: list[tuple] | None = None
) -> tuple[str, str]:
    """(queue id, folder): the queue's images, their Grad-CAM overlays (`explained`, one per
    queued image, when a classifier is at hand), a Label Studio import + labeling config, and a
    CSV under annotation/queues/<id>/. The id is a hash of the queued images."""
    from cvops_pipelines.core.measure.saliency import write_overlays

    queue_id = "q-" + hashlib.sha256("".join(queue["image_id"]).encode()).hexdigest()[:12]
    prefix = f"annotation/queues/{queue_id}"
    for key in queue["key"]:  # images/<aa>/<sha256>.<ext> -> <queue>/images/<sha256>.<ext>
        store.write_bytes(f"{prefix}/images/{key.rsplit('/', 1)[-1]}", store.read_bytes(key))
    overlays = write_overlays(store, f"{prefix}/saliency", list(queue["image_id"]), explained or [])
    relative = {i: key.removeprefix(f"{prefix}/") for i, key in overlays.items()}
    tasks = labelstudio_queue_tasks(queue, queue_id, relative)
    store.write_bytes(f"{prefix}/tasks.json", export_json(tasks))
    store.write_bytes(
        f"{prefix}/labelstudio_config.xml", labelstudio_queue_config(classes).encode()
    )
    store.write_bytes(f"{prefix}/queue.csv", queue.to_csv(index=False).encode())
    return queue_id, prefix
