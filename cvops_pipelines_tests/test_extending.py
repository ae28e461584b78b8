"""docs/extending.md's "add your own asset" example, run as written: the code block is the
module."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance, materialize

from cvops_pipelines.defs.learn.assets import feedback
from cvops_pipelines.defs.resources import build_resources
from cvops_pipelines_tests.stages import CURATE, INGEST, ingest, write_drop

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def guide_block(after: str, language: str) -> str:
    text = GUIDE.read_text()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {language} block after {after!r} in docs/extending.md"
    return match.group(1)


def load_example(tmp_path: Path):
    path = tmp_path / "my_cvops.py"
    path.write_text(guide_block("<!-- example: my_cvops.py", "python"))
    spec = importlib.util.spec_from_file_location("my_cvops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def test_the_guide_example_adds_a_blocking_check_and_an_asset(isolated_homes, tmp_path):
    example, path = load_example(tmp_path)
    workspace = guide_block("instead of `cvops_pipelines.definitions`", "yaml")
    (tmp_path / "workspace.yaml").write_text(workspace)
    validate = subprocess.run(
        [
            str(Path(sys.executable).parent / "dagster"),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert validate.returncode == 0, validate.stdout[-2000:] + validate.stderr[-2000:]

    defs = example.defs
    graph = defs.resolve_asset_graph()
    assert graph.get(example.class_balance.key).group_name == "curate"
    assert example.every_source_in_the_test_split.check_key in graph.asset_check_keys
    # cvops' own resources (storage, tables IO manager, mlflow, contracts), built for this
    # test's homes: `defs` was built when cvops_pipelines.definitions was first imported
    resources = build_resources()
    assert set(resources) <= set(defs.resources)

    def curate_with_example(instance):
        return materialize(
            [
                *INGEST,
                feedback,
                *CURATE,
                example.class_balance,
                example.every_source_in_the_test_split,
            ],
            selection=[*CURATE, example.class_balance],
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )

    instance = DagsterInstance.ephemeral()
    write_drop(isolated_homes / "drops", "site-a", range(0, 600))
    ingest(instance, "site-a")
    first = curate_with_example(instance)
    assert first.success
    (check,) = [
        e
        for e in first.get_asset_check_evaluations()
        if e.check_name == "every_source_in_the_test_split"
    ]
    assert check.passed and check.metadata["too_few"].value == "none"
    (balance,) = first.asset_materializations_for_node("class_balance")
    assert balance.metadata["classes"].value == 10
    assert "| label | test | train | val |" in balance.metadata["table"].value

    write_drop(isolated_homes / "drops", "site-b", range(600, 603))  # three images: no test split
    ingest(instance, "site-b")
    second = curate_with_example(instance)
    assert not second.success  # the blocking check stops the run
    (check,) = [
        e
        for e in second.get_asset_check_evaluations()
        if e.check_name == "every_source_in_the_test_split"
    ]
    assert not check.passed and check.metadata["too_few"].value == "site-b"
    assert check.metadata["test_images_per_source"].value["site-b"] < 5
    assert not second.asset_materializations_for_node("class_balance")  # blocked downstream
