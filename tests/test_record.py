"""The trial record: every stored attribute named once (search/record.py)."""

from __future__ import annotations

from slimsearch.search import record
from slimsearch.search.record import TrialRecord


def test_the_key_families_do_not_overlap() -> None:
    families = [record.RESULT_KEYS, record.CUT_SHORT_KEYS, record.PROPOSER_KEYS]
    for i, a in enumerate(families):
        for b in families[i + 1 :]:
            assert not a & b


def test_who_proposed_a_trial_survives_its_result_and_its_cut() -> None:
    attrs = {
        "seed": "refine",
        "refined_from": 3,
        "refine_moves": 2,
        "plan": {"layers": {}},
        "metrics": {"accuracy": 80.0},
        "error": "cancelled",
        "interrupted": True,
        "retries": 0,
    }
    rec = TrialRecord(7, attrs)
    assert rec.proposed_by == {"seed": "refine", "refined_from": 3, "refine_moves": 2}
    assert rec.cut_short and not rec.is_repeat and rec.source == "refined from 3"


def test_sources_and_repeats() -> None:
    assert TrialRecord(0, {}).source == "sampler"
    assert TrialRecord(0, {"seed": "uniform"}).source == "uniform seed"
    assert TrialRecord(0, {"seed": "uniform", "retry_of": 4}).source == "retry of 4"
    assert TrialRecord(0, {"distill": {}, "distilled_from": 2}).source == "distilled from 2"
    assert TrialRecord(0, {"records": {"reused_from": 1}}).is_repeat
    assert TrialRecord(0, {"plan": {"distill": {"kind": "logits"}}}).distilled
