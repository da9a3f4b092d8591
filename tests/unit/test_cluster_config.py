"""The KRaft cluster's configuration, without starting it: a cluster id the storage tool can
never read as an option, and the replication each node is told to keep."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from infra import cluster, services
from infra.settings import Settings


def test_cluster_id_never_begins_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    dashed = uuid.UUID(bytes=b"\xf8" + bytes(15))  # url-safe base64 of 0xf8.. is "-..."
    plain = uuid.UUID(bytes=b"\x10" + bytes(15))
    draws = iter([dashed, dashed, plain])
    monkeypatch.setattr(services.uuid, "uuid4", lambda: next(draws))
    cid = services.cluster_id()
    assert not cid.startswith("-") and len(cid) == 22
    assert uuid.UUID(bytes=__import__("base64").urlsafe_b64decode(cid + "==")) == plain


def test_cluster_ids_are_kafka_uuids() -> None:
    ids = {services.cluster_id() for _ in range(2000)}
    assert len(ids) == 2000 and not any(i.startswith("-") for i in ids)


def test_three_nodes_replicate_everything_three_times(tmp_path: Path) -> None:
    s = Settings(bootstrap_servers="127.0.0.1:29092", data_dir=tmp_path)
    members = cluster.nodes(s, 3)
    assert cluster.bootstrap(s, 3) == "127.0.0.1:29092,127.0.0.1:29094,127.0.0.1:29096"
    props = dict(line.split("=", 1) for line in
                 cluster._properties(s, members[1], members).splitlines())
    assert props["node.id"] == "2"
    assert props["controller.quorum.voters"] == \
        "1@127.0.0.1:29093,2@127.0.0.1:29095,3@127.0.0.1:29097"
    assert props["default.replication.factor"] == "3"
    assert props["min.insync.replicas"] == "2"
    assert props["offsets.topic.replication.factor"] == "3"
    assert props["transaction.state.log.min.isr"] == "2"
    assert props["unclean.leader.election.enable"] == "false"
    assert len({n.paths.data for n in members}) == 3
