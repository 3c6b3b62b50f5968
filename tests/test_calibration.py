"""Calibration statistics: what capture measures, in one pass or several, and how they are
stored, narrowed and used by a method that stores its own codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from slimsearch.spaces.methods import PackedLinear
from slimsearch.spaces.methods.calibration import CalibrationStats, capture
from slimsearch.spaces.methods.quantize import quantize_groups, quantize_rows
from slimsearch.spaces.methods.registry import LinearWork
from tiny import tiny_bert

QUERY = "bert.encoder.layer.0.attention.self.query"


def _batch() -> dict[str, Tensor]:
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _inputs_of(model: nn.Module, name: str, batch: dict[str, Tensor]) -> Tensor:
    """The real (unpadded) rows the Linear ``name`` sees, recorded by a plain hook."""
    seen: list[Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, i: seen.append(i[0].detach()))
    with torch.no_grad():
        model.eval()(**batch)
    handle.remove()
    return seen[0][batch["attention_mask"].bool()]


def test_capture_measures_real_tokens_only() -> None:
    model, batch = tiny_bert(0), _batch()
    stats = capture(model, [batch], {"act_sq", "hessian"})
    rows = _inputs_of(model, QUERY, batch)
    assert stats.tokens == int(batch["attention_mask"].sum()) == rows.shape[0]
    assert torch.allclose(stats.act_sq[QUERY], rows.pow(2).sum(dim=0), rtol=1e-5)
    assert torch.allclose(stats.hessian[QUERY], rows.T @ rows, rtol=1e-4, atol=1e-5)


def test_hessians_in_several_passes_are_the_same_as_in_one() -> None:
    model, batch = tiny_bert(0), _batch()
    one = capture(model, [batch], {"act_sq", "hessian"})
    passes: list[str] = []
    width = model.get_submodule(QUERY).in_features
    many = capture(model, [batch], {"act_sq", "hessian"}, hessian_budget=width**2 * 4, progress=passes.append)
    assert len(passes) > 1 and "pass 2 of" in passes[1]
    assert sorted(one.hessian) == sorted(many.hessian) and sorted(one.act_sq) == sorted(many.act_sq)
    for name in one.hessian:
        assert torch.equal(one.hessian[name], many.hessian[name])
        assert torch.equal(one.act_sq[name], many.act_sq[name])


def test_statistics_round_trip_and_follow_a_cut(tmp_path: Path) -> None:
    stats = capture(tiny_bert(0), [_batch()], {"act_sq", "hessian"})
    stats.save(tmp_path / "s.safetensors")
    loaded = CalibrationStats.load(tmp_path / "s.safetensors")
    assert loaded.kinds == stats.kinds and loaded.tokens == stats.tokens
    assert all(torch.equal(loaded.hessian[n], stats.hessian[n]) for n in stats.hessian)
    kept = torch.tensor([0, 2, 5])
    cut = stats.narrowed({QUERY: kept})
    assert torch.equal(cut.act_sq[QUERY], stats.act_sq[QUERY][kept])
    assert torch.equal(cut.hessian[QUERY], stats.hessian[QUERY][kept][:, kept])
    with pytest.raises(ValueError, match="unknown calibration statistics"):
        capture(tiny_bert(0), [_batch()], {"fisher"})


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_codes_a_method_chose_store_like_rounded_ones(bits: int, sparse: bool) -> None:
    """from_codes, given the codes rounding would choose, stores exactly what from_work does."""
    linear = nn.Linear(64, 12)
    weight = linear.weight.detach().float()
    keep = (torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.3) if sparse else None
    if keep is not None:
        weight = weight * keep
    work = LinearWork(weight, linear.bias.detach(), keep=keep)
    if bits == 8:
        codes, scale = quantize_rows(weight, 8)
        offset = None
    else:
        codes, scale, offset = quantize_groups(weight, bits, keep)
    stored = PackedLinear.from_codes(work, bits, codes, scale, offset, method="mine")
    expected = PackedLinear.from_work(work, bits, "mine")
    assert list(stored.state_dict()) == list(expected.state_dict())
    assert all(torch.equal(stored.state_dict()[k], v) for k, v in expected.state_dict().items())
    assert stored.made_by == ("mine",)
    with pytest.raises(ValueError, match="codes have shape"):
        PackedLinear.from_codes(work, bits, codes[:, :8], scale, offset)


def test_the_calibration_count_and_the_advice_on_too_few_tokens_for_hessians() -> None:
    from slimsearch.search.data import CALIBRATION_BLOCKS, CALIBRATION_ROWS, calibration_count
    from slimsearch.search.study_file import TaskSpec
    from slimsearch.search.worker import HESSIAN_TOKENS, few_calibration_tokens

    lm = TaskSpec(kind="causal-lm", data="builtin:oanc", block_size=256)
    labelled = TaskSpec(kind="classification", data="builtin:movie-reviews")
    assert calibration_count(lm) == CALIBRATION_BLOCKS and calibration_count(labelled) == CALIBRATION_ROWS
    advice = few_calibration_tokens(lm, frozenset({"hessian"}))
    assert (
        advice is not None and "task.calibration_rows" in advice and f"{CALIBRATION_BLOCKS} blocks" in advice
    )
    assert few_calibration_tokens(lm, frozenset({"act_sq"})) is None  # Wanda-style norms need few
    assert few_calibration_tokens(labelled, frozenset({"hessian"})) is None
    enough = TaskSpec(
        kind="causal-lm", data="builtin:oanc", block_size=256, calibration_rows=HESSIAN_TOKENS // 256
    )
    assert calibration_count(enough) == 16 and few_calibration_tokens(enough, frozenset({"hessian"})) is None
