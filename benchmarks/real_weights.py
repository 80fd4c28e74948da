"""The real weight matrices the benchmarks decompose: GPT-2 small attention and all-MiniLM-L6-v2 linears."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def gpt2_attention(data_dir: str | Path) -> dict[str, torch.Tensor]:
    """The 48 real GPT-2 small attention matrices (Q, K, V, O of 12 blocks), each ``(out, in) = (768, 768)``.

    ``attn.c_attn`` is a Conv1D ``(in, out) = (768, 2304)`` whose output thirds are Q, K, V.
    """
    tensors = load_file(str(Path(data_dir) / "gpt2-small-partial" / "gpt2-small-partial.safetensors"))
    out = {}
    for i in range(12):
        qkv = tensors[f"transformer.h.{i}.attn.c_attn.weight"]  # (768, 2304), Conv1D (in, out)
        for j, name in enumerate("qkv"):
            out[f"h.{i}.{name}"] = qkv[:, j * 768:(j + 1) * 768].T.contiguous()  # (out, in)
        out[f"h.{i}.o"] = tensors[f"transformer.h.{i}.attn.c_proj.weight"].T.contiguous()
    return out


def minilm_linears() -> dict[str, torch.Tensor]:
    """The 36 linear weights of all-MiniLM-L6-v2 (Q, K, V, O, FFN in, FFN out of 6 layers), ``(out, in)``."""
    from tensorlm.models import load_model

    model = load_model("all-MiniLM-L6-v2").model
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
    return {f"layer.{i}.{short}": model.get_submodule(f"encoder.layer.{i}.{path}").weight.detach().clone()
            for i in range(6) for short, path in names.items()}
