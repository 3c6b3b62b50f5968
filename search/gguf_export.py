"""GGUF export of a Llama-architecture decoder, each tensor in the GGUF type that holds its
stored codes (GGUF mixes types per tensor natively), read back and checked.

What each choice becomes:
- untouched fp32 weights, norms: ``F32``; ``bits: 16``: ``BF16`` (the same values);
- ``bits: 4`` (any group of 32/64/128), ``3``, ``2``: ``Q4_1``, blocks of 32 columns with an
  fp16 scale and minimum: slimsearch's codes, scales and offsets are written as they are, so
  the values are the same bits (3- and 2-bit codes take 4 bits each in the file; GGUF's
  ``Q3_K``/``Q2_K`` quantize their scales, which these codes do not fit);
- ``bits: 8`` (W8A8 or weight-only): ``Q8_0``, the int8 codes as they are, with the row's
  fp32 scale rounded to fp16 per block of 32 (the only change; the read-back reports it);
- a row length that is not a multiple of 32: ``F32`` of the stored values.
Choices GGUF cannot express are refused before any work: sparsity (``sparsity``, ``wanda``,
``sparsegpt``: GGUF stores no masks), low rank (two factors where llama.cpp wants one),
AWQ's input scale, structured heads and neurons, and methods it does not know. Dropped
blocks (``drop``) are left out and the rest renumbered.

Metadata: the source GGUF's (tokenizer, chat template, hyper-parameters) when the baseline
came from one (``builtin:smollm2-135m``), else the hyper-parameters from the config, a
GPT-2-style BPE tokenizer when the model's tokenizer is one, and none otherwise (llama.cpp
can then still score token ids).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimsearch.search.study_file import StudyError
from slimsearch.spaces import CompressionPlan
from slimsearch.spaces.methods import PackedEmbedding, PackedLinear
from slimsearch.spaces.methods.packed import TiedHead
from slimsearch.spaces.methods.quantize import GROUP_SIZE, GROUPED_BITS, group_size_for

GGUF_FILE = "model.gguf"
BLOCK = 32  # columns per Q4_1 / Q8_0 block
LLAMA_TYPES = ("llama",)
EXPRESSIBLE = {"bits", "group", "weight_only", "gptq"}  # layer methods whose result GGUF holds
PROJECTIONS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


class GGUFRefused(StudyError):
    """The model or plan holds something GGUF cannot express."""


def refusals(plan: CompressionPlan, model_type: str, task: str = "causal-lm") -> list[str]:
    """Why ``plan`` on a ``model_type`` model cannot be written as GGUF (empty: it can)."""
    out = []
    if task != "causal-lm":
        out.append(f"GGUF export writes causal LMs (llama.cpp's models); this study's task is {task!r}")
    elif model_type not in LLAMA_TYPES:
        out.append(
            f"GGUF export writes Llama-architecture decoders ({', '.join(LLAMA_TYPES)}; SmolLM2 is one); "
            f"this model is {model_type!r}"
        )
    for pattern, settings in plan.layers.items():
        extra = sorted(set(settings.values) - EXPRESSIBLE)
        if extra:
            out.append(
                f"layer {pattern}: {', '.join(extra)} cannot be written as GGUF (it stores each weight "
                f"matrix whole, quantized in blocks: no masks, factors or input scales); GGUF takes "
                f"{sorted(EXPRESSIBLE)}"
            )
    for pattern, structured in plan.structured.items():
        extra = sorted(set(structured.values) - {"drop"})
        if extra:
            out.append(
                f"block {pattern}: structured {', '.join(extra)} changes per-block head or neuron counts, "
                "which this GGUF export does not write"
            )
    return out


def check_plan(plan: CompressionPlan, model_type: str, task: str = "causal-lm") -> None:
    problems = refusals(plan, model_type, task)
    if problems:
        raise GGUFRefused(
            "this trial cannot be exported as GGUF: " + "; ".join(problems) + ". Export it with "
            "--format hf, or pick a front trial without these choices"
        )


# -- tensors ------------------------------------------------------------------------------
@dataclass
class Tensor_:
    """One GGUF tensor: its bytes (or float array), type name, and logical (rows, cols)."""

    data: np.ndarray
    qtype: str
    shape: tuple[int, ...]


def _q4_1(codes: Tensor, scale: Tensor, offset: Tensor, group: int) -> np.ndarray:
    """Q4_1 blocks [d fp16, m fp16, 16 bytes of codes (j | j+16 << 4)] from group codes."""
    rows, cols = codes.shape
    group = group_size_for(cols, group)
    blocks = cols // BLOCK
    which = torch.arange(blocks) * BLOCK // group  # the group each block lies in
    d = scale.to(torch.float16)[:, which].contiguous().view(torch.uint8).view(rows, blocks, 2)
    m = offset.to(torch.float16)[:, which].contiguous().view(torch.uint8).view(rows, blocks, 2)
    c = codes.to(torch.uint8).view(rows, blocks, BLOCK)
    qs = c[..., : BLOCK // 2] | (c[..., BLOCK // 2 :] << 4)
    return torch.cat([d, m, qs], dim=-1).reshape(rows, blocks * 20).numpy()


def _q8_0(codes: Tensor, scale: Tensor) -> np.ndarray:
    """Q8_0 blocks [d fp16, 32 int8 codes] from per-row symmetric int8 codes."""
    rows, cols = codes.shape
    blocks = cols // BLOCK
    d = scale.float().to(torch.float16).view(rows, 1).expand(rows, blocks).contiguous()
    d_bytes = d.view(torch.uint8).view(rows, blocks, 2)
    q = codes.to(torch.int8).contiguous().view(torch.uint8).view(rows, blocks, BLOCK)
    return torch.cat([d_bytes, q], dim=-1).reshape(rows, blocks * 34).numpy()


def _float(weight: Tensor, qtype: str) -> Tensor_:
    if qtype == "BF16":
        bits = weight.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        return Tensor_(bits, "BF16", tuple(weight.shape))
    return Tensor_(weight.float().contiguous().numpy(), "F32", tuple(weight.shape))


def linear_tensor(module: nn.Module) -> Tensor_:
    """The GGUF tensor of a Linear's weight, in the type that holds its stored codes."""
    if isinstance(module, nn.Linear):
        return _float(module.weight.detach(), "F32")
    if not isinstance(module, PackedLinear):
        raise GGUFRefused(f"{type(module).__name__} is not a Linear this GGUF export knows")
    if module.sparse or module.column_scale() is not None:
        raise GGUFRefused("a sparse or input-scaled layer cannot be written as GGUF")
    shape = (module.out_features, module.in_features)
    if module.bits == 16:
        return _float(module.dense_weight(), "BF16")
    if module.bits == 32 or module.in_features % BLOCK:
        return _float(module.dense_weight(), "F32")
    codes = module._dense_stored()
    if module.bits == 8:
        return Tensor_(_q8_0(codes, module.scale), "Q8_0", shape)
    return Tensor_(_q4_1(codes, module.scale, module.offset, module.group), "Q4_1", shape)


