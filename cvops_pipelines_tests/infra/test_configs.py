"""infra/ files agree with each other and with the code: no Docker engine or cluster here, so
what can drift silently (env names, hosts, paths, module names) is checked statically."""

import re
import tomllib

import yaml


def env_names(node) -> set[str]:
    """Every `env: NAME` a Dagster instance yaml reads."""
    if isinstance(node, dict):
        found = {node["env"]} if set(node) == {"env"} else set()
        return found.union(*(env_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_names(v) for v in node))
    return set()


def test_compose_gives_the_production_instance_every_variable_it_reads(repo_root):
    instance = yaml.safe_load((repo_root / "infra/dagster/dagster.production.yaml").read_text())
    compose = yaml.safe_load((repo_root / "infra/docker/docker-compose.yaml").read_text())
    assert instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert "postgres" in instance["storage"]
    needed = env_names(instance)
    assert {"DAGSTER_POSTGRES_HOST", "DAGSTER_POSTGRES_PASSWORD", "CVOPS_S3_BUCKET"} <= needed
    for service in ("cvops-code", "dagster-webserver", "dagster-daemon"):
        env = compose["services"][service]["environment"]
        assert needed <= set(env), f"{service} lacks {needed - set(env)}"
        assert env["DAGSTER_POSTGRES_HOST"] in compose["services"]
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    code = compose["services"]["cvops-code"]
    assert code["environment"]["CVOPS_SIGNING_KEY"] == "/run/secrets/release_signing_key"
    assert code["secrets"] == ["release_signing_key"]


def test_workspace_dockerfile_and_helm_name_the_same_code_location(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())
    module = project["tool"]["dagster"]["module_name"]
    workspace = yaml.safe_load((repo_root / "infra/docker/workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    compose = yaml.safe_load((repo_root / "infra/docker/docker-compose.yaml").read_text())
    assert entry["grpc_server"]["host"] in compose["services"]
    dockerfile = (repo_root / "infra/docker/Dockerfile").read_text()
    assert f'"-p", "{entry["grpc_server"]["port"]}"' in dockerfile and f'"{module}"' in dockerfile
    for source in re.findall(r"^COPY (\S+)", dockerfile, re.M):
        assert (repo_root / source).exists(), f"Dockerfile copies missing {source}"
    assert (
        "[production]" in dockerfile and "production" in project["project"]["optional-dependencies"]
    )

    values = yaml.safe_load((repo_root / "infra/helm/values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["codeServerArgs"][:2] == ["-m", module]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "QueuedRunCoordinator"
    instance = yaml.safe_load((repo_root / "infra/dagster/dagster.production.yaml").read_text())
    limits = instance["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert coordinator["config"]["queuedRunCoordinator"]["tagConcurrencyLimits"] == limits


def test_the_training_job_carries_the_tag_the_run_queue_limits(repo_root):
    """The production run queue limits training by a tag: the job must carry exactly that tag
    (read from the instance yaml, not restated here), or trainings would run side by side."""
    from cvops_pipelines.defs.build.jobs import train_job

    instance = yaml.safe_load((repo_root / "infra/dagster/dagster.production.yaml").read_text())
    limits = instance["run_coordinator"]["config"]["tag_concurrency_limits"]
    (training,) = [rule for rule in limits if rule["limit"] == 1]
    assert train_job.tags.get(training["key"]) == training["value"]


def test_the_ingest_job_carries_the_tag_that_lets_drops_ingest_side_by_side(repo_root):
    from cvops_pipelines.defs.ingest.sensors import ingest_job

    instance = yaml.safe_load((repo_root / "infra/dagster/dagster.production.yaml").read_text())
    limits = instance["run_coordinator"]["config"]["tag_concurrency_limits"]
    (ingest,) = [rule for rule in limits if rule["value"] == "ingest"]
    assert ingest_job.tags.get(ingest["key"]) == "ingest" and ingest["limit"] > 1


def test_every_dagster_instance_config_turns_telemetry_off(repo_root):
    for path in (
        "infra/dagster/dagster.yaml",
        "infra/dagster/dagster.production.yaml",
        "infra/helm/values.yaml",
    ):
        config = yaml.safe_load((repo_root / path).read_text())
        assert config["telemetry"] == {"enabled": False}, path


def test_every_instance_config_passes_cvops_warnings_to_the_event_log(repo_root):
    """A skipped feedback partition is logged on `cvops_pipelines.*`: every instance we ship
    captures that logger, so the reason shows in the run, not only on a pod's stderr."""
    for name in ("infra/dagster/dagster.yaml", "infra/dagster/dagster.production.yaml"):
        config = yaml.safe_load((repo_root / name).read_text())
        assert config["python_logs"]["managed_python_loggers"] == ["cvops_pipelines"], name
    values = yaml.safe_load((repo_root / "infra/helm/values.yaml").read_text())
    assert values["pythonLogs"]["managedPythonLoggers"] == ["cvops_pipelines"]
