"""A ULMFiT-style sentiment teacher: the text generator's LSTM language model, fine-tuned to classify.

The committed text generator (``models/text-generator/<v>``) was trained on about 150,000 everyday
English sentences (Tatoeba); SST-2 has 67,349 movie-review phrases. Its embedding and LSTM, read
back from the exported prefill graph, are the encoder here; a pooled head (the last real position's
output, max and mean over positions, as ULMFiT's concat pooling) is trained on the labels with
discriminative learning rates (the head faster than the LSTM, the LSTM faster than the embedding)
and the encoder unfrozen after the first epoch (gradual unfreezing, shortened).

It is the *teacher* of :mod:`training.sentiment`'s ``--teacher-lm``: the served model stays the
small bidirectional LSTM student over WordPiece, trained on this teacher's probabilities, because an
LSTM of 512 units over 8,000 BPE tokens costs several times the student's per-sentence latency.

SST-2 is lower-cased and treebank-tokenised ("it 's a charming journey ."); the language model has
only seen ordinary text, so :func:`natural` puts the phrases back into ordinary English first.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from training import common
from training import text_generation as tg

# Treebank tokens back to ordinary text, applied in order.
_TREEBANK = [
    (re.compile(r"-lrb-\s*"), "("),
    (re.compile(r"\s*-rrb-"), ")"),
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r" ([.,!?;:%])"), r"\1"),
    (re.compile(r"\bi\b"), "I"),
    (re.compile(r"\s+"), " "),
]


def natural(text: str) -> str:
    """``"it 's not a bad movie , i think ."`` -> ``"It's not a bad movie, I think."``; ordinary text
    passes through unchanged but for the first letter and a lone "i"."""
    out = text.strip()
    for pattern, replacement in _TREEBANK:
        out = pattern.sub(replacement, out)
    return out[:1].upper() + out[1:]


def load_language_model(version_dir: Path) -> tuple[tg.LanguageModel, Tokenizer]:
    """The text generator's network and tokenizer, its weights read from ``prefill.onnx``.

    ONNX's LSTM orders its gates input, output, forget, cell; torch's input, forget, cell, output.
    The caller checks parity (:func:`check_against_graph`)."""
    graph = onnx.load(str(version_dir / "prefill.onnx"))
    weights = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    lstms = [n for n in graph.graph.node if n.op_type == "LSTM"]
    embed = torch.from_numpy(weights["lm.embed.weight"].copy())
    vocab, dim = embed.shape
    hidden = weights[lstms[0].input[2]].shape[-1]
    cfg = dataclasses.replace(tg.Config(), embed_dim=dim, hidden=hidden, layers=len(lstms), vocab_size=vocab)
    lm = tg.LanguageModel(vocab, cfg)
    order = [0, 2, 3, 1]  # torch's i, f, g, o taken from ONNX's i, o, f, c blocks

    def regate(a: np.ndarray) -> torch.Tensor:
        blocks = np.split(a, 4, axis=0)
        return torch.from_numpy(np.concatenate([blocks[k] for k in order], axis=0).copy())

    with torch.no_grad():
        lm.embed.weight.copy_(embed)
        lm.bias.copy_(torch.from_numpy(weights["lm.bias"].copy()))
        for layer, node in enumerate(lstms):
            w, r, b = (weights[name][0] for name in node.input[1:4])
            getattr(lm.lstm, f"weight_ih_l{layer}").copy_(regate(w))
            getattr(lm.lstm, f"weight_hh_l{layer}").copy_(regate(r))
            getattr(lm.lstm, f"bias_ih_l{layer}").copy_(regate(b[: 4 * hidden]))
            getattr(lm.lstm, f"bias_hh_l{layer}").copy_(regate(b[4 * hidden :]))
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # as the text generator's service sets it
    return lm.eval(), tokenizer


def check_against_graph(lm: tg.LanguageModel, version_dir: Path, ids: torch.Tensor) -> float:
    """Largest difference between the loaded network's log-probabilities and the graph's, on ``ids``
    (rows of one length)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(version_dir / "prefill.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feed = {"ids": ids.numpy()}
    if "lengths" in names:
        feed["lengths"] = np.full(ids.shape[0], ids.shape[1], dtype=np.int64)
    if "positions" in names:
        feed["positions"] = np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))
    got = session.run(["log_probs"], feed)[0]
    with torch.no_grad():
        logits, _ = lm(ids)
        want = torch.log_softmax(logits, dim=-1)
    return float(np.abs(got - want.numpy()).max())


class LMClassifier(nn.Module):
    """The language model's embedding and LSTM; concat pooling; a two-layer head."""

    def __init__(self, lm: tg.LanguageModel, head_hidden: int = 128, dropout: float = 0.4) -> None:
        super().__init__()
        self.embed, self.lstm = lm.embed, lm.lstm
        hidden = lm.lstm.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(
            nn.Linear(3 * hidden, head_hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(head_hidden, 2)
        )

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.dropout(self.embed(ids)))  # [B, T, H]; padding only at the end
        m = mask.unsqueeze(2).to(out.dtype)
        last = out.gather(1, (mask.sum(1) - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[2]))[:, 0]
        pooled_max = out.masked_fill(m == 0, -1e4).max(1).values
        pooled_mean = (out * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(self.dropout(torch.cat([last, pooled_max, pooled_mean], dim=1)))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(ids, mask), dim=1)


