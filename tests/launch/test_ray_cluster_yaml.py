"""launch/ray_cluster.yaml is a cluster config `ray up` accepts: the same steps `ray up` runs before it
touches a host (ray.autoscaler._private.commands._bootstrap_config: defaults, the local provider's node
type, the JSON-schema and consistency checks, the provider's bootstrap), with nothing contacted."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.commands import _bootstrap_config

CONFIG = Path(__file__).resolve().parents[2] / "launch" / "ray_cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_ray_up_accepts_the_cluster_config():
    config = _bootstrap_config(load(), no_config_cache=True)
    # One on-prem node type; every listed worker host is kept.
    assert config["provider"]["type"] == "local"
    node_type = config["available_node_types"][config["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(config["provider"]["worker_ips"])
    # The project is synced and installed on every host, and Ray starts with explicit resources.
    assert config["file_mounts"]["~/cispo"] == "."
    assert any("launch/setup_env.sh" in cmd for cmd in config["setup_commands"])
    head, worker = config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]
    for cmd in (head, worker):
        assert "--num-cpus=" in cmd and "--num-gpus=" in cmd and "~/cispo/.venv/bin/ray start" in cmd
    assert "--head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(max_worker=2),  # a misspelt top-level key
        lambda c: c["auth"].update(ssh_usr="x"),  # a misspelt auth key
        lambda c: c["provider"].update(worker_ips="worker-001"),  # a string, not a list
    ],
)
def test_the_check_rejects_a_broken_config(breakage):
    """The validation above is a real check: the same path refuses configs `ray up` refuses."""
    config = copy.deepcopy(load())
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        _bootstrap_config(config, no_config_cache=True)
