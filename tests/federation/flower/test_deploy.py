import dataclasses
import tomli as tomllib
import zipfile
from io import BytesIO

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.config import validate_config

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.federation.flower.deploy import write_app, write_connection
from fedtune.federation.flower.runconfig import config_from_run_config


def test_the_app_is_a_valid_flower_app_that_carries_the_config(tiny_overrides, tmp_path):
    cfg = load_config(None, tiny_overrides + ["federation.engine=flower"])

    app = write_app(cfg, tmp_path / "app", resume=True)

    pyproject = tomllib.loads((app / "pyproject.toml").read_text())
    valid, errors, _ = validate_config(pyproject, check_module=True, project_dir=app)  # the components import
    assert valid, errors
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    # eval.federated=auto is resolved here, so the server and every node agree: on, as the server holds no heldout_path
    assert config_from_run_config(run_config) == dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, federated=True))
    assert run_config["resume"] is True
    fab = zipfile.ZipFile(BytesIO(build_fab_from_disk(app)))
    assert sorted(fab.namelist()) == [".info/CONTENT", "pyproject.toml"]  # no code, no data


def test_the_app_needs_the_flower_engine(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="needs federation.engine=flower"):
        write_app(tiny_config, tmp_path / "app")


def test_the_connection_is_insecure_only_when_asked(tmp_path):
    write_connection(tmp_path / "a", "10.0.0.5:9092", insecure=True, root_certificates=None)
    assert tomllib.loads((tmp_path / "a" / "config.toml").read_text())["superlink"] == {
        "default": "fedtune", "fedtune": {"address": "10.0.0.5:9092", "insecure": True}}

    write_connection(tmp_path / "b", "link:9092", insecure=False, root_certificates=tmp_path / "ca.crt")
    assert tomllib.loads((tmp_path / "b" / "config.toml").read_text())["superlink"]["fedtune"] == {
        "address": "link:9092", "root-certificates": str(tmp_path / "ca.crt")}

    with pytest.raises(ConfigError, match="--root-certificates ca.crt"):
        write_connection(tmp_path / "c", "link:9092", insecure=False, root_certificates=None)


def test_a_server_with_its_own_heldout_file_keeps_federated_eval_off_by_default(tiny_overrides, tmp_path):
    for extra, expected in (([f"flower.heldout_path={tmp_path / 'h.jsonl'}"], False), (["eval.federated=false"], False)):
        cfg = load_config(None, tiny_overrides + ["federation.engine=flower", *extra])
        pyproject = tomllib.loads((write_app(cfg, tmp_path / "app") / "pyproject.toml").read_text())
        assert config_from_run_config(pyproject["tool"]["flwr"]["app"]["config"]).eval.federated is expected
