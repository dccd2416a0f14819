"""Activation ranges per linear input and how they grow with sequence length (AQAS paper Fig. 1(c)/(d)).

A ``RangeCollector`` is the ``on_input`` hook of ``qcompile.debug.record_linears``: it sees every distinct
linear input of one FP-twin run on a ``[1, T]`` window. The model is causal (no cache), so the first
``t`` positions of that run are exactly the activations of a ``t``-token input: the range of a 32-, 128-,
512- or 2048-token input is the range of the prefix ``x[:t]``, all from one run.
"""
from __future__ import annotations

import os

import torch

__all__ = ["SEQ_LENS", "RangeCollector", "input_label"]

SEQ_LENS = (32, 128, 512, 2048)


def input_label(modules: list[str]) -> str:
    """``["model.layers.0.self_attn.q_proj", "...k_proj"]`` -> ``"model.layers.0.self_attn.{q_proj,k_proj}"``."""
    if len(modules) == 1:
        return modules[0]
    prefix = os.path.commonprefix([m.rsplit(".", 1)[0] + "." for m in modules])
    return prefix + "{" + ",".join(m[len(prefix):] for m in modules) + "}"


class RangeCollector:
    """Per distinct linear input: min/max over the first ``t`` tokens for each ``t`` in ``seq_lens``, and the
    per-channel abs-max of the ``top_k`` outlier channels (largest abs-max over the whole window)."""

    def __init__(self, seq_lens=SEQ_LENS, top_k: int = 8):
        self.seq_lens, self.top_k = tuple(seq_lens), top_k
        self.inputs: list[dict] = []
        self._channel_max: list[dict] = []

    def __call__(self, modules: list[str], x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float() if x.dim() != 3 else x[0].detach().float()
        n = x.shape[0]
        lens = [t for t in self.seq_lens if t <= n] or [n]
        absmax = {t: x[:t].abs().amax(0) for t in lens}
        top = absmax[lens[-1]].topk(min(self.top_k, x.shape[1])).indices
        self.inputs.append({
            "input": input_label(modules), "modules": list(modules), "channels": x.shape[1],
            "min": {str(t): x[:t].min().item() for t in lens},
            "max": {str(t): x[:t].max().item() for t in lens},
            "outlier_channels": top.tolist(),
            "outlier_max": {str(t): absmax[t][top].tolist() for t in lens},
            "median_channel_max": {str(t): absmax[t].median().item() for t in lens},
        })
        self._channel_max.append({str(lens[0]): absmax[lens[0]].tolist(), str(lens[-1]): absmax[lens[-1]].tolist()})

    def widest(self) -> int:
        """Index of the input with the largest abs range over the full window (the plot of Fig. 1(d))."""
        if not self.inputs:
            return -1
        def last(r):
            return max(abs(v) for v in (*r["min"].values(), *r["max"].values()))

        return max(range(len(self.inputs)), key=lambda i: last(self.inputs[i]))

    def channel_max(self, index: int) -> dict:
        """Per-channel abs-max of input ``index`` at the shortest and longest length: ``{t: [K floats]}``."""
        return self._channel_max[index]

    def result(self) -> dict:
        i = self.widest()
        return {"seq_lens": list(self.seq_lens), "inputs": self.inputs,
                "widest": None if i < 0 else {"index": i, "input": self.inputs[i]["input"],
                                              "channel_max": self.channel_max(i)}}
