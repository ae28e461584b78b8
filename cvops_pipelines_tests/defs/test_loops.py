"""Two loops in one Dagster instance (one deployment): each is its own project, built by the same
factory, and neither run touches the other's history, although both name their first drop
`initial`."""

from dagster import AssetKey, DagsterEventType, DagsterInstance

from cvops_pipelines import settings
from cvops_pipelines.definitions import build_defs
from cvops_pipelines.defs.loop import Loop
from cvops_pipelines.runs import Runner
from cvops_pipelines_tests.stages import write_drop

ASSET_MATERIALIZATION = DagsterEventType.ASSET_MATERIALIZATION


def run_loop(monkeypatch, project: settings.Project, images: range) -> list:
    """The drop sensor's tick, then curate, as the daemon would run them for this loop."""
    with monkeypatch.context() as env:
        for name, value in project.environment().items():
            env.setenv(name, value)
        write_drop(project.home / "drops", "initial", images)
        runner = Runner()
        raw_images = Loop(name=project.name).op("raw_images")
        ingested = runner.tick("new_drop_sensor", {"ops": {raw_images: {"config": {"workers": 1}}}})
        curated = runner.job("curate_job")
    assert [r.ok for r in ingested] == [True] and curated.success
    return [*ingested, curated]


def test_two_loops_side_by_side_share_no_history(isolated_homes, monkeypatch):
    default = settings.Project.from_env()
    second = settings.Project.named("second", ontology=default.ontology)
    assert second.home != default.home and second.model_name != default.model_name
    first_runs = run_loop(monkeypatch, default, range(0, 700))
    second_runs = run_loop(monkeypatch, second, range(700, 1300))

    instance = DagsterInstance.get()
    # each loop has its own drop partitions: the second loop's `initial` was not taken for the
    # first's (its sensor requested it)
    assert instance.get_dynamic_partitions("drops") == ["initial"]
    assert instance.get_dynamic_partitions("second_drops") == ["initial"]

    keys = {
        loop: {s.key for s in build_defs(project).resolve_all_asset_specs()}
        for loop, project in (("default", default), ("second", second))
    }
    assert not keys["default"] & keys["second"]
    assert all(k.path[0] == "second" and len(k.path) == 2 for k in keys["second"])
    for runs, own in ((first_runs, keys["default"]), (second_runs, keys["second"])):
        for run in runs:
            materialized = {
                e.dagster_event.asset_key
                for e in instance.all_logs(run.run_id, of_type=ASSET_MATERIALIZATION)
            }
            assert materialized and materialized <= own, (run.job, materialized - own)

    # the default loop's latest pool is still its own 700 images, after the second loop ran
    pool = instance.get_latest_materialization_event(AssetKey("labeled_pool"))
    assert pool.asset_materialization.metadata["images"].value == 700
    second_pool = instance.get_latest_materialization_event(AssetKey(["second", "labeled_pool"]))
    assert second_pool.asset_materialization.metadata["images"].value == 600
    second_run = instance.get_run_by_id(second_runs[-1].run_id)
    assert second_run.tags.get("cvops/loop") == "second"
