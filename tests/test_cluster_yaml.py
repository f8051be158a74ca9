"""cluster.yaml is a valid Ray cluster-launcher config."""

from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_against_rays_schema():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    validate_config(prepare_config(config))
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert any(v["resources"].get("GPU", 0) > 0 for v in workers.values())
    assert any("pip install" in c and "dpdmd" in c for c in config["setup_commands"])


def test_the_validation_can_fail():
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    del config["available_node_types"][config["head_node_type"]]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
