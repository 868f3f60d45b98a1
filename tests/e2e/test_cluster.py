"""A simulated multi-node cluster (``ray.cluster_utils.Cluster``): a config the cluster cannot hold
fails before any actor starts, and one whose resources do not come free times out. (Roles
landing on their nodes, and a run on the cluster surviving faults: ``test_chaos.py``.)"""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from orchestration.config import load_config
from orchestration.placement import PlacementError, start_actors
from orchestration.prepare import prepare

pytestmark = pytest.mark.slow

ROLES = [  # role -> the custom resource of the node it must run on
    "cluster.generator.resources={gen_node: 0.01}",
    "cluster.learner.resources={learner_node: 0.01}",
    "cluster.reference.resources={learner_node: 0.01}",
    "cluster.reward.resources={head_node: 0.01}",
    "cluster.learner.strategy=SPREAD",
]


@pytest.fixture
def cluster(private_env):
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"head_node": 1}, "include_dashboard": False},
    )
    c.add_node(num_cpus=1, resources={"gen_node": 1})
    c.add_node(num_cpus=1, resources={"learner_node": 1})
    c.add_node(num_cpus=1, resources={"learner_node": 1})
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


def test_a_run_the_cluster_cannot_hold_fails_fast_and_one_it_cannot_get_times_out(
    cluster, tmp_path
):
    cfg = load_config(
        "demo",
        [
            "cluster.learner.resources={learner_node: 1}",
            "learner.num_ranks=4",
            f"logging.root={tmp_path}",
        ],
    )
    prep = prepare(cfg, "demo")
    with pytest.raises(PlacementError) as err:
        start_actors(cfg, prep.model_path, prep.pad_token_id)
    assert "4 learner ranks x 1 learner_node need 4 learner_node; the cluster has 2" in str(
        err.value
    )
    assert ray.util.placement_group_table() == {}  # nothing was reserved

    # Fits the cluster, but someone else holds the learner nodes: wait, then fail with what waits.
    squatter = ray.util.placement_group([{"learner_node": 1}] * 2, strategy="SPREAD")
    ray.get(squatter.ready(), timeout=60)
    cfg = load_config(
        "demo",
        [
            "cluster.learner.resources={learner_node: 1}",
            "cluster.placement_timeout_s=3",
            f"logging.root={tmp_path}",
        ],
    )
    with pytest.raises(
        PlacementError,
        match=r"\['learners'\] did not get their resources within "
        r"cluster.placement_timeout_s=3s",
    ):
        start_actors(cfg, prep.model_path, prep.pad_token_id)
    left = {
        pg["name"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"
    }
    assert left == {""}  # only the squatter (unnamed): the run removed its own groups
