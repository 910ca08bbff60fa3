"""Decoding and scoring: greedy decoding with torch and with each pair of exported graphs, BLEU, and
beam search with the service's own decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import sacrebleu
import torch
from tokenizers import Tokenizer

from training.translation.model import BOS_ID, EOS_ID, PAD_ID, Translator, pad


@torch.no_grad()
def greedy(model: Translator, sources: list[list[int]], max_new: int, batch: int = 200) -> list[list[int]]:
    model.eval()
    results: list[list[int]] = [[] for _ in sources]
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        src = pad([sources[i] for i in idx])
        memory = model.encode(src)
        tgt = torch.full((len(idx), 1), BOS_ID, dtype=torch.long)
        done = torch.zeros(len(idx), dtype=torch.bool)
        for _ in range(max_new):
            nxt = model.logits(model.decode(tgt, memory, src)[:, -1]).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            tgt = torch.cat([tgt, nxt[:, None]], dim=1)
            done |= nxt == EOS_ID
            if bool(done.all()):
                break
        for row, i in enumerate(idx):
            out = []
            for tok in tgt[row, 1:].tolist():
                if tok in (EOS_ID, PAD_ID):
                    break
                out.append(tok)
            results[i] = out
    return results


def bleu(hypotheses: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU with every reference of each sentence (missing ones padded with None)."""
    width = max(len(r) for r in references)
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    return sacrebleu.corpus_bleu(hypotheses, streams).score


def onnx_greedy(encoder: Path, decoder: Path, sources: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy decoding with the exported graphs, as the service does it (numpy only)."""
    enc = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(decoder), providers=["CPUExecutionProvider"])
    src = pad(sources).numpy()
    memory = enc.run(None, {"src_ids": src})[0]
    rows = [[BOS_ID] for _ in sources]
    done = [False] * len(sources)
    for _ in range(max_new):
        log_probs = dec.run(None, {"tgt_ids": pad(rows).numpy(), "memory": memory, "src_ids": src})[0]
        for i, tok in enumerate(log_probs.argmax(-1).tolist()):
            if not done[i]:
                rows[i].append(tok)
                done[i] = tok == EOS_ID
        if all(done):
            break
    return [[t for t in r[1:] if t != EOS_ID] for r in rows]


def onnx_greedy_batched(encoder: Path, decoder: Path, sources: list[list[int]], max_new: int) -> list[list[int]]:
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), 128):
        idx = order[start : start + 128]
        for i, toks in zip(idx, onnx_greedy(encoder, decoder, [sources[i] for i in idx], max_new), strict=True):
            out[i] = toks
    return out


def onnx_cached_greedy(cross: Path, cached: Path, sources: list[list[int]], max_new: int) -> list[list[int]]:
    """Greedy decoding with the key/value-cache graphs (every row's cache grows by one per step)."""
    kv = ort.InferenceSession(str(cross), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(cached), providers=["CPUExecutionProvider"])
    src = pad(sources).numpy()
    mem_k, mem_v = kv.run(None, {"src_ids": src})
    layers, b, heads, _, dk = mem_k.shape
    past_k = np.zeros((layers, b, heads, 0, dk), dtype=np.float32)
    past_v = past_k.copy()
    token = np.full((b, 1), BOS_ID, dtype=np.int64)
    rows: list[list[int]] = [[] for _ in sources]
    done = [False] * b
    for t in range(max_new):
        feeds = {
            "token": token,
            "position": np.full(b, t, dtype=np.int64),
            "past_k": past_k,
            "past_v": past_v,
            "past_mask": np.ones((b, t), dtype=np.int64),
            "mem_k": mem_k,
            "mem_v": mem_v,
            "src_ids": src,
        }
        log_probs, new_k, new_v = step.run(None, feeds)
        past_k, past_v = np.concatenate([past_k, new_k], axis=3), np.concatenate([past_v, new_v], axis=3)
        token = log_probs.argmax(-1)[:, None]
        for i, tok in enumerate(token[:, 0].tolist()):
            if not done[i]:
                done[i] = tok == EOS_ID
                if not done[i]:
                    rows[i].append(tok)
        if all(done):
            break
    return rows


def greedy_agreement(model: Translator, paths: dict[str, Path], probe: list[list[int]], max_new: int) -> dict:
    """Greedy decoding with torch and with each pair of graphs must give the same tokens on real sentences."""
    torch_tokens = greedy(model, probe, max_new)
    agree = {}
    for label, decode in (
        ("full_prefix", lambda: onnx_greedy(paths["encoder"], paths["decoder"], probe, max_new)),
        ("kv_cache", lambda: onnx_cached_greedy(paths["encoder_kv"], paths["decoder_cached"], probe, max_new)),
    ):
        same = sum(a == b for a, b in zip(torch_tokens, decode(), strict=True))
        if same < len(probe) - 1:  # float noise may flip a near-tie once; more is a broken export
            raise AssertionError(f"{label} greedy decoding in onnxruntime differs from torch on {len(probe) - same}")
        agree[label] = f"{same}/{len(probe)}"
    return agree


def service_decode(
    tokenizer: Tokenizer, version_dir: Path, sources: list[list[int]], *, beam_size: int, max_new_tokens: int
) -> list[str]:
    """Decode with the service's own decoder (beam search over the cached graphs) from the model folder,
    whose ``model.json`` must be written already."""
    from service.tasks.translation import decode_batch

    ids = decode_batch(version_dir, sources, beam_size=beam_size, max_new_tokens=max_new_tokens)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
