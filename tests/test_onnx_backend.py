"""ONNX export with the stored formats' operators, and latency timed in ONNX Runtime."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import tiny_lm_study, tiny_study
from slimsearch.evaluators import EvalContext, LatencySpec, make_evaluator
from slimsearch.search.cli import main
from slimsearch.search.driver import run_study
from slimsearch.search.study_file import StudyError, study_from_mapping
from slimsearch.spaces import CompressionPlan, LayerSettings, apply_plan
from slimsearch.spaces.onnx import export_onnx, feeds, session
from tiny import LLAMA_INT4, MODELS, sentiment_rows, tiny_bert, tiny_llama, wide_llama

pytest.importorskip("onnxruntime")

BLOCKS = r"re:bert\.encoder\.layer\.\d+\..*"
FORMATS: list[tuple[dict[str, Any], str]] = [
    ({"bits": 8}, "MatMulInteger"),
    ({"bits": 8, "weight_only": True}, "MatMulNBits"),
    ({"bits": 4, "group": 32}, "MatMulNBits"),
    ({"bits": 4, "integer_zero": True}, "MatMulNBits"),
    ({"bits": 3}, "MatMulNBits"),
    ({"bits": 2, "integer_zero": True}, "MatMulNBits"),
    ({"bits": 2}, "MatMulNBits"),
    ({"bits": 4, "awq": True}, "MatMulNBits"),
    ({"bits": 16}, "MatMul"),
    ({"bits": 4, "sparsity": 0.5}, "MatMul"),
    ({"rank": 8, "bits": 8}, "MatMulInteger"),
]


@pytest.mark.parametrize(("settings", "op"), FORMATS, ids=[str(s) for s, _ in FORMATS])
def test_onnx_runtime_computes_what_the_packed_model_computes(
    settings: dict[str, Any], op: str, tmp_path: Path
) -> None:
    plan = CompressionPlan(
        layers={BLOCKS: LayerSettings(**settings), "bert.embeddings.word_embeddings": LayerSettings(bits=8)}
    )
    model = apply_plan(tiny_bert(), plan).eval()
    path = tmp_path / "m.onnx"
    ops = export_onnx(model, path, vocab_size=96)
    assert set(ops.values()) == {op}
    ids = torch.randint(1, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding is handled as in torch
    sess = session(path, 1)
    got = sess.run(None, feeds(sess, {"input_ids": ids, "attention_mask": mask}))[0]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    # W8A8: torch quantizes activations to 7 bits (fbgemm's reduce_range), ORT to 8.
    tolerance = 0.05 if op == "MatMulInteger" else 1e-3
    assert np.abs(got - want).max() < tolerance * np.abs(want).max()


DECODERS: list[tuple[str, int | None, float]] = [
    ("llama", None, 1e-5),  # the head is the fp32 table, shared
    ("llama", 16, 5e-3),  # torch's bf16 head takes bf16 activations, ORT's MatMul fp32 ones
    ("llama", 8, 1e-5),
    ("llama", 4, 1e-5),
    ("llama", 2, 1e-5),
    ("llama-untied", 4, 1e-5),
]


@pytest.mark.parametrize(
    ("arch", "table_bits", "tolerance"), DECODERS, ids=[f"{a}-{b}" for a, b, _ in DECODERS]
)
def test_onnx_runtime_computes_what_a_packed_decoder_computes(
    arch: str, table_bits: int | None, tolerance: float, tmp_path: Path
) -> None:
    layers = {r"re:model\.layers\.\d+\..*": LayerSettings(bits=4, group=32)}
    if table_bits:
        layers["model.embed_tokens"] = LayerSettings(bits=table_bits)
    if arch == "llama-untied":
        layers["lm_head"] = LayerSettings(bits=8, weight_only=True)
    model = apply_plan(MODELS[arch](0), CompressionPlan(layers=layers)).eval()
    path = tmp_path / "m.onnx"
    # fp32 activations everywhere: ORT then computes what torch does to float rounding.
    ops = export_onnx(model, path, vocab_size=96, int8_compute=False)
    if table_bits is not None:
        assert ops["lm_head"] == ("MatMul" if table_bits == 16 else "MatMulNBits")
    # Longer than the traced 16 tokens, with a padded row: both are inputs, not constants.
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    sess = session(path, 1)
    got = sess.run(None, feeds(sess, {"input_ids": ids, "attention_mask": mask}))[0]
    # The dense reference: with gradients on, packed layers compute on their dequantized weights.
    want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.detach().numpy()
    assert np.abs(got - want).max() < tolerance * np.abs(want).max()


def _nbits_nodes(path: Path) -> list[tuple[int, str]]:
    """(accuracy_level, zero points' dtype) of each MatMulNBits node of the model at ``path``."""
    import onnx

    graph = onnx.load(str(path)).graph
    types = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            types[node.output[0]] = onnx.helper.tensor_dtype_to_np_dtype(node.attribute[0].t.data_type).name
    out = []
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            level = next((a.i for a in node.attribute if a.name == "accuracy_level"), 0)
            out.append((level, types.get(node.input[3], "?")))
    return out


@pytest.mark.parametrize(("integer_zero", "int8_compute"), [(True, True), (True, False), (False, True)])
def test_integer_zero_points_compute_on_int8_activations(
    integer_zero: bool, int8_compute: bool, tmp_path: Path
) -> None:
    """Whole zero codes are written as uint8 (two a byte) and, with ``int8_compute``, run at
    accuracy_level 4 (ORT's fast path); float zero points stay at level 0 (fp32 activations)."""
    layers = {
        r"re:model\.layers\.\d+\.self_attn\..*": LayerSettings(bits=4, integer_zero=integer_zero),
        r"re:model\.layers\.\d+\.mlp\..*": LayerSettings(bits=8, weight_only=True),
    }
    model = apply_plan(MODELS["llama"](0), CompressionPlan(layers=layers)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, vocab_size=96, int8_compute=int8_compute)
    nodes = _nbits_nodes(path)
    fast = 4 if int8_compute else 0
    # Per block: q/k/v as one operator and o at 4 bits, then gate/up as one and down at int8
    # weight-only (onnx_llama's export form).
    want = ([(fast, "uint8")] if integer_zero else [(0, "float32")]) * 2 + [(fast, "uint8")] * 2
    assert nodes == want * 2
    ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    sess = session(path, 1)
    got = sess.run(None, feeds(sess, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))[0]
    want_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    want_np = want_logits.detach().numpy()
    # int8 activations (per block of columns) cost a little; fp32 ones match to float rounding.
    tolerance = 2e-2 if int8_compute else 1e-5
    assert np.abs(got - want_np).max() < tolerance * np.abs(want_np).max()


def test_sessions_spin_within_a_run_and_stop_when_it_returns(tmp_path: Path) -> None:
    """Spinning threads dispatch small operators faster than sleeping ones; left spinning after
    a run they would take the cores from the session timed in alternation with it."""
    path = tmp_path / "m.onnx"
    export_onnx(tiny_bert().eval(), path, vocab_size=96)
    options = session(path, 2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"


def test_latency_in_onnx_runtime_is_timed_against_the_baseline_there() -> None:
    base = tiny_bert()
    model = apply_plan(copy.deepcopy(base), CompressionPlan(layers={BLOCKS: LayerSettings(bits=8)})).eval()
    spec = LatencySpec(
        batch_size=1, seq_len=8, warmup=1, repeats=5, threads=1, max_drift=0, backend="onnxruntime"
    )
    context = EvalContext(
        task="classification", batches=[], vocab_size=96, plan=CompressionPlan(), latency=spec, reference=base
    )
    ratio = make_evaluator("latency_ratio").evaluate(model, context)
    record = context.records["latency"]
    assert record["environment"]["backend"].startswith("onnxruntime ")
    assert record["environment"]["onnx_ops"] == {"MatMulInteger": 12}
    assert ratio == record["ratio"] and ratio > 0
    assert record["shapes"][0]["quiet_key"].startswith("ort-")


def test_the_onnxruntime_backend_is_checked_at_load(tmp_path: Path) -> None:
    with pytest.raises(
        StudyError, match=r"latency.backend='tensorrt': choose one of \['torch', 'onnxruntime'\]"
    ):
        study_from_mapping(tiny_study(tmp_path, latency={"backend": "tensorrt"}))


# ORT expands 4-bit weights with float zero points (LLAMA_INT4) on loading; integer zero
# points it keeps packed, so that plan, with an int8 table, holds least.
INT4_INTEGER_ZERO = CompressionPlan(
    layers={
        r"re:model\.layers\.\d+\..*": LayerSettings(bits=4, integer_zero=True),
        "model.embed_tokens": LayerSettings(bits=8),
    }
)


@pytest.mark.parametrize(
    ("plan", "bound"), [(LLAMA_INT4, 0.55), (INT4_INTEGER_ZERO, 0.4)], ids=["float-zeros", "integer-zeros"]
)
def test_resident_memory_in_onnx_runtime_falls_with_4_bit_weights(
    plan: CompressionPlan, bound: float
) -> None:
    base = wide_llama()
    spec = LatencySpec(batch_size=1, seq_len=8, threads=1, decode_tokens=6, backend="onnxruntime")
    records = {}
    for name, model in (("fp32", base), ("int4", apply_plan(copy.deepcopy(base), plan).eval())):
        context = EvalContext(
            task="causal-lm",
            batches=[],
            vocab_size=4096,
            plan=CompressionPlan(),
            latency=spec,
            reference=base,
        )
        assert (
            make_evaluator("memory_bytes").evaluate(model, context)
            == context.records["memory"]["resident_bytes"]
        )
        records[name] = context.records["memory"]
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    fp32, int4 = records["fp32"]["resident_bytes"], records["int4"]["resident_bytes"]
    assert records["int4"]["runtime"].startswith("onnxruntime ")
    assert 0.8 * weights < fp32 < 3.0 * weights, records
    # Packed tables are looked up on their codes: with a dense fp32 table (4 MB of the 17)
    # the float-zeros plan measured 0.60-0.62x.
    assert int4 < bound * fp32, records


def test_a_causal_lm_study_times_its_forward_pass_in_onnx_runtime(tmp_path: Path) -> None:
    data = tiny_lm_study(
        tmp_path,
        eval_blocks=2,
        space={"default": {"bits": [32, 4]}, "embeddings": [32, 4]},
        objectives=["perplexity", "latency_ratio"],
        budget={"trials": 2},
    )
    _check_trials_timed_in_onnx_runtime(data, 2)


def test_decoding_in_onnx_runtime_goes_through_the_kv_cache_against_the_baseline_there() -> None:
    from slimsearch.evaluators import measure_decode
    from slimsearch.evaluators.decode import first_token, greedy
    from slimsearch.evaluators.latency import quiet_times

    base = tiny_llama()
    model = apply_plan(
        copy.deepcopy(base), CompressionPlan(layers={r"re:model\.layers\.\d+\..*": LayerSettings(bits=8)})
    )
    spec = LatencySpec(
        batch_size=1,
        seq_len=8,
        warmup=1,
        repeats=5,
        threads=1,
        max_drift=0,
        decode_tokens=6,
        backend="onnxruntime",
    )
    record = measure_decode(model, spec, vocab_size=96, reference=base)
    assert record["environment"]["backend"].startswith("onnxruntime ")
    assert record["environment"]["onnx_ops"] == {"MatMulInteger": 14}
    assert record["ttft_ms"] > 0 and record["tokens_per_s"] > 0 and record["speedup"] > 0
    assert sorted(k.split("-")[:2] for k in quiet_times(record)) == [["decode6", "ort"], ["ttft", "ort"]]
    # Against itself, ORT's cached decoding gives torch's greedy tokens.
    same = measure_decode(base, spec, vocab_size=96, reference=base)
    assert same["same_tokens_as_baseline"] == spec.decode_tokens + 1
    ids = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    token, past = first_token(base, ids)
    with torch.no_grad():
        expected = [int(token[0, 0]), *greedy(base, token, past, spec.decode_tokens)]
    from slimsearch.evaluators.onnx_backend import decode_timers, onnx_session

    tokens: list[int] = []
    decode_timers(onnx_session(base, 96, 1)[0], ids.numpy(), spec.decode_tokens, tokens)[1]()
    assert tokens == expected


def test_a_causal_lm_study_times_generation_in_onnx_runtime(tmp_path: Path) -> None:
    data = tiny_lm_study(
        tmp_path,
        eval_blocks=2,
        space={"default": {"bits": [32, 4]}, "embeddings": [32, 4]},
        objectives=["perplexity", "latency_ratio", "decode_speedup"],
        budget={"trials": 2},
    )
    data["latency"] |= {"backend": "onnxruntime", "decode_tokens": 4, "time_budget": 5}
    result = run_study(study_from_mapping(data))
    complete = [t for t in result.study.trials if t.user_attrs.get("metrics")]
    assert len(complete) == 2
    for trial in complete:
        records = trial.user_attrs["records"]
        assert records["decode"]["environment"]["backend"].startswith("onnxruntime")
        assert trial.user_attrs["metrics"]["decode_speedup"] == records["decode"]["speedup"] > 0
        assert records["latency"]["environment"]["onnx_ops"] == records["decode"]["environment"]["onnx_ops"]


def test_a_study_times_its_trials_in_onnx_runtime(tmp_path: Path) -> None:
    data = tiny_study(tmp_path, objectives=["accuracy", "size_bytes", "latency_ratio"], budget={"trials": 3})
    _check_trials_timed_in_onnx_runtime(data, 3)


def _check_trials_timed_in_onnx_runtime(data: dict[str, Any], trials: int) -> None:
    data["latency"] |= {"backend": "onnxruntime"}
    result = run_study(study_from_mapping(data))
    complete = [t for t in result.study.trials if t.user_attrs.get("metrics")]
    assert len(complete) == trials
    for trial in complete:
        latency = trial.user_attrs["records"]["latency"]
        assert latency["environment"]["backend"].startswith("onnxruntime")
        assert trial.user_attrs["metrics"]["latency_ratio"] == latency["ratio"] > 0


def test_export_format_onnx_writes_a_model_checked_in_onnx_runtime(tmp_path: Path) -> None:
    result = run_study(study_from_mapping(tiny_study(tmp_path, budget={"trials": 2})))
    out = tmp_path / "out"
    assert main(["export", str(result.run_dir), str(out), "--trial", "1", "--format", "onnx"]) == 0
    info = json.loads((out / "slimsearch_export.json").read_text())["onnx"]
    assert (out / "model.onnx").stat().st_size == info["bytes"]
    # The ONNX model scores what the search measured for the trial, within one example.
    searched = result.study.trials[1].user_attrs["metrics"]["accuracy"]
    assert abs(info["accuracy"] - searched) <= 100.0 / 16 + 1e-9
    assert info["latency_ratio"] > 0 and info["runtime"].startswith("onnxruntime")
    assert "## ONNX (ONNX Runtime)" in (out / "README.md").read_text()


def test_a_text_pair_study_exports_to_onnx_with_its_segment_ids(tmp_path: Path) -> None:
    import datasets

    rows = [{"a": t, "b": " ".join(t.split()[:2]), "label": y} for t, y in sentiment_rows(48)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    pairs = {"data": str(tmp_path / "pairs.parquet"), "text_column": "a", "text_pair_column": "b"}
    data = tiny_study(tmp_path, budget={"trials": 2})
    data["task"] = {k: v for k, v in data["task"].items() if k != "rows"} | pairs
    result = run_study(study_from_mapping(data))
    out = tmp_path / "out"
    assert main(["export", str(result.run_dir), str(out), "--trial", "1", "--format", "onnx"]) == 0
    info = json.loads((out / "slimsearch_export.json").read_text())["onnx"]
    names = [i.name for i in session(out / "model.onnx", 1).get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    searched = result.study.trials[1].user_attrs["metrics"]["accuracy"]
    assert abs(info["accuracy"] - searched) <= 100.0 / 16 + 1e-9


def test_export_format_onnx_writes_a_causal_lm_scored_in_onnx_runtime(tmp_path: Path) -> None:
    data = tiny_lm_study(
        tmp_path, eval_blocks=2, space={"default": {"bits": [4]}, "embeddings": [4]}, budget={"trials": 1}
    )
    result = run_study(study_from_mapping(data))
    out = tmp_path / "out"
    assert main(["export", str(result.run_dir), str(out), "--trial", "0", "--format", "onnx"]) == 0
    info = json.loads((out / "slimsearch_export.json").read_text())["onnx"]
    # Every block Linear and the tied output layer on the 4-bit table run on MatMulNBits.
    assert info["operators"] == {"MatMulNBits": 2 * 7 + 1}
    searched = result.study.trials[0].user_attrs["metrics"]["perplexity"]
    assert info["slimsearch_perplexity"] == pytest.approx(searched, rel=1e-6)
    assert info["perplexity"] == pytest.approx(searched, rel=1e-3)
    assert info["tokens"] == 2 * 7
    # Written with its KV cache; greedy decoding through it agrees with recomputing the prefix.
    assert info["decode"]["agree"] == info["decode"]["tokens"] == 32 and info["decode"]["tokens_per_s"] > 0
    card = (out / "README.md").read_text()
    assert "perplexity" in card and "carries the KV cache" in card and "on 32 of 32 tokens" in card


def test_segment_ids_of_a_text_pair_reach_onnx_runtime(tmp_path: Path) -> None:
    """A BERT-style model's graph takes token_type_ids; ORT given a pair's segment ids computes
    what torch computes with them (and not what it computes without)."""
    model = tiny_bert()
    with torch.no_grad():
        # LayerNorm follows the embeddings: a constant shift would vanish, a random one does not.
        model.bert.embeddings.token_type_embeddings.weight[1] = torch.randn(
            32, generator=torch.Generator().manual_seed(1)
        )
    path = tmp_path / "m.onnx"
    export_onnx(model, path, vocab_size=96)
    sess = session(path, 1)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}
    got = sess.run(None, feeds(sess, batch))[0]
    with torch.no_grad():
        want = model(**batch).logits.numpy()
        single = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.numpy()
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max() + 1e-6
    assert np.abs(single - want).max() > 1e-2 * np.abs(want).max()


def test_a_causal_lm_exported_with_its_kv_cache_decodes_as_it_scores(tmp_path: Path) -> None:
    """With ``kv_cache``, one token a step through the cache gives the logits of a whole pass
    over the same sequence, and the same greedy tokens as recomputing the prefix each step;
    an empty past (what ``feeds`` gives) scores a whole block as the cacheless graph does."""
    from slimsearch.spaces.onnx import generate

    layers = {r"re:model\.layers\.\d+\..*": LayerSettings(bits=4, integer_zero=True)}
    model = apply_plan(MODELS["llama"](0), CompressionPlan(layers=layers)).eval()
    export_onnx(model, tmp_path / "kv.onnx", vocab_size=96, int8_compute=False, kv_cache=True)
    export_onnx(model, tmp_path / "plain.onnx", vocab_size=96, int8_compute=False)
    kv, plain = session(tmp_path / "kv.onnx", 1), session(tmp_path / "plain.onnx", 1)
    outputs = [o.name for o in kv.get_outputs()]
    assert outputs[0] == "logits" and outputs[1:3] == ["present.0.key", "present.0.value"]
    ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    whole = plain.run(None, feeds(plain, {"input_ids": ids}))[0]
    scored = kv.run(None, feeds(kv, {"input_ids": ids}))[0]
    assert np.abs(scored - whole).max() < 1e-4 * np.abs(whole).max()
    # The first 9 tokens fill the cache; the last 3 go through it.
    first = kv.run(None, feeds(kv, {"input_ids": ids[:, :9]}))
    feed = dict(zip([n.replace("present", "past_key_values") for n in outputs[1:]], first[1:], strict=True))
    feed.update(
        input_ids=ids[:, 9:].numpy(),
        attention_mask=np.ones((2, 12), dtype=np.int64),
        position_ids=np.tile(np.arange(9, 12), (2, 1)),
    )
    step = kv.run(None, feed)
    assert step[1].shape[2] == 12  # the cache grew by the 3 new tokens
    assert np.abs(step[0] - whole[:, 9:]).max() < 1e-4 * np.abs(whole).max()
    prompt = ids[:1, :5]
    cached = generate(kv, prompt, 6)
    assert cached == generate(kv, prompt, 6, kv_cache=False) == generate(plain, prompt, 6, kv_cache=False)
    torch_tokens = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, 5:]
    assert cached == torch_tokens.tolist()
    with pytest.raises(ValueError, match="no KV cache"):
        generate(plain, prompt, 2)
    with pytest.raises(ValueError, match="causal LMs"):
        export_onnx(tiny_bert(), tmp_path / "bert.onnx", vocab_size=96, kv_cache=True)


def test_exporting_leaves_no_dense_copy_on_the_model(tmp_path: Path) -> None:
    """The export computes fp32 tables; the model must not keep them (a trial timed in ORT
    would hold them while it lives, and pickle them into a memory measurement)."""
    import io

    def pickled(model: torch.nn.Module) -> int:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        return buffer.tell()

    layers = {
        r"re:model\.layers\.\d+\..*": LayerSettings(bits=4),
        "model.embed_tokens": LayerSettings(bits=8),
    }
    model = apply_plan(tiny_llama(), CompressionPlan(layers=layers)).eval()
    before = pickled(model)
    export_onnx(model, tmp_path / "m.onnx", vocab_size=96, kv_cache=True)
    assert pickled(model) <= before + 4096  # not the 12 KB fp32 table
    assert "dense" not in model.model.embed_tokens._cache


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
@pytest.mark.parametrize("dim", [32, 70])
def test_a_packed_table_is_looked_up_on_its_codes(bits: int, dim: int, tmp_path: Path) -> None:
    """The exported lookup holds the table's codes, no fp32 copy, and returns the rows torch
    looks up, for rows not a whole number of groups or bytes (70) and any shape of ids."""
    import onnx

    from slimsearch.spaces.methods import PackedEmbedding
    from slimsearch.spaces.onnx import _Lookup

    torch.manual_seed(0)
    table = PackedEmbedding.from_embedding(torch.nn.Embedding(50, dim), bits)
    path = tmp_path / "lookup.onnx"
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.onnx.export(
            _Lookup(table),
            (ids,),
            str(path),
            input_names=["ids"],
            dynamic_axes={"ids": {0: "a", 1: "b"}},
            opset_version=17,
            dynamo=False,
        )
    graph = onnx.load(str(path)).graph
    floats = [t for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert all(np.prod(t.dims) < 50 * dim for t in floats), [list(t.dims) for t in floats]
    other = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    sess = session(path, 1)
    got = sess.run(None, {"ids": other.numpy()})[0]
    with torch.no_grad():
        want = table(other).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()