def encode(tokenizer: Tokenizer, texts: list[str], max_len: int = 128) -> list[list[int]]:
    """``<bos> tokens`` of each text put back into ordinary English (the classifier reads no ``<eos>``)."""
    return [[tg.BOS_ID, *e.ids[: max_len - 1]] for e in tokenizer.encode_batch([natural(t) for t in texts])]


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tg.PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def probabilities(model: LMClassifier, seqs: list[list[int]], rows: int = 256) -> torch.Tensor:
    """Probabilities of every text, in order (batched by length for speed)."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty((len(seqs), 2))
    with torch.no_grad():
        for start in range(0, len(order), rows):
            idx = order[start : start + rows]
            ids, mask = _pad([seqs[i] for i in idx])
            out[idx] = model(ids, mask)
    return out


def accuracy(model: LMClassifier, seqs: list[list[int]], labels: list[int]) -> float:
    if not seqs:
        return float("nan")
    return float((probabilities(model, seqs).argmax(1) == torch.tensor(labels)).float().mean())


@dataclasses.dataclass
class TeacherConfig:
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3  # the head's; the LSTM's is lr / 4, the embedding's lr / 16
    weight_decay: float = 0.01
    seed: int = 1
    frozen_epochs: int = 1  # epochs at the start that train the head alone


def fit_teacher(
    version_dir: Path,
    texts: dict[str, list[str]],
    labels: dict[str, list[int]],
    cfg: TeacherConfig,
    smoke: bool = False,
) -> tuple[LMClassifier, Tokenizer, dict]:
    """Fine-tune the language model of ``version_dir`` on ``texts["train"]``, keeping the epoch with
    the best accuracy on ``texts["dev"]``; returns the classifier, its tokenizer and a summary."""
    common.seed_everything(cfg.seed)
    lm, tokenizer = load_language_model(version_dir)
    seqs = {k: encode(tokenizer, v) for k, v in texts.items()}
    probe = torch.tensor([seqs["dev"][0][:6] + [tg.BOS_ID] * (6 - len(seqs["dev"][0][:6]))] * 2)
    loaded_diff = check_against_graph(lm, version_dir, probe)
    if loaded_diff > 1e-3:
        raise AssertionError(f"{version_dir}: the language model read back differs from its graph by {loaded_diff}")
    model = LMClassifier(lm)
    groups = [
        {"params": model.embed.parameters(), "lr": cfg.lr / 16},
        {"params": model.lstm.parameters(), "lr": cfg.lr / 4},
        {"params": model.head.parameters(), "lr": cfg.lr},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    epochs = 1 if smoke else cfg.epochs
    steps = math.ceil(len(seqs["train"]) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in groups],
        total_steps=epochs * steps,
        pct_start=max(0.1, 3 / (epochs * steps)),
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    train_labels = torch.tensor(labels["train"])
    best = (-1.0, None, 0)
    history = []
    for epoch in range(1, epochs + 1):
        frozen = epoch <= cfg.frozen_epochs and not smoke
        for p in [*model.embed.parameters(), *model.lstm.parameters()]:
            p.requires_grad_(not frozen)
        model.train()
        order = torch.randperm(len(seqs["train"]), generator=generator).tolist()
        # Pools of 50 batches sorted by length: little padding, still shuffled.
        pools = [
            sorted(order[i : i + 50 * cfg.batch_size], key=lambda j: len(seqs["train"][j]))
            for i in range(0, len(order), 50 * cfg.batch_size)
        ]
        batches = [pool[i : i + cfg.batch_size] for pool in pools for i in range(0, len(pool), cfg.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        bar = tqdm(batches, desc=f"teacher epoch {epoch}/{epochs}{' (head only)' if frozen else ''}", unit="batch")
        for step, idx in enumerate(bar):
            ids, mask = _pad([seqs["train"][i] for i in idx])
            loss = F.cross_entropy(model.logits(ids, mask), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        dev = accuracy(model, seqs["dev"], labels["dev"])
        history.append({"epoch": epoch, "validation_accuracy": round(dev, 4)})
        tqdm.write(f"teacher epoch {epoch}: validation accuracy {dev:.2%}")
        if dev > best[0]:
            best = (dev, common.snapshot(model), epoch)
    model.load_state_dict(best[1])
    model.eval()
    summary = {
        "network": f"the LSTM language model of {version_dir} (read from its prefill graph) fine-tuned to classify",
        "loaded_vs_graph_max_abs_diff": loaded_diff,
        "best_epoch": best[2],
        "history": history,
        **{
            f"{split}_accuracy": round(accuracy(model, seqs[split], labels[split]), 4)
            for split in ("dev", "test", "everyday", "independent")
            if seqs.get(split)
        },
    }
    return model, tokenizer, summary
