"""Train an English-to-French Transformer on Tatoeba and write it to the model repository as ONNX.

    python -m training.translation --data-dir ../shared/data/translation      # -> models/translation-en-fr

Why a Transformer rather than an LSTM with attention: its training parallelises over the whole
sentence (the only thing that makes a from-scratch model trainable on a CPU in an hour), and its
decoder step is a pure function of (tokens so far, encoder output), which is exactly what a
step-level batched decoder wants: rows of different lengths and from different requests can share
one call, with no recurrent state to carry and re-order between steps.

Data: ``fra-eng.zip`` read directly. The validation split is made by **English sentence** (all
French translations of one English sentence fall on the same side), seeded; BLEU is sacrebleu's
corpus BLEU against *all* references of each validation sentence. One joint BPE vocabulary
(Hugging Face ``tokenizers``; NFKC, Metaspace so that detokenising restores the exact spacing,
French punctuation included) is trained on the training side only and saved beside the model.

Two ONNX graphs, both with dynamic batch and length axes:
- ``encoder``: ``src_ids [B, S]`` -> ``memory [B, S, D]`` (padding is id 0 and masked inside);
- ``decoder`` (one step): ``tgt_ids [B, T]`` (BOS + tokens so far, right-padded with 0),
  ``memory [B, S, D]``, ``src_ids [B, S]`` (for the padding mask) -> ``log_probs [B, V]`` of the next
  token after each row's last real token. Rows of different lengths can share a call.
Both are parity-checked against torch greedy decoding on real validation sentences.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import sys
import time
import zipfile
from collections import defaultdict
from dataclasses import field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import sacrebleu
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from tqdm import tqdm

from training import common

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3, relied on by the graphs and the service
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


@dataclasses.dataclass
class Config:
    data_dir: Path = field(default=Path("../shared/data/translation"), metadata={"help": "folder holding fra-eng.zip"})
    output_dir: Path = field(default=Path("models"), metadata={"help": "model repository root"})
    name: str = "translation-en-fr"
    version: int = 1
    validation_sentences: int = 2000
    vocab_size: int = 8000
    max_tokens: int = field(
        default=64, metadata={"help": "longest source / target (in tokens) used for training and served"}
    )
    d_model: int = 256
    heads: int = 4
    ff: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1
    label_smoothing: float = 0.1
    epochs: int = 6
    batch_tokens: int = field(default=4000, metadata={"help": "target tokens per batch"})
    lr: float = 1.5e-3
    warmup_steps: int = 300
    weight_decay: float = 0.01
    eval_sentences: int = field(
        default=600, metadata={"help": "validation sentences decoded after each epoch to pick the checkpoint"}
    )
    seed: int = 1
    device: str = "auto"
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    # The torch weights are not served and not committed.
    checkpoint_dir: Path = field(
        default=Path("checkpoints/translation-en-fr"), metadata={"help": "where the torch weights go"}
    )
    export_only: bool = field(default=False, metadata={"help": "no training: export from --checkpoint-dir"})
    init_from: Path | None = field(default=None, metadata={"help": "start from this checkpoint folder's weights"})
    smoke: bool = field(default=False, metadata={"help": "3,000 pairs, tiny model, one epoch: checks the pipeline"})


# --- data ----------------------------------------------------------------------------------------


def read_pairs(data_dir: Path) -> list[tuple[str, str]]:
    path = data_dir / "fra-eng.zip"
    with zipfile.ZipFile(path) as archive, archive.open("fra.txt") as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8").read().splitlines()
    pairs = []
    for number, line in enumerate(lines, start=1):
        cols = line.split("\t")
        if len(cols) < 2:
            raise ValueError(f"{path}!fra.txt:{number}: expected 'English<TAB>French'")
        en, fr = cols[0].strip(), cols[1].strip()
        if en and fr:
            pairs.append((en, fr))
    return pairs


def split_by_english(
    pairs: list[tuple[str, str]], n_validation: int, seed: int
) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """Training pairs, and validation English sentences with all their references (seeded)."""
    refs: dict[str, list[str]] = defaultdict(list)
    for en, fr in pairs:
        refs[en].append(fr)
    english = sorted(refs)
    random.Random(seed).shuffle(english)
    held = set(english[:n_validation])
    train = [(en, fr) for en, fr in pairs if en not in held]
    validation = {en: refs[en] for en in english[:n_validation]}
    return train, validation


def normalizer() -> normalizers.Normalizer:
    # NFKC folds the narrow and ordinary no-break spaces French puts before "!?:;" into plain spaces.
    return normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace("’", "'"), normalizers.Replace("‘", "'"), normalizers.Strip()]
    )


def build_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def normalise_reference(text: str) -> str:
    """References go through the tokenizer's normaliser too (typographic spaces and quotes only)."""
    return normalizer().normalize_str(text)


