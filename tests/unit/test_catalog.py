"""The catalog's pure rules: lifecycle, record keys, ids, folding, provenance ranges, retention."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.catalog import (
    AliasMoved,
    ArtifactCollected,
    LoraConfig,
    PolicyRegistered,
    Provenance,
    RevisionEvaluated,
    RevisionRecorded,
    RevisionStateChanged,
)
from schemas.codec import encode_event
from schemas.errors import PoisonEventError
from workers.catalog.lifecycle import (
    TRANSITIONS,
    IllegalTransitionError,
    RetentionPolicy,
    RevisionState,
    check_transition,
    decode_record,
    fold,
    offset_ranges,
    partition_for,
    retained,
)

SHA = "ab" * 32
S = RevisionState


def _prov(parent: int = 0) -> Provenance:
    return Provenance(parent_revision=parent, base_model_hash=SHA, trainer_version="t",
                      first_step=1, last_step=2, tokens=3, started_ts=1.0, finished_ts=2.0)


def _rev(n: int, pid: str = "alice") -> RevisionRecorded:
    return RevisionRecorded(policy_id=pid, revision=n, sha256=SHA, size_bytes=10, step=2 * n,
                            provenance=_prov(n - 1))


@pytest.mark.parametrize(("current", "target"), [
    (S.EXPORTED, S.EVALUATED), (S.EVALUATED, S.SERVING), (S.SERVING, S.RETIRED),
    (S.SERVING, S.ROLLED_BACK), (S.RETIRED, S.SERVING), (S.EXPORTED, S.REJECTED),
])
def test_legal_transitions(current: RevisionState, target: RevisionState) -> None:
    check_transition(current, target)


@pytest.mark.parametrize(("current", "target"), [
    (S.EXPORTED, S.SERVING), (S.REJECTED, S.SERVING), (S.SERVING, S.EXPORTED),
    (S.RETIRED, S.EVALUATED), (S.ROLLED_BACK, S.RETIRED), (S.EVALUATED, S.EXPORTED),
])
def test_illegal_transitions_are_refused(current: RevisionState, target: RevisionState) -> None:
    with pytest.raises(IllegalTransitionError, match=f"{current} → {target}"):
        check_transition(current, target)


def test_every_state_has_a_code_and_rules() -> None:
    assert set(TRANSITIONS) == set(RevisionState)
    assert {RevisionState.from_code(s.code) for s in RevisionState} == set(RevisionState)


def test_keys_never_collide_between_facts() -> None:
    recs = [
        PolicyRegistered(policy_id="a", base_model="b", base_model_hash=SHA,
                         lora=LoraConfig(rank=1, alpha=2.0)),
        _rev(1, "a"),
        RevisionEvaluated(policy_id="a", revision=1, score=1, baseline_revision=0,
                          baseline_score=0, prompts=1, passed=True),
        RevisionEvaluated(policy_id="a", revision=1, score=2, baseline_revision=0,
                          baseline_score=0, prompts=1, passed=True),
        RevisionStateChanged(policy_id="a", revision=1, state="evaluated", previous="exported"),
        AliasMoved(policy_id="a", alias="serving", revision=1, previous=0),
        AliasMoved(policy_id="a", alias="candidate", revision=0, previous=1),
        ArtifactCollected(policy_id="a", revision=1, sha256=SHA),
    ]
    assert len({r.key() for r in recs}) == len(recs)
    assert recs[0].key() == "a" and recs[1].key() == "a/rev/1"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 65, "a:b", "-a"])
def test_policy_ids_and_namespaces_are_validated(bad: str) -> None:
    with pytest.raises(ValidationError):
        PolicyRegistered(policy_id=bad, base_model="b", base_model_hash=SHA,
                         lora=LoraConfig(rank=1, alpha=1.0))
    with pytest.raises(ValidationError):
        PolicyRegistered(policy_id="ok", namespace=bad or "a/", base_model="b",
                         base_model_hash=SHA, lora=LoraConfig(rank=1, alpha=1.0))


def test_partition_is_stable_and_matches_kafkas_default() -> None:
    from kafka.partitioner.default import murmur2

    assert partition_for("alice", 4) == (murmur2(b"alice") & 0x7FFFFFFF) % 4
    assert {partition_for(f"p{i}", 3) for i in range(50)} == {0, 1, 2}


def test_decode_round_trip_and_poison() -> None:
    rec = _rev(3)
    assert decode_record(encode_event(rec)) == rec
    with pytest.raises(PoisonEventError):
        decode_record(b'{"kind": "nope", "policy_id": "a"}')
    with pytest.raises(PoisonEventError):
        decode_record(None)


def test_fold_keeps_latest_per_key_and_every_evaluation() -> None:
    e1 = RevisionEvaluated(policy_id="a", revision=1, score=1, baseline_revision=0,
                           baseline_score=0, prompts=1, passed=True)
    views = fold([
        _rev(1, "a"), e1, e1, _rev(2, "a"),
        RevisionStateChanged(policy_id="a", revision=1, state="evaluated", previous="exported"),
        RevisionStateChanged(policy_id="a", revision=1, state="serving", previous="evaluated"),
        AliasMoved(policy_id="a", alias="serving", revision=1, previous=0),
        ArtifactCollected(policy_id="a", revision=2, sha256=SHA),
    ])
    v = views["a"]
    assert v.head == 2 and v.aliases == {"serving": 1, "candidate": 0}
    assert v.revisions[1].state is RevisionState.SERVING
    assert v.revisions[2].state is RevisionState.EXPORTED and v.revisions[2].collected
    assert [e.event_id for e in v.revisions[1].evaluations] == [e1.event_id]


def test_offset_ranges_are_exact_per_partition() -> None:
    ranges = offset_ranges([("rw", 1, 17), ("rw", 1, 10), ("rw", 0, 3), ("rw", 1, 13)])
    assert [(r.partition, r.first, r.last, r.offsets) for r in ranges] == [
        (0, 3, 3, (3,)), (1, 10, 17, (10, 13, 17))]


def test_retention_keeps_aliases_parents_newest_and_in_flight() -> None:
    revs = {n: (S.RETIRED, n - 1) for n in range(1, 7)}
    revs[4] = (S.SERVING, 3)
    revs[6] = (S.EXPORTED, 5)
    revs[5] = (S.REJECTED, 4)
    keep = retained(revs, [4, 0], RetentionPolicy(keep_last=1))
    assert keep == {3, 4, 6}
    keep = retained(revs, [4, 6], RetentionPolicy(keep_last=0))
    assert keep == {3, 4, 5, 6}  # candidate 6 keeps its parent 5