def table_tensor(module: nn.Module) -> Tensor_:
    """The GGUF tensor of an embedding table (the tied LM head reads the same)."""
    if isinstance(module, nn.Embedding):
        return _float(module.weight.detach(), "F32")
    if not isinstance(module, PackedEmbedding):
        raise GGUFRefused(f"{type(module).__name__} is not an embedding table this GGUF export knows")
    if module.lookup_scale != 1.0:
        raise GGUFRefused("a scaled embedding (Gemma's) is not a Llama table")
    shape = (module.num_embeddings, module.embedding_dim)
    if module.bits == 16:
        return _float(module.dense_weight(), "BF16")
    if module.embedding_dim % BLOCK:
        return _float(module.dense_weight(), "F32")
    if module.bits == 8:
        codes = module.values.view(shape)
        return Tensor_(_q8_0(codes, module.scale.reshape(-1)), "Q8_0", shape)
    if module.bits in GROUPED_BITS:
        codes = module.stored_codes()
        return Tensor_(_q4_1(codes, module.scale, module.offset, GROUP_SIZE), "Q4_1", shape)
    return _float(module.dense_weight(), "F32")


def _permute(data: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q and k (rotary pairs interleaved): the inverse of what
    transformers undoes when it reads a GGUF. Whole rows move, so their blocks stay exact."""
    rows = data.shape[0]
    return data.reshape(heads, 2, rows // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


@dataclass
class Entry:
    """One GGUF tensor's source: a module (Linear or table) or a plain float tensor."""

    name: str
    source: nn.Module | Tensor
    kind: str  # "linear", "table" or "float"
    heads: int = 0  # q and k: rows are permuted per this many heads


def entries(model: nn.Module) -> list[Entry]:
    """What each GGUF tensor of a (compressed) Llama model is made from; dropped blocks are
    left out and the rest numbered on."""
    config: Any = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    permuted = {"attn_q": heads, "attn_k": kv_heads}
    out = [Entry("token_embd.weight", model.get_input_embeddings(), "table")]  # type: ignore[operator]
    kept = 0
    layers: Any = model.get_submodule("model.layers")
    for block in layers:
        if not hasattr(block, "self_attn"):  # a dropped block: an identity module
            continue
        for attr, short in PROJECTIONS.items():
            module = block.get_submodule(attr)
            out.append(Entry(f"blk.{kept}.{short}.weight", module, "linear", permuted.get(short, 0)))
            bias = getattr(module, "bias", None)
            if bias is not None:
                out.append(Entry(f"blk.{kept}.{short}.bias", bias.detach(), "float", permuted.get(short, 0)))
        for attr, short in NORMS.items():
            out.append(
                Entry(f"blk.{kept}.{short}.weight", block.get_submodule(attr).weight.detach(), "float")
            )
        kept += 1
    final_norm: Any = model.get_submodule("model.norm")
    out.append(Entry("output_norm.weight", final_norm.weight.detach(), "float"))
    if not _tied(model):
        head = model.get_output_embeddings()  # type: ignore[operator]
        out.append(Entry("output.weight", head, "linear"))
    return out


def _tied(model: nn.Module) -> bool:
    """Whether the LM head reads the embedding table (then GGUF has no ``output.weight``):
    by the modules, not the config, since a plan may give a tied head its own width."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    table = model.get_input_embeddings()  # type: ignore[operator]
    if isinstance(head, TiedHead):
        return True
    weight = getattr(head, "weight", None)
    return isinstance(head, nn.Linear) and isinstance(table, nn.Embedding) and weight is table.weight


def tensor_of(entry: Entry) -> Tensor_:
    """The GGUF tensor (bytes in its type) of one entry, rows in llama.cpp's order."""
    if entry.kind == "float":
        assert isinstance(entry.source, Tensor)
        tensor = _float(entry.source, "F32")
    elif entry.kind == "table":
        assert isinstance(entry.source, nn.Module)
        tensor = table_tensor(entry.source)
    else:
        assert isinstance(entry.source, nn.Module)
        tensor = linear_tensor(entry.source)
    if entry.heads:
        tensor.data = _permute(tensor.data, entry.heads)
    return tensor


def values_of(entry: Entry) -> np.ndarray:
    """The fp32 values the model computes with for one entry, rows in llama.cpp's order."""
    source = entry.source
    if isinstance(source, Tensor):
        weight = source.float()
    elif isinstance(source, (PackedLinear, PackedEmbedding)):
        weight = source.dense_weight()
    else:
        weight = source.weight.detach().float()  # type: ignore[operator]
    data = weight.detach().contiguous().numpy()
    return _permute(data, entry.heads) if entry.heads else data


# -- metadata -----------------------------------------------------------------------------
@dataclass
class Metadata:
    arch: str
    values: dict[str, Any] = field(default_factory=dict)
    copied_from: str | None = None  # the source GGUF whose fields were copied
    tokenizer: str = "none"


def _hparams(config: Any, blocks: int) -> dict[str, Any]:
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_theta", None)
    if rope is None:
        rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return {
        "llama.block_count": blocks,
        "llama.context_length": int(config.max_position_embeddings),
        "llama.embedding_length": int(config.hidden_size),
        "llama.feed_forward_length": int(config.intermediate_size),
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": int(getattr(config, "num_key_value_heads", None) or heads),
        "llama.rope.freq_base": float(rope),
        "llama.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "llama.rope.dimension_count": head_dim,
        "llama.vocab_size": int(config.vocab_size),
    }


def metadata(model: nn.Module, tokenizer: Any, source_gguf: Path | None, blocks: int) -> Metadata:
    import gguf

    config = model.config  # type: ignore[union-attr]
    meta = Metadata(arch="llama", values=_hparams(config, blocks))
    if source_gguf is not None:
        reader = gguf.GGUFReader(str(source_gguf))
        for name, fld in reader.fields.items():
            if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
                continue
            if name in meta.values:  # this model's shape wins (e.g. fewer blocks)
                continue
            sub = fld.types[-1] if fld.types[0] == gguf.GGUFValueType.ARRAY else None
            meta.values[name] = (fld.contents(), fld.types[0], sub)
        meta.copied_from = str(source_gguf)
        meta.tokenizer = "copied from the source GGUF"
        return meta
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_json = backend.to_str() if backend is not None else None
    if model_json is not None and '"type":"BPE"' in model_json.replace(" ", ""):
        bpe = json.loads(model_json)["model"]
        vocab = sorted(bpe["vocab"].items(), key=lambda kv: kv[1])
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
        meta.values["tokenizer.ggml.model"] = "gpt2"
        meta.values["tokenizer.ggml.pre"] = "default"
        meta.values["tokenizer.ggml.tokens"] = [t for t, _ in vocab]
        meta.values["tokenizer.ggml.merges"] = merges
        meta.tokenizer = "GPT-2-style BPE from the model's tokenizer (llama.cpp's default pre-tokenizer)"
    else:
        meta.values["tokenizer.ggml.model"] = "none"
        meta.tokenizer = "none (the model's tokenizer is not BPE): llama.cpp scores token ids only"
    return meta


def write_gguf(
    model: nn.Module, tokenizer: Any, path: Path, source_gguf: Path | None = None
) -> dict[str, Any]:
    """Write ``model`` as GGUF at ``path``; returns what was written, per tensor type."""
    import gguf

    tensors = {e.name: tensor_of(e) for e in entries(model)}
    blocks = len({name.split(".")[1] for name in tensors if name.startswith("blk.")})
    meta = metadata(model, tokenizer, source_gguf, blocks)
    writer = gguf.GGUFWriter(str(path), meta.arch)
    for name, value in meta.values.items():
        if isinstance(value, tuple):
            writer.add_key_value(name, value[0], value[1], sub_type=value[2])
        elif isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, int):
            writer.add_uint32(name, value)
        elif isinstance(value, float):
            writer.add_float32(name, value)
        elif isinstance(value, str):
            writer.add_string(name, value)
        else:
            writer.add_array(name, value)
    writer.add_file_type(gguf.LlamaFileType.GUESSED)
    for name, tensor in tensors.items():
        qtype = gguf.GGMLQuantizationType[tensor.qtype]
        raw_shape = None if tensor.qtype == "F32" else tensor.data.shape
        writer.add_tensor(name, tensor.data, raw_shape=raw_shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "tensor_types": dict(sorted(Counter(t.qtype for t in tensors.values()).items())),
        "tokenizer": meta.tokenizer,
        "metadata_from": meta.copied_from,
    }


