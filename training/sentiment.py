"""Train a sentiment classifier from scratch and write it to the model repository as ONNX.

    python -m training.sentiment --lang en --data-dir ../shared/data/sentiment   # SST-2 -> models/sentiment
    python -m training.sentiment --lang zh --data-dir ../shared/data/sentiment   # ChnSentiCorp -> models/sentiment-zh

The network is a Kim-style text CNN: embeddings, 1-D convolutions of several widths, max pooling
over time that ignores padding (an attention mask comes in with the ids), dropout, a dense layer,
softmax. Tokenisation is a WordPiece vocabulary trained here with Hugging Face ``tokenizers`` and
saved as ``tokenizer.json`` beside the model; its normaliser maps everyday English ("don't", curly
apostrophes) onto SST-2's treebank tokenisation ("do n't"), and splits Chinese into characters.
English trains on SST-2 ``train.tsv`` and picks the checkpoint on ``dev.tsv``; Chinese makes a seeded,
stratified 80/10/10 split of ChnSentiCorp and reports the held-out 10 %.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import random
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from torch import nn
from tqdm import tqdm

from training import common

LABELS = ["negative", "positive"]
PAD, UNK = "[PAD]", "[UNK]"


def odd(text: str) -> int:
    if int(text) % 2 == 0:
        raise argparse.ArgumentTypeError("widths must be odd (symmetric padding keeps the sequence length)")
    return int(text)


@dataclasses.dataclass
class Config:
    lang: Literal["en", "zh"] = field(default="en", metadata={"help": "en: SST-2, zh: ChnSentiCorp"})
    data_dir: Path = field(
        default=Path("../shared/data/sentiment"), metadata={"help": "folder holding sst2/ and chnsenticorp/"}
    )
    output_dir: Path = field(default=Path("models"), metadata={"help": "model repository root"})
    name: str = field(default="", metadata={"help": "model name (empty: sentiment for en, sentiment-zh for zh)"})
    version: int = 1
    vocab_size: int = 16000
    max_len: int = field(default=256, metadata={"help": "longest token sequence the model takes"})
    embed_dim: int = 128
    channels: int = field(default=128, metadata={"help": "filters per convolution width"})
    widths: tuple[int, ...] = field(default=(1, 3, 5), metadata={"help": "odd convolution widths", "type": odd})
    dropout: float = 0.5
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 1
    device: str = "auto"
    smoke: bool = field(default=False, metadata={"help": "600 examples, one epoch: checks the pipeline"})


def read_sst2(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}: expected a 'sentence<TAB>label' header, got {header}")
        for number, line in enumerate(fh, start=2):
            sentence, _, label = line.rstrip("\n").rpartition("\t")
            if label not in ("0", "1"):
                raise ValueError(f"{path}:{number}: label must be 0 or 1, got {label!r}")
            texts.append(sentence.strip())
            labels.append(int(label))
    return texts, labels


def read_chnsenticorp(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            review = (row.get("review") or "").strip()
            if review:  # one row is empty
                texts.append(review)
                labels.append(int(row["label"]))
    return texts, labels


def stratified_split(labels: list[int], seed: int, fractions=(0.8, 0.1, 0.1)) -> tuple[list[int], ...]:
    rng = random.Random(seed)
    parts: tuple[list[int], ...] = ([], [], [])
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(idx)
        a = round(len(idx) * fractions[0])
        b = a + round(len(idx) * fractions[1])
        parts[0].extend(idx[:a])
        parts[1].extend(idx[a:b])
        parts[2].extend(idx[b:])
    return tuple(sorted(p) for p in parts)


def build_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=50))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace("’", "'"),
            normalizers.Replace("‘", "'"),
            # SST-2 is treebank-tokenised ("do n't", "ca n't"): make "don't" look the same.
            normalizers.Replace("n't", " n't"),
            normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, UNK], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [enc.ids[:max_len] or [tokenizer.token_to_id(UNK)] for enc in tokenizer.encode_batch(texts)]


class TextCNN(nn.Module):
    def __init__(self, vocab_size: int, cfg: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, cfg.embed_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.embed_dim, cfg.channels, w, padding=w // 2) for w in cfg.widths)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.channels * len(cfg.widths), len(LABELS))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embed(input_ids)).transpose(1, 2)  # [B, D, L]
        padding = (attention_mask == 0).unsqueeze(1)  # [B, 1, L]
        pooled = []
        for conv in self.convs:
            h = F.relu(conv(x)).masked_fill(padding, -1e4)  # padding never wins the max
            pooled.append(h.max(dim=2).values)
        return self.fc(self.dropout(torch.cat(pooled, dim=1)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(input_ids, attention_mask), dim=1)


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, (ids != 0).long()


def accuracy(model: TextCNN, seqs: list[list[int]], labels: list[int], device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(seqs), 256):
            ids, mask = pad_batch(seqs[i : i + 256])
            pred = model.logits(ids.to(device), mask.to(device)).argmax(1).cpu()
            correct += int((pred == torch.tensor(labels[i : i + 256])).sum())
    return correct / len(seqs)


def onnx_accuracy(path: Path, seqs: list[list[int]], labels: list[int]) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    correct = 0
    for i in range(0, len(seqs), 256):
        ids, mask = pad_batch(seqs[i : i + 256])
        probs = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        correct += int((probs.argmax(1) == np.array(labels[i : i + 256])).sum())
    return correct / len(seqs)


def load_data(cfg: Config) -> dict[str, tuple[list[str], list[int]]]:
    if cfg.lang == "en":
        folder = cfg.data_dir / "sst2"
        train = read_sst2(folder / "train.tsv")
        dev = read_sst2(folder / "dev.tsv")
        return {"train": train, "dev": dev}
    texts, labels = read_chnsenticorp(cfg.data_dir / "chnsenticorp" / "ChnSentiCorp_htl_all.csv")
    train_idx, dev_idx, test_idx = stratified_split(labels, cfg.seed)
    pick = lambda idx: ([texts[i] for i in idx], [labels[i] for i in idx])  # noqa: E731
    return {"train": pick(train_idx), "dev": pick(dev_idx), "test": pick(test_idx)}


def model_config(cfg: Config, name: str, vocab: int) -> dict:
    buckets = [b for b in (16, 32, 64, 128, 256, 512) if b < cfg.max_len] + [cfg.max_len]
    language = {
        "en": "English (trained on SST-2 movie-review phrases)",
        "zh": "Chinese (trained on ChnSentiCorp hotel reviews)",
    }[cfg.lang]
    return {
        "name": name,
        "task": "sentiment",
        "default": True,
        "description": f"Binary sentiment of {language}: text CNN over a WordPiece vocabulary. "
        "Inputs: token ids and attention mask [batch, length]; output: probabilities of negative, positive.",
        "platform": "onnx_onnxv1",
        "inputs": [
            # Bounds a v2 request is held to, so a bad one never reaches (and fails) a shared batch.
            {
                "name": "input_ids",
                "datatype": "INT64",
                "shape": [-1, -1],
                "max_shape": [-1, cfg.max_len],
                "value_range": [0, vocab - 1],
            },
            {
                "name": "attention_mask",
                "datatype": "INT64",
                "shape": [-1, -1],
                "max_shape": [-1, cfg.max_len],
                "value_range": [0, 1],
            },
        ],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]}],
        "max_batch_size": 64,
        "dynamic_batching": {"max_queue_delay_ms": 0.0},
        "labels": LABELS,
        "parameters": {
            "language": cfg.lang,
            "tokenizer": "tokenizer.json",
            "max_length": cfg.max_len,
            # Batches are padded to the smallest bucket that fits: few shapes, little padding.
            "length_buckets": buckets,
        },
    }


def encoded_data(cfg: Config) -> tuple[Tokenizer, dict[str, list[list[int]]], dict[str, list[int]]]:
    """The tokenizer trained on the training texts, and every split's token ids and labels."""
    data = load_data(cfg)
    if cfg.smoke:
        data = {k: (v[0][:600], v[1][:600]) for k, v in data.items()}
    tokenizer = build_tokenizer(data["train"][0], cfg.vocab_size)
    seqs = {k: encode(tokenizer, v[0], cfg.max_len) for k, v in data.items()}
    return tokenizer, seqs, {k: v[1] for k, v in data.items()}


