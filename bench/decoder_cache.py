"""Decoder step with and without a key/value cache, measured in onnxruntime.

The served decoder step recomputes the whole target prefix every step (``tgt_ids [B, T]``). The
alternative takes only the last token plus a cache of the previous steps' self-attention keys and
values and the encoder output's cross-attention keys and values (computed once), and returns the new
keys and values to append. Both graphs are exported here from the same model (the translation
architecture with its default sizes and random weights: timings do not depend on the weights), checked
to give the same log-probabilities, and timed at batch 1, 16 and 64 and prefix lengths 4 to 32, with
a source of 12 tokens (Tatoeba's sentences are short: 7 source and 10 target tokens on average).

The cached graph's time is a ceiling for it: a step-level batcher would also have to gather every
row's cache into one padded tensor before each step and scatter the new keys and values back after
it, which the full-prefix graph never needs.

    python -m bench.decoder_cache
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from bench.run import ROOT
from training import common
from training.translation import PAD_ID, Config, DecoderStepGraph, Translator


class CachedStepGraph(nn.Module):
    """One decoder step from the last token and the caches (all rows share one prefix length here)."""

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def forward(self, token, position, past_k, past_v, mem_k, mem_v, src_ids):
        m = self.model
        x = m.embed(token) * m.scale + m.positions[position].unsqueeze(1)  # [B, 1, D]
        memory_bias = m.padding_bias(src_ids)
        new_k, new_v = [], []
        for i, block in enumerate(m.decoder):
            attn = block.self_attn
            h = block.norm1(x)
            b = h.shape[0]
            q = attn.q(h).view(b, 1, attn.heads, attn.dk).transpose(1, 2)
            k = attn.k(h).view(b, 1, attn.heads, attn.dk).transpose(1, 2)
            v = attn.v(h).view(b, 1, attn.heads, attn.dk).transpose(1, 2)
            keys, values = torch.cat([past_k[i], k], dim=2), torch.cat([past_v[i], v], dim=2)
            weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(attn.dk), dim=-1)
            x = x + attn.o((weights @ values).transpose(1, 2).reshape(b, 1, -1))
            cross = block.cross_attn
            q = cross.q(block.norm2(x)).view(b, 1, cross.heads, cross.dk).transpose(1, 2)
            scores = q @ mem_k[i].transpose(-1, -2) / math.sqrt(cross.dk) + memory_bias
            x = x + cross.o((torch.softmax(scores, dim=-1) @ mem_v[i]).transpose(1, 2).reshape(b, 1, -1))
            x = x + block.ff(block.norm3(x))
            new_k.append(k)
            new_v.append(v)
        log_probs = torch.log_softmax(m.logits(m.dec_norm(x)[:, 0]), dim=-1)
        return log_probs, torch.stack(new_k), torch.stack(new_v)


def caches(model: Translator, tgt: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Self-attention keys/values of the prefix (all but the last token) and cross keys/values."""
    past_k, past_v, mem_k, mem_v = [], [], [], []
    x = model.embed(tgt) * model.scale + model.positions[: tgt.shape[1]]
    t = tgt.shape[1]
    causal = torch.triu(torch.full((t, t), -1e9), diagonal=1)
    for block in model.decoder:
        h = block.norm1(x)
        attn = block.self_attn
        b = h.shape[0]
        k = attn.k(h).view(b, t, attn.heads, attn.dk).transpose(1, 2)
        v = attn.v(h).view(b, t, attn.heads, attn.dk).transpose(1, 2)
        past_k.append(k[:, :, :-1])
        past_v.append(v[:, :, :-1])
        cross = block.cross_attn
        mem_k.append(cross.k(memory).view(b, -1, cross.heads, cross.dk).transpose(1, 2))
        mem_v.append(cross.v(memory).view(b, -1, cross.heads, cross.dk).transpose(1, 2))
        x = block(x, causal, memory, model.padding_bias(torch.ones(b, memory.shape[1], dtype=torch.long)))
    return torch.stack(past_k), torch.stack(past_v), torch.stack(mem_k), torch.stack(mem_v)