def read_back(path: Path, model: nn.Module) -> dict[str, Any]:
    """Read ``path`` with the ``gguf`` package, dequantize every tensor, and compare it with
    the fp32 weights the model computes with (in llama.cpp's row order)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    expected = {e.name: e for e in entries(model)}
    missing = sorted(set(expected) - {t.name for t in reader.tensors})
    worst: dict[str, float] = {}
    exact = 0
    for tensor in reader.tensors:
        want = values_of(expected[tensor.name])
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if np.array_equal(got, want):
            exact += 1
            continue
        worst[tensor.name] = float(np.abs(got - want).max()) / (float(np.abs(want).max()) or 1.0)
    return {
        "tensors": len(reader.tensors),
        "missing": missing,
        "bit_exact": exact,
        "max_relative_error": max(worst.values(), default=0.0),
        "inexact": {name: worst[name] for name in sorted(worst)},
    }


def llama_cpp_perplexity(path: Path, batches: list[dict[str, Tensor]], threads: int) -> dict[str, Any]:
    """Perplexity of the GGUF file in llama.cpp (``llama-cpp-python``) on the same token
    blocks slimsearch scores: every block evaluated from an empty cache, logits of every
    position, the same mean next-token negative log-likelihood. ``{"error": ...}`` when
    llama.cpp is not installed or cannot load the file."""
    try:
        import llama_cpp
    except ImportError as exc:
        return {"error": f"llama-cpp-python is not installed ({exc}); pip install -e '.[gguf]' builds it"}
    length = max(int(b["input_ids"].shape[1]) for b in batches)
    try:
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=length,
            n_batch=length,
            n_threads=threads,
            logits_all=True,
            verbose=False,
        )
    except (ValueError, RuntimeError) as exc:
        return {"error": f"llama.cpp could not load {path.name}: {exc}"}
    nll = 0.0
    count = 0
    for batch in batches:
        for row in batch["input_ids"].tolist():
            llm.reset()
            llm.eval(row)
            logits = torch.from_numpy(np.array(llm.scores[: len(row) - 1], dtype=np.float32))
            target = torch.tensor(row[1:])
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += len(row) - 1
    llm.close()
    return {
        "perplexity": float(np.exp(nll / max(count, 1))),
        "tokens": count,
        "runtime": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}",
    }


def write_and_check(
    model: nn.Module,
    tokenizer: Any,
    out: Path,
    source_gguf: Path | None,
    batches: list[dict[str, Tensor]],
    threads: int,
    measured: Mapping[str, float],
) -> dict[str, Any]:
    """Write ``out/model.gguf``, read it back, and score it in llama.cpp against slimsearch's
    perplexity in ``measured``: what the card and the export's JSON report."""
    from slimsearch.search.log import say

    path = out / GGUF_FILE
    say(f"writing {path.name}")
    written = write_gguf(model, tokenizer, path, source_gguf)
    written["read_back"] = read_back(path, model)
    say(f"checking {path.name} in llama.cpp")
    check = llama_cpp_perplexity(path, batches, threads)
    if "perplexity" in check and "perplexity" in measured:
        check["slimsearch_perplexity"] = measured["perplexity"]
        check["ratio"] = check["perplexity"] / measured["perplexity"]
    written["llama_cpp"] = check
    return written


