"""Train an English language model (an LSTM over byte-level BPE) and write it to the model repository
as two ONNX graphs, a decode step and a prompt prefill; a character n-gram model is its baseline.

    python -m training.text_generation --data-dir ../shared/data/translation   # -> models/text-generator

Data: the English side of Tatoeba (``fra-eng.zip``), each distinct sentence once, split by sentence
with the seed into training (94 %), validation (3 %: epoch choice) and test (3 %: reported once).
Tokenisation is a byte-level BPE trained on the training sentences (lossless: every text has ids, and
decoding them gives the text back). The model is the seed architecture of a recurrent language model:
embedding, a 2-layer LSTM, dropout, an output layer tied to the embedding (through a projection when
the LSTM is wider than the embedding). Every sentence is ``<bos> tokens <eos>``.

Both the LSTM and the baseline, an interpolated modified Kneser-Ney character n-gram model (orders 5,
6 and 7, the best picked on validation, fitted on the same training sentences), are scored in bits
per character: the bits of every predicted symbol of a sentence, its end included, over its characters
plus one for the end. The graphs (rows are independent sequences; states are batch-first):

- ``model.onnx``: ``token [rows]``, ``h``, ``c [rows, layers, hidden]`` -> ``log_probs [rows, vocab]``
  (of the token after ``token``), ``h_next``, ``c_next``;
- ``prefill.onnx``: ``ids [rows, T]`` (``<bos>`` first, right-padded), ``lengths [rows]``,
  ``positions [rows, P]`` -> ``log_probs [rows, P, vocab]`` at those positions (position t predicts
  token t + 1) and the state ``h``, ``c`` after each row's last token: torch's export of the whole
  prompt, rewritten by :mod:`training.prefill_graph` so prompts of any lengths share a call and
  only the positions asked for are projected.
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import sys
import time
import warnings
import zipfile
from dataclasses import field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from tqdm import tqdm

from training import common, prefill_graph

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]  # ids 0..3, relied on by the graphs and the service
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
PROMPTS = ["I think that", "Tom is", "The weather", "Can you", "My favourite", "Where did you", "It's"]


@dataclasses.dataclass
class Config:
    data_dir: Path = field(default=Path("../shared/data/translation"), metadata={"help": "folder holding fra-eng.zip"})
    output_dir: Path = field(default=Path("models"), metadata={"help": "model repository root"})
    name: str = "text-generator"
    version: int = 1
    validation_fraction: float = field(default=0.03, metadata={"help": "sentences held out to pick the epoch"})
    test_fraction: float = field(default=0.03, metadata={"help": "sentences held out to report once"})
    vocab_size: int = 8000
    embed_dim: int = 512
    hidden: int = 512
    layers: int = 2
    dropout: float = field(default=0.4, metadata={"help": "on the embeddings, between the layers and on the output"})
    input_dropout: float | None = field(default=None, metadata={"help": "on the embeddings (unset: --dropout)"})
    layer_dropout: float | None = field(default=None, metadata={"help": "between the LSTM layers (unset: --dropout)"})
    variational: bool = field(
        default=True, metadata={"help": "one dropout mask per sentence for all its positions (embeddings, output)"}
    )
    weight_drop: float = field(
        default=0.25, metadata={"help": "DropConnect on the LSTM's hidden-to-hidden weights while training"}
    )
    epochs: int = 16
    time_budget_min: float = field(
        default=0.0,
        metadata={
            "help": "also stop after this many minutes of training, the learning rate's cosine following the "
            "time spent (or the steps, whichever is further): a run of known length on a machine of unknown speed"
        },
    )
    batch_tokens: int = field(default=2048, metadata={"help": "tokens (with <bos>, <eos>) per batch"})
    lr: float = 8e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    clip: float = field(default=1.0, metadata={"help": "gradient norm clipping"})
    bf16: bool = field(
        default=True,
        metadata={"help": "training forward pass autocast to bfloat16 (weights, validation and export stay fp32)"},
    )
    ngram_orders: tuple[int, ...] = field(default=(5, 6, 7), metadata={"help": "character n-gram baseline orders"})
    max_context_tokens: int = field(default=256, metadata={"help": "longest prompt the service takes (model.json)"})
    max_new_tokens: int = field(default=256, metadata={"help": "most tokens the service generates (model.json)"})
    max_train_sentences: int = field(default=0, metadata={"help": "use only this many training sentences (0: all)"})
    extra_train: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "more Tatoeba zips in --data-dir (e.g. cmn-eng.zip) whose English sentences join training only "
            "(validation and test stay fra-eng.zip's, so figures compare across versions)"
        },
    )
    seed: int = field(default=1, metadata={"help": "initial weights, dropout and batch order"})
    split_seed: int = field(
        default=1,
        metadata={"help": "the split by sentence (runs that differ only in --seed share their held-out sentences)"},
    )
    device: str = "auto"
    checkpoint: Path | None = field(
        default=None,
        metadata={
            "help": "save the best weights, the tokenizer and the history in this folder and stop before the "
            "export (train on the GPU machine, export and score here with --from-checkpoint)"
        },
    )
    from_checkpoint: Path | None = field(
        default=None,
        metadata={
            "help": "a --checkpoint folder: export and score its weights instead of training; the network, data "
            "and split settings are the checkpoint's (this command's are ignored), the output settings this one's"
        },
    )
    threads: int = field(default=2, metadata={"help": "torch CPU threads (0: torch's default)"})
    smoke: bool = field(default=False, metadata={"help": "3,000 sentences, tiny model, one epoch: checks the pipeline"})


# --- data ----------------------------------------------------------------------------------------


def read_sentences(data_dir: Path, archive_name: str = "fra-eng.zip") -> list[str]:
    """The distinct English sentences of a Tatoeba zip (``fra-eng.zip``: ``fra.txt``), in order of
    first appearance; English is the first column."""
    path = data_dir / archive_name
    inner = archive_name.split("-")[0] + ".txt"
    with zipfile.ZipFile(path) as archive, archive.open(inner) as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8").read().splitlines()
    english = []
    for number, line in enumerate(lines, start=1):
        cols = line.split("\t")
        if len(cols) < 2:
            raise ValueError(f"{path}!{inner}:{number}: expected 'English<TAB>translation'")
        if cols[0].strip():
            english.append(cols[0].strip())
    return list(dict.fromkeys(english))


def extra_training(cfg: Config, held: list[str]) -> list[str]:
    """English sentences of ``cfg.extra_train`` not among ``held`` (fra-eng's, every split), in a
    seeded order: training only, so the validation and test sentences are the same with or without."""
    known = set(held)
    extra = [s for name in cfg.extra_train for s in read_sentences(cfg.data_dir, name) if s not in known]
    extra = sorted(set(extra))
    random.Random(cfg.split_seed + 1).shuffle(extra)
    return extra[:300] if cfg.smoke else extra


def split_sentences(sentences: list[str], validation: float, test: float, seed: int) -> dict[str, list[str]]:
    """Distinct sentences shuffled with the seed and cut: test, validation, then the rest for training."""
    distinct = sorted(set(sentences))
    random.Random(seed).shuffle(distinct)
    n_test, n_val = round(len(distinct) * test), round(len(distinct) * validation)
    return {
        "train": distinct[n_test + n_val :],
        "validation": distinct[n_test : n_test + n_val],
        "test": distinct[:n_test],
    }


def build_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: all 256 bytes are in the alphabet, so there is no unknown text and no loss."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    for token, expected in zip(SPECIALS, range(4), strict=True):
        if tokenizer.token_to_id(token) != expected:
            raise AssertionError(f"{token} has id {tokenizer.token_to_id(token)}, not {expected}")
    # Text that spells "<eos>" is text (bytes), not the end. tokenizer.json does not keep this setting:
    # whoever loads the file sets it too.
    tokenizer.encode_special_tokens = True
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """``<bos> tokens <eos>`` of each text."""
    return [[BOS_ID, *e.ids, EOS_ID] for e in tokenizer.encode_batch(texts)]


def check_lossless(tokenizer: Tokenizer, texts: list[str]) -> None:
    ids = [e.ids for e in tokenizer.encode_batch(texts)]
    for text, back in zip(texts, tokenizer.decode_batch(ids, skip_special_tokens=False), strict=True):
        if back != text:
            raise AssertionError(f"tokenizer is not lossless: {text!r} -> {back!r}")


# --- the character n-gram baseline ---------------------------------------------------------------


class CharNgram:
    """Interpolated modified Kneser-Ney over characters (Chen and Goodman 1998, with KenLM's rule for
    n-grams that start with the start symbol: they keep their raw counts, having no left context).

    Each sentence is ``max_order - 1`` start symbols, its characters and an end symbol; every character
    and the end are predicted. Counts are numpy arrays of n-gram codes (``bits`` per symbol, the last
    symbol lowest), sorted, so that scoring is a vectorised lookup. A character never seen in training
    is the unknown symbol; the lowest order interpolates with a uniform distribution over the
    characters seen, the end and the unknown symbol, so every character has a probability.
    """

    BOS, EOS, UNK = 1, 2, 3  # 0 is no symbol: a code with leading zeros is a shorter n-gram

    def __init__(self, sentences: list[str], max_order: int) -> None:
        self.max_order = max_order
        chars = sorted({ch for s in sentences for ch in s})
        self.ids = {ch: i for i, ch in enumerate(chars, start=4)}
        self.vocab = len(chars) + 2  # what is predicted: the characters, the end and the unknown symbol
        self.bits = max(1, math.ceil(math.log2(len(chars) + 4)))
        if self.bits * max_order > 62:
            raise ValueError(f"{len(chars)} characters at order {max_order} do not fit in 63-bit n-gram codes")
        codes = self.codes(sentences)
        self.grams, self.raw, self.adjusted = [], [], []
        for k in range(1, max_order + 1):
            grams, counts = np.unique(codes[k - 1], return_counts=True)
            self.grams.append(grams)
            self.raw.append(counts)
        for k in range(1, max_order):  # continuation counts: distinct symbols seen before each k-gram
            suffixes, left = np.unique(self.grams[k] & ((1 << (self.bits * k)) - 1), return_counts=True)
            if not np.array_equal(suffixes, self.grams[k - 1]):
                raise AssertionError("every k-gram must have a left context (the start padding)")
            starts = (self.grams[k - 1] >> (self.bits * (k - 1))) == self.BOS
            self.adjusted.append(np.where(starts, self.raw[k - 1], left))
        self.levels: dict[tuple[int, bool], Level] = {}

    def codes(self, sentences: list[str]) -> list[np.ndarray]:
        """For each predicted position of every sentence, the codes of the k-grams ending there, k = 1..max."""
        pad = self.max_order - 1
        symbols, predicted = [], []
        for s in sentences:
            symbols += [self.BOS] * pad + [self.ids.get(ch, self.UNK) for ch in s] + [self.EOS]
            predicted += [False] * pad + [True] * (len(s) + 1)
        seq = np.array(symbols, dtype=np.int64)
        where = np.flatnonzero(predicted)
        out, code = [], np.zeros(len(where), dtype=np.int64)
        for k in range(self.max_order):
            code = code | (seq[where - k] << (self.bits * k))
            out.append(code)
        return out

    def level(self, k: int, top: bool) -> Level:
        """Counts of the k-grams (raw at a model's top order, adjusted below it), their contexts' totals
        and the discounts."""
        key = (k, top or k == self.max_order)
        if key not in self.levels:
            counts = self.raw[k - 1] if key[1] else self.adjusted[k - 1]
            self.levels[key] = Level.of(self.grams[k - 1], counts, self.bits)
        return self.levels[key]

    def probabilities(self, sentences: list[str], order: int) -> np.ndarray:
        """The probability of every predicted symbol (each character and each sentence's end)."""
        if not 1 <= order <= self.max_order:
            raise ValueError(f"order {order} outside 1..{self.max_order}")
        codes = self.codes(sentences)
        p = np.full(len(codes[0]), 1.0 / self.vocab)
        for k in range(1, order + 1):
            p = self.level(k, top=k == order).interpolate(codes[k - 1], p, self.bits)
        return p

    def bits_per_character(self, sentences: list[str], order: int) -> float:
        return float(-np.log2(self.probabilities(sentences, order)).sum() / sum(len(s) + 1 for s in sentences))


class Level(NamedTuple):
    grams: np.ndarray  # sorted k-gram codes
    counts: np.ndarray  # their (raw or adjusted) counts
    contexts: np.ndarray  # sorted distinct (k-1)-gram contexts
    totals: np.ndarray  # sum of the counts after each context
    gamma: np.ndarray  # the weight each context gives the lower order
    discounts: np.ndarray  # [0, D1, D2, D3+]

    @classmethod
    def of(cls, grams: np.ndarray, counts: np.ndarray, bits: int) -> Level:
        n = [int((counts == r).sum()) for r in range(1, 5)]
        discounts = np.zeros(4)
        y = n[0] / (n[0] + 2 * n[1]) if n[0] + n[1] else 0.5
        for r in (1, 2, 3):  # D_r = r - (r + 1) Y n_{r+1} / n_r, kept in (0, r)
            d = r - (r + 1) * y * n[r] / n[r - 1] if n[r - 1] else 0.5 * r
            discounts[r] = min(max(d, 0.05 * r), 0.95 * r)
        contexts, starts = np.unique(grams >> bits, return_index=True)
        totals = np.add.reduceat(counts, starts)
        discounted = np.add.reduceat(discounts[np.minimum(counts, 3)], starts)
        return cls(grams, counts, contexts, totals, discounted / totals, discounts)

    def interpolate(self, codes: np.ndarray, lower: np.ndarray, bits: int) -> np.ndarray:
        """p(c | h) = (count(hc) - D) / total(h) + gamma(h) p_lower(c | h'), or p_lower where h is unseen."""
        i = np.minimum(np.searchsorted(self.grams, codes), len(self.grams) - 1)
        count = np.where(self.grams[i] == codes, self.counts[i], 0)
        j = np.minimum(np.searchsorted(self.contexts, codes >> bits), len(self.contexts) - 1)
        seen = self.contexts[j] == codes >> bits
        mine = (count - self.discounts[np.minimum(count, 3)]) / self.totals[j] + self.gamma[j] * lower
        return np.where(seen, mine, lower)


def ngram_baseline(cfg: Config, splits: dict[str, list[str]]) -> dict:
    """The n-gram model at each order: bits per character on validation and test; the order is the
    best on validation."""
    started = time.perf_counter()
    model = CharNgram(splits["train"], max(cfg.ngram_orders))
    per_order = {}
    for order in cfg.ngram_orders:
        per_order[str(order)] = {
            split: round(model.bits_per_character(splits[split], order), 4) for split in ("validation", "test")
        }
        tqdm.write(f"character {order}-gram: {per_order[str(order)]} bits per character")
    best = min(cfg.ngram_orders, key=lambda o: per_order[str(o)]["validation"])
    return {
        "model": "character n-gram, interpolated modified Kneser-Ney (3 discounts per order, estimated from "
        "counts of counts), start-padded sentences with an end symbol, uniform base over the training "
        f"characters + end + unknown ({model.vocab} symbols)",
        "bits_per_character": per_order,
        "chosen_order": best,
        "validation_bits_per_character": per_order[str(best)]["validation"],
        "test_bits_per_character": per_order[str(best)]["test"],
        "seconds": round(time.perf_counter() - started, 1),
    }


# --- the LSTM ------------------------------------------------------------------------------------


class LanguageModel(nn.Module):
    """Embedding, an LSTM, dropout, a projection to the embedding width (when the LSTM is wider) and
    the output layer, whose weight is the embedding's. Dropout and weight drop act only in training:
    the exported graphs are the plain network."""

    def __init__(self, vocab: int, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.embed_dim, padding_idx=PAD_ID)
        between = cfg.dropout if cfg.layer_dropout is None else cfg.layer_dropout
        self.lstm = nn.LSTM(
            cfg.embed_dim, cfg.hidden, cfg.layers, batch_first=True, dropout=between if cfg.layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.input_dropout = nn.Dropout(cfg.dropout if cfg.input_dropout is None else cfg.input_dropout)
        self.variational = cfg.variational
        self.weight_drop = cfg.weight_drop
        self.project = nn.Linear(cfg.hidden, cfg.embed_dim) if cfg.hidden != cfg.embed_dim else nn.Identity()
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.embed.weight, std=0.05)
        with torch.no_grad():
            self.embed.weight[PAD_ID].zero_()

    def drop(self, x: torch.Tensor, dropout: nn.Dropout | None = None) -> torch.Tensor:
        """Dropout of ``[B, T, D]``: with ``variational``, the same units of a sentence at every position."""
        dropout = dropout or self.dropout
        if not (self.training and self.variational):
            return dropout(x)
        return x * dropout(x.new_ones(x.shape[0], 1, x.shape[2]))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return F.linear(self.project(self.drop(out)), self.embed.weight, self.bias)

    def forward(self, ids: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None):
        """``ids [B, T]`` -> logits ``[B, T, V]`` and the state, torch's way (``[layers, B, hidden]``).
        While training, the recurrent weights are dropped (one mask per batch, AWD-LSTM's weight drop)."""
        x = self.drop(self.embed(ids), self.input_dropout)
        if self.training and self.weight_drop > 0:
            dropped = {
                name: F.dropout(weight, self.weight_drop, training=True)
                for name, weight in self.lstm.named_parameters()
                if name.startswith("weight_hh")
            }
            out, state = torch.func.functional_call(self.lstm, dropped, (x, state))
        else:
            out, state = self.lstm(x, state)
        return self.logits(out), state


class StepGraph(nn.Module):
    """``model.onnx``: one token per row and its state (batch-first) -> log-probabilities of the next
    token and the state after it."""

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, token: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        state = (h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous())
        logits, (h_next, c_next) = self.lm(token.unsqueeze(1), state)
        return torch.log_softmax(logits[:, 0], dim=-1), h_next.transpose(0, 1), c_next.transpose(0, 1)


class PrefillGraph(nn.Module):
    """``prefill.onnx``: whole prompts from the zero state -> log-probabilities at every position and
    the state (batch-first) after the last."""

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor):
        zeros = torch.zeros(self.lm.lstm.num_layers, ids.shape[0], self.lm.lstm.hidden_size)
        logits, (h, c) = self.lm(ids, (zeros, zeros))
        return torch.log_softmax(logits, dim=-1), h.transpose(0, 1), c.transpose(0, 1)


def pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def lr_at(step: int, progress: float, cfg: Config) -> float:
    """Linear warm-up over the first steps, then a cosine down to 5 % of the peak as ``progress``
    goes from 0 to 1 (the share of the steps after the warm-up, or of the time budget, whichever is
    further)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def optimizer_for(model: LanguageModel, cfg: Config) -> torch.optim.Optimizer:
    """AdamW, with weight decay on the matrices but not on the embedding (the output layer) and biases."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def token_log_probs(model: LanguageModel, seqs: list[list[int]], batch_tokens: int = 8192) -> torch.Tensor:
    """The log-probability of every predicted token (after ``<bos>``, ``<eos>`` included), in torch, in
    an order that depends only on ``seqs`` (so that the tokens of several models line up)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for batch in common.token_batches([len(s) for s in seqs], batch_tokens, random.Random(0)):
            ids = pad([seqs[i] for i in batch]).to(device)
            logits, _ = model(ids[:, :-1])
            targets = ids[:, 1:]
            picked = F.log_softmax(logits.float(), dim=-1).gather(2, targets.unsqueeze(2)).squeeze(2)
            out.append(picked[targets != PAD_ID].double().cpu())
    return torch.cat(out)


def sentence_bits(model: LanguageModel, seqs: list[list[int]]) -> float:
    """Total bits (-log2 p) of every predicted token, in torch."""
    return float(-token_log_probs(model, seqs).sum()) / math.log(2)


class Fitted(NamedTuple):
    state: dict[str, torch.Tensor]
    best_epoch: int
    steps: int
    seconds: float
    history: list[dict]
    device: str


# What an export from a checkpoint takes from its own command line; every other field (the network,
# the data, the split, the training) is the checkpoint's, so that the figures are of the split it
# was trained on whatever flags the export is given.
EXPORT_FIELDS = frozenset(
    {"data_dir", "output_dir", "name", "version", "device", "threads", "checkpoint", "from_checkpoint"}
    | {"max_context_tokens", "max_new_tokens"}
)


def plain_config(cfg: Config) -> dict:
    """``cfg`` as a checkpoint keeps it (strings, numbers, lists: what ``torch.load`` reads back safely)."""
    out = {}
    for name, value in dataclasses.asdict(cfg).items():
        out[name] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def trained_config(cfg: Config, kept: dict) -> Config:
    """``cfg`` with every field but :data:`EXPORT_FIELDS` taken from a checkpoint's config."""
    values = {}
    for f in dataclasses.fields(Config):
        if f.name in EXPORT_FIELDS or f.name not in kept:
            continue
        value = kept[f.name]
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(cfg, **values)


def save_checkpoint(
    folder: Path, fitted: Fitted, tokenizer: Tokenizer, cfg: Config, command: str, baseline: dict
) -> None:
    """The best weights and how they were trained (``checkpoint.pt``: with the config and the
    command), the tokenizer, and a summary (``summary.json``: the history and the n-gram baseline),
    for :func:`load_checkpoint`."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {**fitted._asdict(), "command": command, "config": plain_config(cfg)}
    torch.save(record, folder / "checkpoint.pt")
    tokenizer.save(str(folder / "tokenizer.json"))
    best = min(fitted.history, key=lambda h: h["validation_bits_per_character"])
    summary = {"best": best, "ngram_baseline": baseline, **record}
    del summary["state"]
    common.write_json(folder / "summary.json", summary)


def read_checkpoint(folder: Path) -> dict:
    record = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    if "config" not in record:
        raise SystemExit(f"{folder}: a checkpoint without its training config")
    return record


def load_checkpoint(record: dict, command: str) -> tuple[Fitted, str]:
    """A :func:`read_checkpoint` record's training, and the command of both steps (the metadata's)."""
    record = dict(record)
    trained_by = record.pop("command")
    del record["config"]
    return Fitted(**record), f"{trained_by} && {command}" if command else trained_by


def fit(model: LanguageModel, cfg: Config, seqs: dict[str, list[list[int]]], chars: int, epochs: int) -> Fitted:
    """Train for ``epochs`` (or ``cfg.time_budget_min``, whichever ends first), keeping the weights of
    the epoch with the lowest validation bits per character (``chars``: the validation characters, each
    sentence's end counted as one)."""
    device = next(model.parameters()).device
    optimizer = optimizer_for(model, cfg)
    rng = random.Random(cfg.seed)
    train = seqs["train"]
    lengths = [len(s) for s in train]
    total = len(common.token_batches(lengths, cfg.batch_tokens, random.Random(0))) * epochs
    best, best_state, best_epoch, step, history = math.inf, None, 0, 0, []
    started = time.perf_counter()
    budget = cfg.time_budget_min * 60

    def progress() -> float:
        done = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return max(done, (time.perf_counter() - started) / budget) if budget else done

    for epoch in range(1, epochs + 1):
        model.train()
        bar = tqdm(common.token_batches(lengths, cfg.batch_tokens, rng), desc=f"epoch {epoch}/{epochs}", unit="batch")
        nats, tokens = 0.0, 0
        for batch in bar:
            done = progress()
            if budget and done >= 1.0:
                break
            ids = pad([train[i] for i in batch]).to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, done, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits, _ = model(ids[:, :-1])
            logits = logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD_ID)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            step += 1
            n = int((ids[:, 1:] != PAD_ID).sum())
            nats, tokens = nats + loss.item() * n, tokens + n
            if step % 20 == 0:
                bar.set_postfix(loss=f"{nats / tokens:.3f}")
        bpc = sentence_bits(model, seqs["validation"]) / chars
        history.append(
            {
                "epoch": epoch,
                "train_loss": round(nats / max(tokens, 1), 4),
                "validation_bits_per_character": round(bpc, 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        tqdm.write(f"epoch {epoch}: {history[-1]}")
        if bpc < best or best_state is None:  # a NaN first epoch still leaves weights to look at
            best, best_epoch, best_state = bpc, epoch, common.snapshot(model)
        if budget and time.perf_counter() - started >= budget:
            tqdm.write(f"the time budget of {cfg.time_budget_min} min is spent after epoch {epoch}")
            break
    return Fitted(best_state, best_epoch, step, time.perf_counter() - started, history, str(device))


# --- export, parity and scoring through the graphs -----------------------------------------------

GRAPH_AXES = {
    "model.onnx": {
        "token": {0: "rows"},
        "h": {0: "rows"},
        "c": {0: "rows"},
        "log_probs": {0: "rows"},
        "h_next": {0: "rows"},
        "c_next": {0: "rows"},
    },
    "prefill.onnx": {
        "ids": {0: "rows", 1: "length"},
        "log_probs": {0: "rows", 1: "length"},
        "h": {0: "rows"},
        "c": {0: "rows"},
    },
}


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def export_graphs(model: LanguageModel, cfg: Config, held: list[list[int]], version_dir: Path) -> dict[str, float]:
    """Both graphs, exported and checked against torch at 3 rows of held-out sentences (the prefill at
    two lengths), and the chain prefill(prompt), step(next token) against prefill(prompt + next token):
    the largest differences, by check."""
    model.eval()
    step, prefill = StepGraph(model), PrefillGraph(model)
    rows = torch.tensor([s[:12] for s in held if len(s) >= 12][:3])
    generator = torch.Generator().manual_seed(cfg.seed)
    state = (len(rows), cfg.layers, cfg.hidden)
    step_inputs = {
        "token": rows[:, 5],
        "h": torch.randn(state, generator=generator) * 0.5,
        "c": torch.randn(state, generator=generator),
    }
    with warnings.catch_warnings():
        # The exporter warns about the batch size of every LSTM it exports, whatever the graph. Here
        # the state is an input (step) or built from the rows of ids (prefill), and both graphs are
        # checked at another row count than they were exported with.
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        # The tracer warns (TracerWarning) where the LSTM compares sizes; as an error (the test suite
        # makes warnings errors) it broke the trace after another test had traced an LSTM.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        common.export_onnx(
            step,
            tuple(v[:2] for v in step_inputs.values()),
            version_dir / "model.onnx",
            ["token", "h", "c"],
            ["log_probs", "h_next", "c_next"],
            GRAPH_AXES["model.onnx"],
        )
        ids = (rows[:2, :4],)
        common.export_onnx(
            prefill, ids, version_dir / "prefill.onnx", ["ids"], ["log_probs", "h", "c"], GRAPH_AXES["prefill.onnx"]
        )
    parity = {"step": common.check_parity(step, version_dir / "model.onnx", step_inputs)}
    exported = onnx.load(str(version_dir / "prefill.onnx"))
    onnx.save(prefill_graph.ragged(exported), str(version_dir / "prefill.onnx"))
    pre, one = session(version_dir / "prefill.onnx"), session(version_dir / "model.onnx")
    # torch, one row at a time at its own length, against one ragged call (every position)
    ragged_rows = [s[:n] for s, n in zip(held, (5, 12, 3, 9), strict=False)]
    ids, lengths = prefill_graph.pad_rows(ragged_rows, PAD_ID)
    got, got_h, got_c = pre.run(
        None, {"ids": ids, "lengths": lengths, "positions": prefill_graph.every_position(lengths, ids.shape[1])}
    )
    worst = 0.0
    with torch.no_grad():
        for i, row in enumerate(ragged_rows):
            want, want_h, want_c = (t.numpy() for t in prefill(torch.tensor([row])))
            n = len(row)
            worst = max(
                worst,
                float(np.abs(got[i, :n] - want[0]).max()),
                float(np.abs(got_h[i] - want_h[0]).max()),
                float(np.abs(got_c[i] - want_c[0]).max()),
            )
    parity["prefill_ragged_lengths_5_12_3_9"] = worst
    if worst > 1e-4:
        raise AssertionError(f"the prefill graph disagrees with torch on prompts of different lengths: {worst}")
    full = rows.numpy()
    _, h, c = run_prefill(pre, full[:, :-1])
    log_probs, h_next, c_next = one.run(None, {"token": full[:, -1], "h": h, "c": c})
    want_log_probs, want_h, want_c = run_prefill(pre, full)
    parity["chain_log_probs"] = float(np.abs(log_probs - want_log_probs[:, -1]).max())
    parity["chain_state"] = float(max(np.abs(h_next - want_h).max(), np.abs(c_next - want_c).max()))
    if max(parity["chain_log_probs"], parity["chain_state"]) > 1e-4:
        raise AssertionError(f"prefill + step disagrees with prefill of the longer prompt: {parity}")
    return parity


def run_prefill(prefill: ort.InferenceSession, ids: np.ndarray, *, every: bool = True) -> list[np.ndarray]:
    """``ids [rows, T]`` (unpadded) through the prefill graph: log-probabilities at every position
    (or at the last), ``h``, ``c``."""
    lengths = np.full(ids.shape[0], ids.shape[1], np.int64)
    positions = prefill_graph.every_position(lengths, ids.shape[1]) if every else prefill_graph.last_positions(lengths)
    return prefill.run(None, {"ids": ids.astype(np.int64), "lengths": lengths, "positions": positions})


def onnx_token_log_probs(prefill_path: Path, seqs: list[list[int]], rows: int = 256) -> np.ndarray:
    """The log-probability (nats) of every predicted token of ``seqs`` (``<bos> tokens <eos>``) through
    the prefill graph, sentences of one length sharing a call: one flat array, in an order fixed by
    ``seqs`` alone (so two graphs' arrays line up token by token)."""
    prefill = session(prefill_path)
    by_length: dict[int, list[list[int]]] = {}
    for s in seqs:
        by_length.setdefault(len(s), []).append(s)
    out = []
    for group in by_length.values():
        for i in range(0, len(group), rows):
            ids = np.array(group[i : i + rows], dtype=np.int64)
            log_probs = run_prefill(prefill, ids[:, :-1])[0]
            out.append(np.take_along_axis(log_probs, ids[:, 1:, None], axis=2).ravel())
    return np.concatenate(out).astype(np.float64)


def onnx_bits(prefill_path: Path, seqs: list[list[int]]) -> float:
    """Total bits of every predicted token of ``seqs`` through the prefill graph."""
    return -float(onnx_token_log_probs(prefill_path, seqs).sum()) / math.log(2)


def lm_metrics(prefill_path: Path, seqs: list[list[int]], texts: list[str]) -> dict:
    bits = onnx_bits(prefill_path, seqs)
    tokens = sum(len(s) - 1 for s in seqs)
    return {
        "perplexity": round(2 ** (bits / tokens), 3),
        "bits_per_character": round(bits / sum(len(t) + 1 for t in texts), 4),
        "sentences": len(texts),
        "tokens": tokens,
    }


MEASURED_ON = (
    "exported prefill graph in onnxruntime (CPU); bits per character = bits of every predicted token (<eos> "
    "included, the first after <bos>) / (characters + 1 per sentence)"
)


def held_out_metrics(scores: dict[str, dict], baseline: dict) -> dict:
    """The metadata's figures of a version: :func:`lm_metrics` of validation and test, and the test
    figure's ratio to the n-gram baseline's."""
    return {
        "measured_on": MEASURED_ON,
        **{f"{k}_{m}": scores[k][m] for k in ("validation", "test") for m in ("perplexity", "bits_per_character")},
        "validation": scores["validation"],
        "test": scores["test"],
        "ngram_baseline": baseline,
        "test_bits_per_character_ratio_to_ngram": round(
            scores["test"]["bits_per_character"] / baseline["test_bits_per_character"], 4
        ),
    }


def greedy_continuations(version_dir: Path, tokenizer: Tokenizer, prompts: list[str], max_new: int = 24) -> list:
    """Each prompt continued greedily through the graphs: prefill, then one step per new token."""
    pre, one = session(version_dir / "prefill.onnx"), session(version_dir / "model.onnx")
    out = []
    for prompt in prompts:
        ids = [BOS_ID, *tokenizer.encode(prompt).ids]
        log_probs, h, c = run_prefill(pre, np.array([ids], dtype=np.int64), every=False)
        last, new = log_probs[:, -1], []
        while len(new) < max_new:
            token = int(last[0].argmax())
            if token == EOS_ID:
                break
            new.append(token)
            last, h, c = one.run(None, {"token": np.array([token], dtype=np.int64), "h": h, "c": c})
        out.append({"prompt": prompt, "continuation": tokenizer.decode(ids[1:] + new)})
    return out


def model_config(cfg: Config, vocab: int) -> dict:
    state = [-1, cfg.layers, cfg.hidden]
    return {
        "name": cfg.name,
        "task": "text-generation",
        "default": True,
        "description": "English sentences (Tatoeba): a 2-layer LSTM language model over byte-level BPE. "
        "This graph is one decode step (token, state h, c -> log_probs of the next token, next state); "
        "prefill.onnx reads whole prompts of any lengths (ids, lengths, positions -> log_probs at those positions, "
        "state after each row's last token).",
        "platform": "onnx_onnxv1",
        "inputs": [
            {"name": "token", "datatype": "INT64", "shape": [-1], "value_range": [0, vocab - 1]},
            {"name": "h", "datatype": "FP32", "shape": state},
            {"name": "c", "datatype": "FP32", "shape": state},
        ],
        "outputs": [
            {"name": "log_probs", "datatype": "FP32", "shape": [-1, vocab]},
            {"name": "h_next", "datatype": "FP32", "shape": state},
            {"name": "c_next", "datatype": "FP32", "shape": state},
        ],
        "max_batch_size": 64,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "parameters": {
            "tokenizer": "tokenizer.json",
            "prefill": "prefill.onnx",
            "special_tokens": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID},
            "max_context_tokens": cfg.max_context_tokens,
            "max_new_tokens": cfg.max_new_tokens,
        },
    }


# --- the run -------------------------------------------------------------------------------------


def smoke_sized(cfg: Config, splits: dict[str, list[str]]) -> tuple[Config, dict[str, list[str]]]:
    small = dataclasses.replace(cfg, vocab_size=600, embed_dim=32, hidden=48, batch_tokens=1024, warmup_steps=10)
    return small, {
        "train": splits["train"][:3000],
        "validation": splits["validation"][:200],
        "test": splits["test"][:200],
    }


def train(cfg: Config, command: str = "") -> dict:
    record = read_checkpoint(cfg.from_checkpoint) if cfg.from_checkpoint else None
    if record is not None:
        cfg = trained_config(cfg, record["config"])
    common.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    sentences = read_sentences(cfg.data_dir)
    splits = split_sentences(sentences, cfg.validation_fraction, cfg.test_fraction, cfg.split_seed)
    epochs = cfg.epochs
    if cfg.smoke:
        (cfg, splits), epochs = smoke_sized(cfg, splits), 1
    if cfg.max_train_sentences:
        splits["train"] = splits["train"][: cfg.max_train_sentences]
    extra = extra_training(cfg, sentences)
    splits["train"] += extra
    baseline = ngram_baseline(cfg, splits)

    if record is not None:
        tokenizer = Tokenizer.from_file(str(cfg.from_checkpoint / "tokenizer.json"))
        tokenizer.encode_special_tokens = True
    else:
        tokenizer = build_tokenizer(splits["train"], cfg.vocab_size)
    check_lossless(tokenizer, splits["validation"])
    vocab = tokenizer.get_vocab_size()
    seqs = {k: encode(tokenizer, v) for k, v in splits.items()}
    chars = {k: sum(len(t) + 1 for t in v) for k, v in splits.items()}
    tqdm.write(
        f"{len(sentences)} distinct sentences: {', '.join(f'{k} {len(v)}' for k, v in splits.items())}; "
        f"vocabulary {vocab}, {sum(len(s) - 1 for s in seqs['train'])} training tokens"
    )
    model = LanguageModel(vocab, cfg).to(device)
    tqdm.write(f"{sum(p.numel() for p in model.parameters())} parameters")
    if record is not None:
        fitted, command = load_checkpoint(record, command)
    else:
        fitted = fit(model, cfg, seqs, chars["validation"], epochs)
    if cfg.checkpoint:
        save_checkpoint(cfg.checkpoint, fitted, tokenizer, cfg, command, baseline)
        return {"checkpoint": str(cfg.checkpoint), "best_epoch": fitted.best_epoch, "history": fitted.history}
    model = model.cpu()
    model.load_state_dict(fitted.state)
    model.eval()

    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    parity = export_graphs(model, cfg, seqs["validation"], version_dir)
    tokenizer.save(str(version_dir / "tokenizer.json"))
    common.write_json(cfg.output_dir / cfg.name / "model.json", model_config(cfg, vocab))
    scores = {k: lm_metrics(version_dir / "prefill.onnx", seqs[k], splits[k]) for k in ("validation", "test")}
    metrics = {
        **held_out_metrics(scores, baseline),
        "onnx_vs_torch_max_abs_diff": parity,
        "greedy_examples": greedy_continuations(version_dir, tokenizer, PROMPTS),
    }
    dataset = {
        "name": "Tatoeba English sentences (the English side of manythings.org/anki fra-eng.zip, 2017 export)",
        "source": "../shared/data/translation/fra-eng.zip (see its SOURCE.md)",
        "split": f"{len(sentences)} distinct English sentences (exact duplicates removed) shuffled with seed "
        f"{cfg.split_seed}: {cfg.test_fraction:.0%} test (reported once), {cfg.validation_fraction:.0%} validation "
        "(epoch choice, n-gram order choice), the rest training (the tokenizer, the LSTM and the n-gram "
        "model); no sentence on two sides"
        + (
            f"; training also has the {len(extra)} English sentences of {', '.join(cfg.extra_train)} that are "
            "not fra-eng.zip sentences (so none is a validation or test sentence)"
            if cfg.extra_train
            else ""
        )
        + (" (smoke: a subset)" if cfg.smoke else ""),
        "extra_training_sentences": len(extra),
        **{f"{k}_sentences": len(v) for k, v in splits.items()},
        **{f"{k}_characters": chars[k] - len(v) for k, v in splits.items()},
    }
    meta = common.write_version_metadata(
        version_dir,
        metrics=metrics,
        dataset=dataset,
        command=command,
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "vocab_size": vocab,
            "parameters": sum(p.numel() for p in model.parameters()),
            "epochs": epochs,
            "best_epoch": fitted.best_epoch,
            "steps": fitted.steps,
            "seconds": round(fitted.seconds, 1),
            "device": fitted.device,
            "history": fitted.history,
        },
    )
    print(
        f"wrote {version_dir}: test {scores['test']['bits_per_character']:.4f} bits per character "
        f"(perplexity {scores['test']['perplexity']:.2f}), {baseline['chosen_order']}-gram "
        f"{baseline['test_bits_per_character']:.4f}: ratio {metrics['test_bits_per_character_ratio_to_ngram']:.3f}; "
        f"parity {parity}"
    )
    return meta


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0], prog="python -m training.text_generation")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return train(parse_args(argv), command=common.command_line("training.text_generation", argv))


if __name__ == "__main__":
    main()
