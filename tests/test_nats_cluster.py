"""The embedded cluster's configuration, and a KILN_NATS_URL that names several servers,
without starting anything (tests/integration/test_nats_cluster.py runs the cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.nats_cluster import EmbeddedNatsCluster, NodePorts
from shared.bus import nats_servers
from shared.settings import Settings, SettingsError


def test_each_node_routes_to_every_node_and_has_its_own_store_and_name(tmp_path: Path):
    cluster = EmbeddedNatsCluster(tmp_path, NodePorts.counting_from(14222, 3), auth="# auth\n")

    assert [node.name for node in cluster.nodes] == ["kiln-1", "kiln-2", "kiln-3"]
    assert [node.root for node in cluster.nodes] == [tmp_path / f"node-{n}" for n in (1, 2, 3)]
    assert cluster.url == "nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
    for node in cluster.nodes:
        assert "listen: 127.0.0.1:1423" in node.extra  # its own cluster port, 10 above
        assert "nats-route://127.0.0.1:14232, nats-route://127.0.0.1:14233, nats-route://127.0.0.1:14234" in (
            node.extra
        )
        assert node.auth == "# auth\n"


def test_a_url_may_list_a_clusters_servers():
    url = "nats://a:4222, nats://b:4222,nats://c:4222"

    assert nats_servers(url) == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert nats_servers("nats://a:4222") == ["nats://a:4222"]
    assert Settings.from_env({"KILN_NATS_URL": url}).nats_address == url
    with pytest.raises(SettingsError, match="KILN_NATS_URL"):
        Settings.from_env({"KILN_NATS_URL": "nats://a:4222,b:4222"})


def test_the_embedded_cluster_is_1_3_or_5_nodes_and_the_cli_reaches_them_all():
    settings = Settings.from_env({"KILN_NATS_CLUSTER": "3", "KILN_NATS_PORT": "14222"})

    assert settings.nats_address == "nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
    with pytest.raises(SettingsError, match="KILN_NATS_CLUSTER"):
        Settings.from_env({"KILN_NATS_CLUSTER": "2"})  # 2 of 2 is the quorum: no node may fail