# --- model ---------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention written out (no fused kernels): it exports to plain ONNX ops."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.dk).transpose(1, 2)
        k = self.k(kv).view(b, -1, self.heads, self.dk).transpose(1, 2)
        v = self.v(kv).view(b, -1, self.heads, self.dk).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dk) + bias  # bias: 0 or -1e9, broadcast
        attn = self.dropout(torch.softmax(scores, dim=-1))
        return self.o((attn @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm Transformer block; with ``cross`` it is a decoder block."""

    def __init__(self, cfg: Config, cross: bool) -> None:
        super().__init__()
        d = cfg.d_model
        self.norm1, self.self_attn = nn.LayerNorm(d), Attention(d, cfg.heads, cfg.dropout)
        self.cross = cross
        if cross:
            self.norm2, self.cross_attn = nn.LayerNorm(d), Attention(d, cfg.heads, cfg.dropout)
        self.norm3 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, cfg.ff), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.ff, d))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, self_bias, memory=None, memory_bias=None):
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, self_bias))
        if self.cross:
            x = x + self.dropout(self.cross_attn(self.norm2(x), memory, memory_bias))
        return x + self.dropout(self.ff(self.norm3(x)))


def sinusoids(length: int, d: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2) * (-math.log(10000.0) / d))
    table = torch.zeros(length, d)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class Translator(nn.Module):
    def __init__(self, vocab: int, cfg: Config) -> None:
        super().__init__()
        self.scale = math.sqrt(cfg.d_model)
        self.embed = nn.Embedding(vocab, cfg.d_model, padding_idx=PAD_ID)  # shared: source, target, output
        nn.init.normal_(self.embed.weight, std=cfg.d_model**-0.5)
        self.register_buffer("positions", sinusoids(cfg.max_tokens + 2, cfg.d_model), persistent=False)
        self.encoder = nn.ModuleList(Block(cfg, cross=False) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.decoder_layers))
        self.enc_norm, self.dec_norm = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed(ids) * self.scale + self.positions[: ids.shape[1]])

    @staticmethod
    def padding_bias(ids: torch.Tensor) -> torch.Tensor:
        return ((ids == PAD_ID).float() * -1e9)[:, None, None, :]  # [B, 1, 1, S]

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        x, bias = self._embed(src), self.padding_bias(src)
        for block in self.encoder:
            x = block(x, bias)
        return self.enc_norm(x)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Hidden states for every target position [B, T, D] (causal)."""
        t = tgt.shape[1]
        causal = torch.triu(torch.full((t, t), -1e9, device=tgt.device), diagonal=1)
        x, memory_bias = self._embed(tgt), self.padding_bias(src)
        for block in self.decoder:
            x = block(x, causal, memory, memory_bias)
        return self.dec_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embed.weight.t()

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.logits(self.decode(tgt_in, self.encode(src), src))


class EncoderGraph(nn.Module):
    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode(src_ids)


class DecoderStepGraph(nn.Module):
    """Log-probabilities of the token after each row's last real token (rows may differ in length)."""

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def forward(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.decode(tgt_ids, memory, src_ids)  # [B, T, D]
        last = (tgt_ids != PAD_ID).sum(dim=1) - 1  # index of each row's last real token
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[2])
        picked = hidden.gather(1, index).squeeze(1)  # [B, D]
        return torch.log_softmax(self.model.logits(picked), dim=-1)


class CrossKVGraph(nn.Module):
    """Encoder plus every decoder layer's cross-attention keys and values, computed once per source:
    ``src_ids [B, S]`` -> ``mem_k``, ``mem_v`` ``[layers, B, heads, S, head_dim]``."""

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.model.encode(src_ids)
        b = memory.shape[0]
        keys, values = [], []
        for block in self.model.decoder:
            cross = block.cross_attn
            keys.append(cross.k(memory).view(b, -1, cross.heads, cross.dk).transpose(1, 2))
            values.append(cross.v(memory).view(b, -1, cross.heads, cross.dk).transpose(1, 2))
        return torch.stack(keys), torch.stack(values)


class CachedStepGraph(nn.Module):
    """One decoder step from each row's last token and a key/value cache of its earlier tokens.

    ``token [B, 1]``, ``position [B]`` (index of that token), ``past_k``/``past_v``
    ``[layers, B, heads, T, head_dim]`` right-padded, ``past_mask [B, T]`` (1 = cached token),
    ``mem_k``/``mem_v`` from :class:`CrossKVGraph`, ``src_ids [B, S]`` -> ``log_probs [B, V]`` and the
    token's own keys and values ``new_k``/``new_v`` ``[layers, B, heads, 1, head_dim]`` to append.
    """

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def forward(self, token, position, past_k, past_v, past_mask, mem_k, mem_v, src_ids):
        m = self.model
        x = m.embed(token) * m.scale + m.positions[position].unsqueeze(1)  # [B, 1, D]
        b = x.shape[0]
        # Attend to the cached tokens and to itself; padding of the cache is masked out.
        self_bias = torch.cat([(past_mask == 0).float() * -1e9, torch.zeros(b, 1)], dim=1)[:, None, None, :]
        memory_bias = m.padding_bias(src_ids)
        new_k, new_v = [], []
        for i, block in enumerate(m.decoder):
            attn, cross = block.self_attn, block.cross_attn
            h = block.norm1(x)
            q = attn.q(h).view(b, 1, attn.heads, attn.dk).transpose(1, 2)
            k = attn.k(h).view(b, 1, attn.heads, attn.dk).transpose(1, 2)
            v = attn.v(h).view(b, 1, attn.heads, attn.dk).transpose(1, 2)
            keys, values = torch.cat([past_k[i], k], dim=2), torch.cat([past_v[i], v], dim=2)
            weights = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(attn.dk) + self_bias, dim=-1)
            x = x + attn.o((weights @ values).transpose(1, 2).reshape(b, 1, -1))
            q = cross.q(block.norm2(x)).view(b, 1, cross.heads, cross.dk).transpose(1, 2)
            weights = torch.softmax(q @ mem_k[i].transpose(-1, -2) / math.sqrt(cross.dk) + memory_bias, dim=-1)
            x = x + cross.o((weights @ mem_v[i]).transpose(1, 2).reshape(b, 1, -1))
            x = x + block.ff(block.norm3(x))
            new_k.append(k)
            new_v.append(v)
        log_probs = torch.log_softmax(m.logits(m.dec_norm(x)[:, 0]), dim=-1)
        return log_probs, torch.stack(new_k), torch.stack(new_v)


CACHED_INPUTS = ["token", "position", "past_k", "past_v", "past_mask", "mem_k", "mem_v", "src_ids"]


def cached_example(model: Translator, src: torch.Tensor, past: int) -> tuple[torch.Tensor, ...]:
    """Inputs of :class:`CachedStepGraph` for ``src`` with ``past`` cached (random) tokens."""
    b = src.shape[0]
    layers, heads = len(model.decoder), model.decoder[0].self_attn.heads
    dk = model.decoder[0].self_attn.dk
    mem_k, mem_v = CrossKVGraph(model)(src)
    past_mask = torch.ones(b, past, dtype=torch.long)
    if past > 1:
        past_mask[0, -1] = 0  # one row with a shorter cache
    return (
        torch.randint(4, model.embed.num_embeddings, (b, 1)),
        past_mask.sum(1),
        torch.randn(layers, b, heads, past, dk),
        torch.randn(layers, b, heads, past, dk),
        past_mask,
        mem_k.detach(),
        mem_v.detach(),
        src,
    )


# --- batching and decoding -----------------------------------------------------------------------


def pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def token_batches(lengths: list[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length (little padding), about ``batch_tokens`` each, shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        longest = max(longest, lengths[i])
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], lengths[i]
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


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


# --- training ------------------------------------------------------------------------------------


def model_config(cfg: Config, vocab: int) -> dict:
    return {
        "name": cfg.name,
        "task": "translation",
        "description": "English to French (Tatoeba): Transformer encoder-decoder over a joint BPE vocabulary. "
        "Two graphs: encoder.onnx (src_ids -> memory) and this model's decoder step "
        "(tgt_ids, memory, src_ids -> log_probs of the next token).",
        "platform": "onnxruntime",
        "inputs": [
            {"name": "tgt_ids", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "memory", "datatype": "FP32", "shape": [-1, -1, cfg.d_model]},
            {"name": "src_ids", "datatype": "INT64", "shape": [-1, -1]},
        ],
        "outputs": [{"name": "log_probs", "datatype": "FP32", "shape": [-1, vocab]}],
        "max_batch_size": 64,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "parameters": {
            "source_language": "en",
            "target_language": "fr",
            "tokenizer": "tokenizer.json",
            "encoder": "encoder.onnx",
            # The same model as a key/value-cache pair (NEUROSERVE_DECODE_KV_CACHE picks which serves).
            "encoder_kv": "encoder_kv.onnx",
            "decoder_cached": "decoder_cached.onnx",
            "max_source_tokens": cfg.max_tokens,
            "max_new_tokens": cfg.max_tokens,
            "special_tokens": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
        },
    }


def lr_at(step: int, total: int, cfg: Config) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    pairs = read_pairs(cfg.data_dir)
    n_validation, epochs = cfg.validation_sentences, cfg.epochs
    if cfg.smoke:
        pairs = pairs[:: max(1, len(pairs) // 3000)]  # every length, few pairs
        n_validation, epochs = 100, 1
        cfg = dataclasses.replace(
            cfg,
            d_model=64,
            ff=128,
            encoder_layers=1,
            decoder_layers=1,
            eval_sentences=50,
            checkpoint_dir=cfg.output_dir / ".checkpoints" / cfg.name,  # never over a real run's weights; hidden
        )
    train_pairs, validation = split_by_english(pairs, n_validation, cfg.seed)
    if cfg.init_from is not None:  # continue from a kept checkpoint: its vocabulary, its weights
        tokenizer = Tokenizer.from_file(str(cfg.init_from / "tokenizer.json"))
    else:
        tokenizer = build_tokenizer([t for p in train_pairs for t in p], cfg.vocab_size)
    vocab = tokenizer.get_vocab_size()

    def ids(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts)]

    src_all, tgt_all = ids([p[0] for p in train_pairs]), ids([p[1] for p in train_pairs])
    keep = [i for i in range(len(src_all)) if len(src_all[i]) <= cfg.max_tokens and len(tgt_all[i]) < cfg.max_tokens]
    src = [src_all[i] for i in keep]
    tgt = [[BOS_ID, *tgt_all[i], EOS_ID] for i in keep]
    val_en = list(validation)
    val_src = [s[: cfg.max_tokens] for s in ids(val_en)]
    val_refs = [[normalise_reference(r) for r in validation[en]] for en in val_en]
    tqdm.write(
        f"{len(src)} training pairs ({len(train_pairs) - len(src)} longer than {cfg.max_tokens} tokens "
        f"dropped), {len(val_en)} validation sentences, vocabulary {vocab}"
    )

    model = Translator(vocab, cfg)
    if cfg.init_from is not None:
        model.load_state_dict(torch.load(cfg.init_from / "model.pt", map_location="cpu", weights_only=False)["state"])
    model = model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-9,
    )
    rng = random.Random(cfg.seed)
    lengths = [len(t) for t in tgt]
    steps_per_epoch = len(token_batches(lengths, cfg.batch_tokens, random.Random(0)))
    total = steps_per_epoch * epochs
    eval_idx = list(range(min(cfg.eval_sentences, len(val_en))))
    best, best_state, best_epoch, step = -1.0, None, 0, 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        bar = tqdm(token_batches(lengths, cfg.batch_tokens, rng), desc=f"epoch {epoch}/{epochs}", unit="batch")
        for batch in bar:
            s = pad([src[i] for i in batch]).to(device)
            t = pad([tgt[i] for i in batch]).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            logits = model(s, t[:, :-1])
            loss = F.cross_entropy(
                logits.reshape(-1, vocab),
                t[:, 1:].reshape(-1),
                ignore_index=PAD_ID,
                label_smoothing=cfg.label_smoothing,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        hyps = tokenizer.decode_batch(greedy(model.cpu(), [val_src[i] for i in eval_idx], cfg.max_tokens))
        model.to(device)
        score = bleu(hyps, [val_refs[i] for i in eval_idx])
        tqdm.write(f"epoch {epoch}: BLEU {score:.2f} on {len(eval_idx)} validation sentences (greedy)")
        if score > best:
            best, best_epoch, best_state = score, epoch, common.snapshot(model)
    train_seconds = time.perf_counter() - started
    model = model.cpu()
    model.load_state_dict(best_state)
    model.eval()
    # The torch weights and the tokenizer, so that other graphs can be exported later without retraining.
    cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state": best_state, "vocab": vocab, "config": dataclasses.asdict(cfg)}, cfg.checkpoint_dir / "model.pt"
    )
    tokenizer.save(str(cfg.checkpoint_dir / "tokenizer.json"))
    return export(
        cfg,
        model,
        tokenizer,
        val_en,
        val_src,
        val_refs,
        command,
        {
            "train_pairs": len(src),
            "best_epoch": best_epoch,
            "seconds": round(train_seconds, 1),
            "device": str(device),
            "steps": step,
        },
    )


def export(cfg, model, tokenizer, val_en, val_src, val_refs, command, facts) -> dict:
    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    encoder_path, decoder_path = version_dir / "encoder.onnx", version_dir / "model.onnx"
    example_src = pad(val_src[:3])
    memory = model.encode(example_src)
    example_tgt = pad([[BOS_ID], [BOS_ID, 5, 6], [BOS_ID, 7]])
    common.export_onnx(
        EncoderGraph(model),
        (example_src,),
        encoder_path,
        input_names=["src_ids"],
        output_names=["memory"],
        dynamic_axes={"src_ids": {0: "batch", 1: "source"}, "memory": {0: "batch", 1: "source"}},
    )
    common.export_onnx(
        DecoderStepGraph(model),
        (example_tgt, memory.detach(), example_src),
        decoder_path,
        input_names=["tgt_ids", "memory", "src_ids"],
        output_names=["log_probs"],
        dynamic_axes={
            "tgt_ids": {0: "batch", 1: "target"},
            "memory": {0: "batch", 1: "source"},
            "src_ids": {0: "batch", 1: "source"},
            "log_probs": {0: "batch"},
        },
    )
    parity_enc = common.check_parity(EncoderGraph(model), encoder_path, {"src_ids": example_src})
    parity_dec = common.check_parity(
        DecoderStepGraph(model),
        decoder_path,
        {"tgt_ids": example_tgt, "memory": memory.detach(), "src_ids": example_src},
    )
    # The key/value-cache pair: cross keys/values once per source, then one token per step.
    cross_path, cached_path = version_dir / "encoder_kv.onnx", version_dir / "decoder_cached.onnx"
    kv_axes = {0: "layers", 1: "batch", 3: "source"}
    common.export_onnx(
        CrossKVGraph(model),
        (example_src,),
        cross_path,
        input_names=["src_ids"],
        output_names=["mem_k", "mem_v"],
        dynamic_axes={"src_ids": {0: "batch", 1: "source"}, "mem_k": kv_axes, "mem_v": kv_axes},
    )
    cached_inputs = cached_example(model, example_src, past=4)
    past_axes = {1: "batch", 3: "past"}
    common.export_onnx(
        CachedStepGraph(model),
        cached_inputs,
        cached_path,
        input_names=CACHED_INPUTS,
        output_names=["log_probs", "new_k", "new_v"],
        dynamic_axes={
            "token": {0: "batch"},
            "position": {0: "batch"},
            "past_k": past_axes,
            "past_v": past_axes,
            "past_mask": {0: "batch", 1: "past"},
            "mem_k": {1: "batch", 3: "source"},
            "mem_v": {1: "batch", 3: "source"},
            "src_ids": {0: "batch", 1: "source"},
            "log_probs": {0: "batch"},
            "new_k": {1: "batch"},
            "new_v": {1: "batch"},
        },
    )
    parity_cross = common.check_parity(CrossKVGraph(model), cross_path, {"src_ids": example_src})
    parity_cached = common.check_parity(
        CachedStepGraph(model), cached_path, dict(zip(CACHED_INPUTS, cached_inputs, strict=True))
    )
    # Greedy decoding with torch and with each pair of graphs must give the same tokens on real sentences.
    probe = val_src[:32]
    torch_tokens = greedy(model, probe, cfg.max_tokens)
    agree = {}
    for label, decode in (
        ("full_prefix", lambda: onnx_greedy(encoder_path, decoder_path, probe, cfg.max_tokens)),
        ("kv_cache", lambda: onnx_cached_greedy(cross_path, cached_path, probe, cfg.max_tokens)),
    ):
        same = sum(a == b for a, b in zip(torch_tokens, decode(), strict=True))
        if same < len(probe) - 1:  # float noise may flip a near-tie once; more is a broken export
            raise AssertionError(f"{label} greedy decoding in onnxruntime differs from torch on {len(probe) - same}")
        agree[label] = f"{same}/{len(probe)}"
    tokenizer.save(str(version_dir / "tokenizer.json"))

    started = time.perf_counter()
    hyps = tokenizer.decode_batch(onnx_greedy_batched(encoder_path, decoder_path, val_src, cfg.max_tokens))
    decode_seconds = time.perf_counter() - started
    score = bleu(hyps, val_refs)
    beam_hyps = service_decode(cfg, tokenizer, version_dir, val_src, beam_size=4)
    beam_score = bleu(beam_hyps, val_refs)
    metrics = {
        "measured_on": "exported ONNX graphs in onnxruntime (CPU), greedy decoding",
        "validation_bleu": round(score, 2),
        "validation_bleu_beam4": round(beam_score, 2),
        "beam4_measured_on": "the service's own decoder (service/tasks/translation.py) with the key/value-cache "
        "graphs, beam size 4, length-normalised scores",
        "bleu_signature": "sacrebleu corpus_bleu, 13a tokenisation, all references of each sentence",
        "validation_sentences": len(val_en),
        "validation_references": sum(len(r) for r in val_refs),
        "onnx_vs_torch_max_abs_diff": {
            "encoder": parity_enc,
            "decoder": parity_dec,
            "encoder_kv": parity_cross,
            "decoder_cached": parity_cached,
        },
        "greedy_tokens_equal_torch_onnx": agree,
        "validation_decode_seconds": round(decode_seconds, 1),
        "examples": [{"en": en, "fr": fr} for en, fr in zip(val_en[:8], hyps[:8], strict=True)],
    }
    dataset = {
        "name": "Tatoeba English-French pairs (manythings.org/anki fra-eng.zip, 2017 export)",
        "source": "../shared/data/translation/fra-eng.zip (see its SOURCE.md)",
        "split": f"validation: {len(val_en)} English sentences drawn with seed {cfg.seed}, with all their "
        "translations; every pair of those sentences is left out of training",
        "train_pairs": facts["train_pairs"],
    }
    common.write_json(cfg.output_dir / cfg.name / "model.json", model_config(cfg, tokenizer.get_vocab_size()))
    meta = common.write_version_metadata(
        version_dir,
        metrics=metrics,
        dataset=dataset,
        command=command,
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "vocab_size": tokenizer.get_vocab_size(),
            "parameters": sum(p.numel() for p in model.parameters()),
            **facts,
        },
    )
    print(f"wrote {decoder_path} and {encoder_path}: validation BLEU {score:.2f} (onnxruntime, greedy)")
    return meta


def service_decode(
    cfg: Config, tokenizer: Tokenizer, version_dir: Path, sources: list[list[int]], beam_size: int
) -> list[str]:
    """Decode with the service's own engine code (jobs, beam search, cached steps), 64 texts at a time."""
    from service.config import Settings
    from service.repository import ModelSpec
    from service.runtime import OnnxModel, RuntimeOptions
    from service.tasks.translation import Source, TranslationEngine, load_assets

    spec = ModelSpec.model_validate(model_config(cfg, tokenizer.get_vocab_size()))
    options = RuntimeOptions(providers=["CPUExecutionProvider"], intra_op_threads=0, inter_op_threads=1)
    assets = load_assets(spec, version_dir, options)
    engine = TranslationEngine(OnnxModel(version_dir / "model.onnx", options), assets, Settings(), name=cfg.name)
    out: list[str] = []
    for start in range(0, len(sources), 64):
        jobs = [
            engine.new_job(Source(ids, len(ids), False, [], True), beam_size=beam_size, max_new_tokens=cfg.max_tokens)
            for ids in sources[start : start + 64]
        ]
        engine.prefill_cached(jobs)
        while active := [j for j in jobs if not j.done]:
            engine.step_cached(active)
        out += [engine.detokenize(j.result()) for j in jobs]
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


def onnx_greedy_batched(encoder: Path, decoder: Path, sources: list[list[int]], max_new: int) -> list[list[int]]:
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), 128):
        idx = order[start : start + 128]
        for i, toks in zip(idx, onnx_greedy(encoder, decoder, [sources[i] for i in idx], max_new), strict=True):
            out[i] = toks
    return out


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def export_only(cfg: Config, command: str) -> dict:
    """Export the graphs again from the weights kept in ``--checkpoint-dir`` (no training): the
    metadata keeps the training run's command and facts and adds this command."""
    checkpoint = torch.load(cfg.checkpoint_dir / "model.pt", map_location="cpu", weights_only=False)
    trained = dataclasses.replace(
        Config(**checkpoint["config"]), output_dir=cfg.output_dir, version=cfg.version, name=cfg.name
    )
    tokenizer = Tokenizer.from_file(str(cfg.checkpoint_dir / "tokenizer.json"))
    model = Translator(checkpoint["vocab"], trained)
    model.load_state_dict(checkpoint["state"])
    model.eval()
    _, validation = split_by_english(read_pairs(trained.data_dir), trained.validation_sentences, trained.seed)
    val_en = list(validation)
    val_src = [e.ids[: trained.max_tokens] for e in tokenizer.encode_batch(val_en)]
    val_refs = [[normalise_reference(r) for r in validation[en]] for en in val_en]
    previous = cfg.output_dir / cfg.name / str(cfg.version) / "metadata.json"
    facts: dict = {}
    training_command = command
    if previous.is_file():
        old = json.loads(previous.read_text())["training"]
        training_command = old.get("command", command)
        keep = ("train_pairs", "best_epoch", "seconds", "device", "steps")
        facts = {k: old[k] for k in keep if k in old}
    facts["exported_by"] = command
    return export(trained, model, tokenizer, val_en, val_src, val_refs, training_command, facts)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    command = common.command_line("training.translation", argv)
    return export_only(cfg, command) if cfg.export_only else train(cfg, command=command)


if __name__ == "__main__":
    main()
