"""A device on a real S3 HTTP endpoint (moto server on loopback): releases fetched with ranged GETs
(resumable), feedback sent with PUT, read back centrally through the S3 store."""

import boto3
import pytest

from cvops_pipelines.core.base.store import S3Store
from cvops_pipelines.demo.digit_model import png, trained_model
from cvops_pipelines.edge import agent as agent_module
from cvops_pipelines.edge.agent import EdgeAgent
from cvops_pipelines.edge.remote import HttpRemote, Offline
from cvops_pipelines_tests.edge.fleet_kit import central, field_records
from cvops_pipelines_tests.helpers import free_port


@pytest.mark.s3
def test_agent_syncs_and_uploads_over_http(tmp_path, s3_env, monkeypatch):
    monkeypatch.setattr(agent_module, "CHUNK", 1024)  # many ranged GETs
    c = central(tmp_path)
    r1 = c.release(trained_model(), "1")
    c.releases.point("stable", r1.id, "first", "test")
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    # releases are public-read (they are signed); the feedback prefix accepts device PUTs
    s3.create_bucket(Bucket="fleet-http", ACL="public-read-write")
    for path in (c.root / "releases").rglob("*"):
        if path.is_file():
            s3.put_object(
                Bucket="fleet-http",
                Key=str(path.relative_to(c.root)),
                Body=path.read_bytes(),
                ACL="public-read",
            )
    remote = HttpRemote(f"{s3_env}/fleet-http")
    device = EdgeAgent(tmp_path / "dev", remote, c.public_key, "dev-http")
    result = device.sync()
    assert result.status == "updated" and result.downloaded_bytes == sum(
        f["size"] for f in r1.manifest["files"].values()
    )
    prediction = device.predict(png(7))
    device.correct(prediction.record_id, "7")
    assert device.upload().records == 1
    records = field_records(S3Store("fleet-http", "", "us-east-1", s3_env))
    assert list(records["record_id"]) == [prediction.record_id]
    assert records["corrected_label"].iloc[0] == "7"


def test_unreachable_http_store_is_offline_not_an_error(tmp_path):
    remote = HttpRemote(f"http://127.0.0.1:{free_port()}/bucket", timeout=2)
    with pytest.raises(Offline, match="unreachable"):
        remote.get("releases/channels/stable.json")
    with pytest.raises(Offline):
        remote.put("feedback/batches/x.zip", b"x")
