"""GGUF export: each stored format in the GGUF type that holds it, read back, loaded again."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import tiny_lm_study, tiny_study
from slimsearch.search import gguf_export
from slimsearch.search.cli import main
from slimsearch.search.driver import run_study
from slimsearch.search.study_file import study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, StructuredSettings, apply_plan
from slimsearch.spaces.methods.packed import TiedHead
from tiny import tiny_llama, tiny_llama_untied

MIXED = {
    r"re:.*q_proj": LayerSettings(bits=4, group=32),
    r"re:.*k_proj": LayerSettings(bits=8),
    r"re:.*v_proj": LayerSettings(bits=16),
    r"re:.*o_proj": LayerSettings(bits=3),
    r"re:.*gate_proj": LayerSettings(bits=2),
    r"re:.*up_proj": LayerSettings(bits=8, weight_only=True),
    "model.embed_tokens": LayerSettings(bits=4),
}
TYPES = {
    "blk.0.attn_q.weight": "Q4_1",
    "blk.0.attn_k.weight": "Q8_0",
    "blk.0.attn_v.weight": "BF16",
    "blk.0.attn_output.weight": "Q4_1",
    "blk.0.ffn_gate.weight": "Q4_1",
    "blk.0.ffn_up.weight": "Q8_0",
    "blk.0.ffn_down.weight": "F32",
    "blk.0.attn_norm.weight": "F32",
    "token_embd.weight": "Q4_1",
}


def _dense_reference(base: nn.Module, packed: nn.Module) -> nn.Module:
    """``base`` with every weight replaced by what ``packed`` computes with, ties broken."""
    dense = copy.deepcopy(base)
    for name, module in packed.named_modules():
        if hasattr(module, "dense_weight"):
            target = dense.get_submodule(name)
            target.weight = nn.Parameter(module.dense_weight().detach().clone())
    if isinstance(packed.get_output_embeddings(), TiedHead):
        dense.get_output_embeddings().weight = dense.get_input_embeddings().weight
    return dense


def _write(model: nn.Module, folder: Path) -> tuple[Path, dict[str, object]]:
    path = folder / gguf_export.GGUF_FILE
    return path, gguf_export.write_gguf(model, None, path)


@pytest.mark.parametrize(
    ("make", "head"), [(tiny_llama, None), (tiny_llama_untied, LayerSettings(bits=8))], ids=["tied", "untied"]
)
def test_each_format_is_written_in_the_gguf_type_that_holds_its_codes(
    make: object, head: LayerSettings | None, tmp_path: Path
) -> None:
    base = make()  # type: ignore[operator]
    layers = dict(MIXED) | ({"lm_head": head} if head is not None else {})
    packed = apply_plan(copy.deepcopy(base), CompressionPlan(layers=layers)).eval()
    path, written = _write(packed, tmp_path)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {k: types[k] for k in TYPES} == TYPES
    assert ("output.weight" in types) == (head is not None)
    back = gguf_export.read_back(path, packed)
    assert back["missing"] == [] and back["tensors"] == len(types)
    # Every Q4_1, BF16 and F32 tensor holds the very values the model computes with; Q8_0
    # differs only by its fp16 block scale.
    assert sorted(back["inexact"]) == sorted(k for k, v in types.items() if v == "Q8_0")
    assert 0 < back["max_relative_error"] < 1e-3
    assert written["bytes"] == path.stat().st_size

    loaded = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    reference = _dense_reference(base, packed).eval()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = reference(ids).logits, loaded.eval()(ids).logits
    assert float((got - want).abs().max()) < 2e-3 * float(want.abs().max())


def test_a_tied_head_given_its_own_width_is_written_as_its_own_tensor(tmp_path: Path) -> None:
    base = tiny_llama()
    plan = CompressionPlan(
        layers={"model.embed_tokens": LayerSettings(bits=4), "lm_head": LayerSettings(bits=8)}
    )
    packed = apply_plan(copy.deepcopy(base), plan).eval()
    path, _ = _write(packed, tmp_path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "Q4_1" and types["output.weight"] == "Q8_0"


def test_dropped_blocks_are_left_out_and_the_rest_renumbered(tmp_path: Path) -> None:
    base = tiny_llama()
    plan = CompressionPlan(
        layers={r"re:.*proj": LayerSettings(bits=4)},
        structured={"model.layers.0": StructuredSettings(drop=True)},
    )
    packed = apply_plan(copy.deepcopy(base), plan).eval()
    path, _ = _write(packed, tmp_path)
    reader = gguf.GGUFReader(str(path))
    assert int(reader.fields["llama.block_count"].contents()) == 1
    assert {t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk.")} == {"0"}
    blk0 = next(t for t in reader.tensors if t.name == "blk.0.attn_output.weight")
    want = packed.model.layers[1].self_attn.o_proj.dense_weight().numpy()
    assert np.array_equal(gguf.quants.dequantize(blk0.data, blk0.tensor_type).reshape(want.shape), want)


@pytest.mark.parametrize(
    ("layers", "structured", "message"),
    [
        ({r"re:.*proj": LayerSettings(bits=4, sparsity=0.5)}, {}, r"layer re:\.\*proj: sparsity cannot"),
        ({r"re:.*q_proj": LayerSettings(rank=8)}, {}, r"rank cannot be written as GGUF"),
        ({r"re:.*q_proj": LayerSettings(bits=4, awq=True)}, {}, r"awq cannot be written as GGUF"),
        ({}, {"model.layers.0": StructuredSettings(heads=0.5)}, r"block model.layers.0: structured heads"),
    ],
)
def test_choices_gguf_cannot_express_are_refused_by_name(
    layers: dict[str, LayerSettings], structured: dict[str, StructuredSettings], message: str
) -> None:
    plan = CompressionPlan(layers=layers, structured=structured)
    with pytest.raises(gguf_export.GGUFRefused, match=message):
        gguf_export.check_plan(plan, "llama")
    gguf_export.check_plan(CompressionPlan(layers={r"re:.*": LayerSettings(bits=4, gptq=True)}), "llama")


def test_other_architectures_and_tasks_are_refused() -> None:
    with pytest.raises(
        gguf_export.GGUFRefused, match=r"writes Llama-architecture decoders .*this model is 'bert'"
    ):
        gguf_export.check_plan(CompressionPlan(), "bert")
    with pytest.raises(gguf_export.GGUFRefused, match=r"writes causal LMs .*task is 'classification'"):
        gguf_export.check_plan(CompressionPlan(), "bert", "classification")


def _lm_study(tmp_path: Path) -> Path:
    data = tiny_lm_study(
        tmp_path, space={"default": {"bits": [16, 4]}, "embeddings": [8, 4]}, budget={"trials": 2}
    )
    result = run_study(study_from_mapping(data))
    return result.run_dir


def test_export_format_gguf_writes_reads_back_and_reports_the_check(tmp_path: Path) -> None:
    run = _lm_study(tmp_path)
    out = tmp_path / "out"
    assert main(["export", str(run), str(out), "--trial", "1", "--format", "gguf"]) == 0
    info = json.loads((out / "slimsearch_export.json").read_text())
    written = info["gguf"]
    assert (out / "model.gguf").stat().st_size == written["bytes"]
    assert written["read_back"]["missing"] == [] and written["read_back"]["tensors"] > 0
    card = (out / "README.md").read_text()
    assert "## GGUF (llama.cpp)" in card
    check = written["llama_cpp"]
    if "error" in check:  # llama-cpp-python is an optional extra: the card says why it was not run
        assert f"Not checked in llama.cpp here: {check['error']}" in card
    else:
        assert abs(check["ratio"] - 1.0) < 0.02, check
        assert "Checked in llama.cpp" in card
    (out / "model.safetensors").stat()  # the slimsearch folder is written beside it


def test_export_format_gguf_refuses_a_classifier_before_any_work(tmp_path: Path) -> None:
    result = run_study(study_from_mapping(tiny_study(tmp_path, budget={"trials": 1})))
    out = tmp_path / "out"
    code = main(["export", str(result.run_dir), str(out), "--trial", "0", "--format", "gguf"])
    assert code == 2 and not out.exists()