def card(gguf: Mapping[str, Any] | None) -> list[str]:
    """The model card's GGUF section (nothing without a GGUF export)."""
    if gguf is None:
        return []
    back = gguf["read_back"]
    inexact = ", ".join(back["inexact"])[:300]
    types = ", ".join(f"{n} x {t}" for t, n in gguf["tensor_types"].items())
    lines = [
        "",
        "## GGUF (llama.cpp)",
        "",
        f"- `{gguf['file']}`: {gguf['bytes']} bytes; tensors {types}. Each layer's stored codes are "
        "written in the GGUF type that holds them (4/3/2 bits: Q4_1; 8 bits: Q8_0 with the row "
        "scale rounded to fp16; bf16: BF16).",
        f"- Read back with the `gguf` package and dequantized: {back['bit_exact']} of {back['tensors']} "
        f"tensors bit for bit the weights this model computes with; largest relative difference "
        f"{back['max_relative_error']:.2g}" + (f" ({inexact})" if inexact else "") + ".",
        f"- Tokenizer: {gguf['tokenizer']}.",
    ]
    check = gguf["llama_cpp"]
    if "error" in check:
        lines.append(f"- Not checked in llama.cpp here: {check['error']}.")
    else:
        versus = (
            f" against {check['slimsearch_perplexity']:.4g} measured by slimsearch on the same tokens "
            f"({(check['ratio'] - 1) * 100:+.2f}%)"
            if "ratio" in check
            else ""
        )
        lines.append(
            f"- Checked in {check['runtime']}: perplexity {check['perplexity']:.4g} on {check['tokens']} "
            f"scored tokens{versus}. llama.cpp computes Q4_1/Q8_0 layers with activations quantized to "
            "8 bits per block of 32, slimsearch with bf16 activations: small differences are expected."
        )
    return lines