def fit(model: TextCNN, cfg: Config, seqs, labels, epochs: int) -> tuple[dict[str, torch.Tensor], int]:
    """Train, keeping the weights of the epoch with the best dev accuracy; returns them and that epoch."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(seqs["train"]) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=epochs * steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    best_acc, best_state, best_epoch = -1.0, None, 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(seqs["train"]), generator=generator).tolist()
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{epochs}", unit="batch")
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            ids, mask = pad_batch([seqs["train"][i] for i in idx])
            y = torch.tensor([labels["train"][i] for i in idx], device=device)
            loss = F.cross_entropy(model.logits(ids.to(device), mask.to(device)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        acc = accuracy(model, seqs["dev"], labels["dev"], device)
        tqdm.write(f"epoch {epoch}: dev accuracy {acc:.4%}")
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best_state = common.snapshot(model)
    return best_state, best_epoch


def export(model: TextCNN, dev: list[list[int]], onnx_path: Path) -> float:
    """The ONNX graph, parity-checked at batch > 1 with different lengths (so padding and the mask
    are exercised); returns the largest difference from torch."""
    common.export_onnx(
        model,
        pad_batch(dev[:2]),
        onnx_path,
        input_names=["input_ids", "attention_mask"],
        output_names=["probabilities"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "length"},
            "attention_mask": {0: "batch", 1: "length"},
            "probabilities": {0: "batch"},
        },
    )
    lengths = sorted(dev[:64], key=len)
    parity_ids, parity_mask = pad_batch([lengths[0], lengths[len(lengths) // 2], lengths[-1]])
    return common.check_parity(model, onnx_path, {"input_ids": parity_ids, "attention_mask": parity_mask})


def evaluate(cfg: Config, onnx_path: Path, seqs, labels) -> tuple[dict, dict, str]:
    """Accuracy of the exported graph: on SST-2's dev split (en), on the held-out test part (zh). Returns
    the metrics, the dataset's description and a headline."""
    if cfg.lang == "en":
        metrics = {
            "dev_accuracy": round(onnx_accuracy(onnx_path, seqs["dev"], labels["dev"]), 4),
            "dev_examples": len(seqs["dev"]),
        }
        dataset = {
            "name": "SST-2 (GLUE train, split 90/10 as train.tsv/dev.tsv)",
            "source": "../shared/data/sentiment/sst2 (see its SOURCE.md)",
            "train_examples": len(seqs["train"]),
            "dev_examples": len(seqs["dev"]),
            "checkpoint_chosen_on": "dev.tsv",
        }
        return metrics, dataset, f"dev accuracy {metrics['dev_accuracy']:.2%}"
    metrics = {
        "validation_accuracy": round(onnx_accuracy(onnx_path, seqs["dev"], labels["dev"]), 4),
        "test_accuracy": round(onnx_accuracy(onnx_path, seqs["test"], labels["test"]), 4),
        "test_examples": len(seqs["test"]),
    }
    dataset = {
        "name": "ChnSentiCorp_htl_all (hotel reviews)",
        "source": "../shared/data/sentiment/chnsenticorp (see its SOURCE.md)",
        "split": f"stratified 80/10/10 by label, seed {cfg.seed}; checkpoint chosen on the 10 % "
        "validation part, accuracy reported on the held-out 10 % test part",
        "train_examples": len(seqs["train"]),
        "validation_examples": len(seqs["dev"]),
        "test_examples": len(seqs["test"]),
    }
    return metrics, dataset, f"held-out test accuracy {metrics['test_accuracy']:.2%}"


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    device = common.pick_device(cfg.device)
    name = cfg.name or ("sentiment" if cfg.lang == "en" else "sentiment-zh")
    tokenizer, seqs, labels = encoded_data(cfg)
    model = TextCNN(tokenizer.get_vocab_size(), cfg).to(device)
    started = time.perf_counter()
    best_state, best_epoch = fit(model, cfg, seqs, labels, epochs=1 if cfg.smoke else cfg.epochs)
    train_seconds = time.perf_counter() - started
    model = model.cpu()
    model.load_state_dict(best_state)
    model.eval()

    version_dir = cfg.output_dir / name / str(cfg.version)
    onnx_path = version_dir / "model.onnx"
    parity = export(model, seqs["dev"], onnx_path)
    tokenizer.save(str(version_dir / "tokenizer.json"))  # tied to this version's embedding table
    scores, dataset, headline = evaluate(cfg, onnx_path, seqs, labels)
    metrics = {
        "measured_on": "exported ONNX model in onnxruntime (CPU)",
        "onnx_vs_torch_max_abs_diff": parity,
        "best_epoch": best_epoch,
        **scores,
    }
    common.write_model_json(cfg.output_dir / name, model_config(cfg, name, tokenizer.get_vocab_size()))
    meta = common.write_version_metadata(
        version_dir,
        metrics=metrics,
        dataset=dataset,
        command=command,
        training={
            "config": {k: str(v) for k, v in dataclasses.asdict(cfg).items()},
            "device": str(device),
            "seconds": round(train_seconds, 1),
            "vocab_size": tokenizer.get_vocab_size(),
        },
    )
    print(f"wrote {onnx_path}: {headline} (onnxruntime), parity {parity:.2e}")
    return meta


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return train(parse_args(argv), command=common.command_line("training.sentiment", argv))


if __name__ == "__main__":
    main()