def timed(session: ort.InferenceSession, feeds: dict, seconds: float) -> float:
    for _ in range(3):
        session.run(None, feeds)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or runs < 5:
        session.run(None, feeds)
        runs += 1
    return 1000 * elapsed / runs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=0.5, help="timing per cell")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cfg = Config()
    vocab = 8000
    model = Translator(vocab, cfg).eval()
    tmp = Path(tempfile.mkdtemp(prefix="decoder-cache-"))
    src = torch.randint(4, vocab, (2, 12))
    memory = model.encode(src).detach()
    tgt = torch.randint(4, vocab, (2, 6))
    full_path, cached_path = tmp / "full.onnx", tmp / "cached.onnx"
    common.export_onnx(
        DecoderStepGraph(model),
        (tgt, memory, src),
        full_path,
        ["tgt_ids", "memory", "src_ids"],
        ["log_probs"],
        {"tgt_ids": {0: "b", 1: "t"}, "memory": {0: "b", 1: "s"}, "src_ids": {0: "b", 1: "s"}, "log_probs": {0: "b"}},
    )
    with torch.no_grad():
        past_k, past_v, mem_k, mem_v = caches(model, tgt, memory)
    position = torch.full((2,), tgt.shape[1] - 1, dtype=torch.long)
    cached_inputs = (tgt[:, -1:], position, past_k, past_v, mem_k, mem_v, src)
    names = ["token", "position", "past_k", "past_v", "mem_k", "mem_v", "src_ids"]
    common.export_onnx(
        CachedStepGraph(model),
        cached_inputs,
        cached_path,
        names,
        ["log_probs", "new_k", "new_v"],
        {
            "token": {0: "b"},
            "position": {0: "b"},
            "past_k": {1: "b", 3: "t"},
            "past_v": {1: "b", 3: "t"},
            "mem_k": {1: "b", 3: "s"},
            "mem_v": {1: "b", 3: "s"},
            "src_ids": {0: "b", 1: "s"},
            "log_probs": {0: "b"},
        },
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    full = ort.InferenceSession(str(full_path), options, providers=["CPUExecutionProvider"])
    cached = ort.InferenceSession(str(cached_path), options, providers=["CPUExecutionProvider"])
    want = full.run(None, {"tgt_ids": tgt.numpy(), "memory": memory.numpy(), "src_ids": src.numpy()})[0]
    got = cached.run(None, {n: t.numpy() for n, t in zip(names, cached_inputs, strict=True)})[0]
    worst = float(np.abs(want - got).max())
    assert worst < 1e-3, f"cached step disagrees with the full step: {worst}"
    print(f"cached and full steps agree (max |diff| {worst:.1e}); ms per step:")
    rows = []
    for batch in (1, 16, 64):
        src_b = torch.randint(4, vocab, (batch, 12))
        src_b[:, 10:] = PAD_ID
        mem_b = model.encode(src_b).detach()
        for length in (4, 8, 16, 32):
            tgt_b = torch.randint(4, vocab, (batch, length))
            with torch.no_grad():
                pk, pv, mk, mv = caches(model, tgt_b, mem_b)
            full_ms = timed(
                full, {"tgt_ids": tgt_b.numpy(), "memory": mem_b.numpy(), "src_ids": src_b.numpy()}, args.seconds
            )
            values = (tgt_b[:, -1:], torch.full((batch,), length - 1), pk, pv, mk, mv, src_b)
            feeds = dict(zip(names, values, strict=True))
            cached_ms = timed(cached, {n: t.numpy() for n, t in feeds.items()}, args.seconds)
            rows.append({"batch": batch, "prefix": length, "full_ms": full_ms, "cached_ms": cached_ms})
            print(f"  batch {batch:>2} prefix {length:>2}: full {full_ms:7.2f}  cached {cached_ms:7.2f}")
    table = [
        "| batch | prefix tokens | full prefix ms/step | KV cache ms/step | speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = r["full_ms"] / r["cached_ms"]
        table.append(f"| {r['batch']} | {r['prefix']} | {r['full_ms']:.2f} | {r['cached_ms']:.2f} | {speedup:.2f}x |")
    print("\n" + "\n".join(table))
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"decoder-cache-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"rows": rows, "max_abs_diff": worst}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
