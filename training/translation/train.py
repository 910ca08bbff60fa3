"""Train an English-to-French Transformer on Tatoeba and write it to the model repository as ONNX.

    python -m training.translation --data-dir ../shared/data/translation      # -> models/translation-en-fr

The command line, the data (``fra-eng.zip``, split by English sentence), the joint BPE tokenizer,
the training loop and the export of the graphs of :mod:`training.translation.model`, each checked
against torch and scored with :mod:`training.translation.decoding`.
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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from training import common
from training.translation.decoding import bleu, greedy, greedy_agreement, onnx_greedy_batched, service_decode
from training.translation.model import BOS_ID, EOS_ID, GRAPHS, PAD_ID, SPECIALS, UNK, UNK_ID, Translator, pad


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


def model_config(cfg: Config, vocab: int) -> dict:
    return {
        "name": cfg.name,
        "task": "translation",
        "default": True,
        "description": "English to French (Tatoeba): Transformer encoder-decoder over a joint BPE vocabulary. "
        "Two graphs: encoder.onnx (src_ids -> memory) and this model's decoder step "
        "(tgt_ids, memory, src_ids -> log_probs of the next token).",
        "platform": "onnx_onnxv1",
        "inputs": [
            # Bounds a v2 request is held to (the graphs' position table, the vocabulary), so a bad
            # one never reaches (and fails) a shared batch.
            {
                "name": "tgt_ids",
                "datatype": "INT64",
                "shape": [-1, -1],
                "max_shape": [-1, cfg.max_tokens + 1],
                "value_range": [0, vocab - 1],
            },
            {
                "name": "memory",
                "datatype": "FP32",
                "shape": [-1, -1, cfg.d_model],
                "max_shape": [-1, cfg.max_tokens, -1],
            },
            {
                "name": "src_ids",
                "datatype": "INT64",
                "shape": [-1, -1],
                "max_shape": [-1, cfg.max_tokens],
                "value_range": [0, vocab - 1],
            },
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
            # How it decodes when served (service.tasks.translation.DecodingParameters; each field
            # overridable by NEUROSERVE_DECODE_<FIELD>).
            "decoding": {
                "batching": "step",
                "max_rows": 64,
                "max_tokens": 4096,
                "timeout_ms": 30000,
                "kv_cache": True,
                "threads": 0,
            },
        },
    }


def lr_at(step: int, total: int, cfg: Config) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Validation(NamedTuple):
    """Held-out English sentences, their token ids (cut to ``max_tokens``) and all their references."""

    english: list[str]
    sources: list[list[int]]
    references: list[list[str]]


def validation_set(tokenizer: Tokenizer, held: dict[str, list[str]], max_tokens: int) -> Validation:
    english = list(held)
    sources = [e.ids[:max_tokens] for e in tokenizer.encode_batch(english)]
    return Validation(english, sources, [[normalise_reference(r) for r in held[en]] for en in english])


class Fitted(NamedTuple):
    state: dict[str, torch.Tensor]
    best_epoch: int
    steps: int
    seconds: float


# --- training ------------------------------------------------------------------------------------


def smoke_sized(cfg: Config, pairs: list[tuple[str, str]]) -> tuple[Config, list[tuple[str, str]]]:
    """A few pairs of every length and a tiny model; its weights never go over a real run's."""
    small = dataclasses.replace(
        cfg,
        d_model=64,
        ff=128,
        encoder_layers=1,
        decoder_layers=1,
        eval_sentences=50,
        checkpoint_dir=cfg.output_dir / ".checkpoints" / cfg.name,  # hidden
    )
    return small, pairs[:: max(1, len(pairs) // 3000)]


def tokenizer_for(cfg: Config, train_pairs: list[tuple[str, str]]) -> Tokenizer:
    if cfg.init_from is not None:  # continue from a kept checkpoint: its vocabulary (and its weights)
        return Tokenizer.from_file(str(cfg.init_from / "tokenizer.json"))
    return build_tokenizer([t for p in train_pairs for t in p], cfg.vocab_size)


def training_ids(
    tokenizer: Tokenizer, pairs: list[tuple[str, str]], max_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Source ids and BOS + target ids + EOS of the pairs that fit in ``max_tokens``."""
    src_all = [e.ids for e in tokenizer.encode_batch([p[0] for p in pairs])]
    tgt_all = [e.ids for e in tokenizer.encode_batch([p[1] for p in pairs])]
    keep = [i for i in range(len(src_all)) if len(src_all[i]) <= max_tokens and len(tgt_all[i]) < max_tokens]
    return [src_all[i] for i in keep], [[BOS_ID, *tgt_all[i], EOS_ID] for i in keep]


def new_model(cfg: Config, vocab: int) -> Translator:
    model = Translator(vocab, cfg)
    if cfg.init_from is not None:
        model.load_state_dict(torch.load(cfg.init_from / "model.pt", map_location="cpu", weights_only=False)["state"])
    return model


def optimizer_for(model: Translator, cfg: Config) -> torch.optim.Optimizer:
    """AdamW, with weight decay on the matrices but not on the embedding, biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.dim() > 1 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() > 1 and "embed" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-9,
    )


def train_epoch(model, optimizer, src, tgt, batches, step: int, total: int, cfg: Config, bar_label: str) -> int:
    """One pass over ``batches`` (lists of pair indices); returns the step count after it."""
    model.train()
    device = next(model.parameters()).device
    bar = tqdm(batches, desc=bar_label, unit="batch")
    for batch in bar:
        s = pad([src[i] for i in batch]).to(device)
        t = pad([tgt[i] for i in batch]).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        logits = model(s, t[:, :-1])
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
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
    return step


def probe_bleu(model: Translator, tokenizer: Tokenizer, validation: Validation, count: int, max_tokens: int) -> float:
    """Greedy BLEU (torch, on the CPU) of the first ``count`` validation sentences, to pick the checkpoint."""
    device = next(model.parameters()).device
    hyps = tokenizer.decode_batch(greedy(model.cpu(), validation.sources[:count], max_tokens))
    model.to(device)
    return bleu(hyps, validation.references[:count])


def fit(model, cfg: Config, tokenizer, src, tgt, validation: Validation, epochs: int) -> Fitted:
    """Train for ``epochs``, keeping the weights of the epoch with the best validation BLEU."""
    optimizer = optimizer_for(model, cfg)
    rng = random.Random(cfg.seed)
    lengths = [len(t) for t in tgt]
    total = len(common.token_batches(lengths, cfg.batch_tokens, random.Random(0))) * epochs
    count = min(cfg.eval_sentences, len(validation.english))
    best, best_state, best_epoch, step = -1.0, None, 0, 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        batches = common.token_batches(lengths, cfg.batch_tokens, rng)
        step = train_epoch(model, optimizer, src, tgt, batches, step, total, cfg, f"epoch {epoch}/{epochs}")
        score = probe_bleu(model, tokenizer, validation, count, cfg.max_tokens)
        tqdm.write(f"epoch {epoch}: BLEU {score:.2f} on {count} validation sentences (greedy)")
        if score > best:
            best, best_epoch, best_state = score, epoch, common.snapshot(model)
    return Fitted(best_state, best_epoch, step, time.perf_counter() - started)


def save_checkpoint(cfg: Config, state: dict, vocab: int, tokenizer: Tokenizer) -> None:
    """The torch weights and the tokenizer, so that other graphs can be exported later without retraining."""
    cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state": state, "vocab": vocab, "config": dataclasses.asdict(cfg)}, cfg.checkpoint_dir / "model.pt")
    tokenizer.save(str(cfg.checkpoint_dir / "tokenizer.json"))


def train(cfg: Config, command: str = "") -> dict:
    common.seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = common.pick_device(cfg.device)
    pairs = read_pairs(cfg.data_dir)
    n_validation, epochs = cfg.validation_sentences, cfg.epochs
    if cfg.smoke:
        (cfg, pairs), n_validation, epochs = smoke_sized(cfg, pairs), 100, 1
    train_pairs, held = split_by_english(pairs, n_validation, cfg.seed)
    tokenizer = tokenizer_for(cfg, train_pairs)
    vocab = tokenizer.get_vocab_size()
    src, tgt = training_ids(tokenizer, train_pairs, cfg.max_tokens)
    validation = validation_set(tokenizer, held, cfg.max_tokens)
    tqdm.write(
        f"{len(src)} training pairs ({len(train_pairs) - len(src)} longer than {cfg.max_tokens} tokens "
        f"dropped), {len(validation.english)} validation sentences, vocabulary {vocab}"
    )
    model = new_model(cfg, vocab).to(device)
    fitted = fit(model, cfg, tokenizer, src, tgt, validation, epochs)
    model = model.cpu()
    model.load_state_dict(fitted.state)
    model.eval()
    save_checkpoint(cfg, fitted.state, vocab, tokenizer)
    facts = {
        "train_pairs": len(src),
        "best_epoch": fitted.best_epoch,
        "seconds": round(fitted.seconds, 1),
        "device": str(device),
        "steps": fitted.steps,
    }
    return export(cfg, model, tokenizer, validation, command, facts)


# --- export --------------------------------------------------------------------------------------


def export_graphs(model: Translator, src: torch.Tensor, version_dir: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Each graph of :data:`GRAPHS` exported beside the others and parity-checked at batch > 1:
    their paths and the largest difference from torch, by name."""
    paths, parity = {}, {}
    for name, graph_type in GRAPHS.items():
        graph = graph_type(model)
        inputs = graph.example(src)
        paths[name] = version_dir / graph.file
        common.export_onnx(
            graph, tuple(inputs.values()), paths[name], list(inputs), list(graph.outputs), dynamic_axes=graph.axes
        )
        parity[name] = common.check_parity(graph, paths[name], inputs)
    return paths, parity


def export(cfg: Config, model: Translator, tokenizer: Tokenizer, validation: Validation, command: str, facts: dict):
    version_dir = cfg.output_dir / cfg.name / str(cfg.version)
    paths, parity = export_graphs(model, pad(validation.sources[:3]), version_dir)
    agree = greedy_agreement(model, paths, validation.sources[:32], cfg.max_tokens)
    tokenizer.save(str(version_dir / "tokenizer.json"))
    # Written before the beam search: the service's decoder reads the model folder.
    common.write_model_json(cfg.output_dir / cfg.name, model_config(cfg, tokenizer.get_vocab_size()))
    metrics = bleu_metrics(cfg, tokenizer, paths, validation, version_dir)
    metrics.update(
        {
            "onnx_vs_torch_max_abs_diff": parity,
            "greedy_tokens_equal_torch_onnx": agree,
            "validation_decode_seconds": metrics.pop("validation_decode_seconds"),
            "examples": metrics.pop("examples"),
        }
    )
    dataset = {
        "name": "Tatoeba English-French pairs (manythings.org/anki fra-eng.zip, 2017 export)",
        "source": "../shared/data/translation/fra-eng.zip (see its SOURCE.md)",
        "split": f"validation: {len(validation.english)} English sentences drawn with seed {cfg.seed}, with all "
        "their translations; every pair of those sentences is left out of training",
        "train_pairs": facts["train_pairs"],
    }
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
    score = metrics["validation_bleu"]
    print(f"wrote {paths['decoder']} and {paths['encoder']}: validation BLEU {score:.2f} (onnxruntime, greedy)")
    return meta


def bleu_metrics(
    cfg: Config, tokenizer: Tokenizer, paths: dict[str, Path], validation: Validation, version_dir: Path
) -> dict:
    """Validation BLEU of the exported graphs: greedy (full-prefix pair) and beam 4 (the service's decoder)."""
    started = time.perf_counter()
    ids = onnx_greedy_batched(paths["encoder"], paths["decoder"], validation.sources, cfg.max_tokens)
    hyps = tokenizer.decode_batch(ids)
    decode_seconds = time.perf_counter() - started
    beam = service_decode(tokenizer, version_dir, validation.sources, beam_size=4, max_new_tokens=cfg.max_tokens)
    return {
        "measured_on": "exported ONNX graphs in onnxruntime (CPU), greedy decoding",
        "validation_bleu": round(bleu(hyps, validation.references), 2),
        "validation_bleu_beam4": round(bleu(beam, validation.references), 2),
        "beam4_measured_on": "the service's own decoder (service/tasks/translation.py) with the key/value-cache "
        "graphs, beam size 4, length-normalised scores",
        "bleu_signature": "sacrebleu corpus_bleu, 13a tokenisation, all references of each sentence",
        "validation_sentences": len(validation.english),
        "validation_references": sum(len(r) for r in validation.references),
        "validation_decode_seconds": round(decode_seconds, 1),
        "examples": [{"en": en, "fr": fr} for en, fr in zip(validation.english[:8], hyps[:8], strict=True)],
    }


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
    _, held = split_by_english(read_pairs(trained.data_dir), trained.validation_sentences, trained.seed)
    validation = validation_set(tokenizer, held, trained.max_tokens)
    previous = cfg.output_dir / cfg.name / str(cfg.version) / "metadata.json"
    facts: dict = {}
    training_command = command
    if previous.is_file():
        old = json.loads(previous.read_text())["training"]
        training_command = old.get("command", command)
        keep = ("train_pairs", "best_epoch", "seconds", "device", "steps")
        facts = {k: old[k] for k in keep if k in old}
    facts["exported_by"] = command
    return export(trained, model, tokenizer, validation, training_command, facts)


def parse_args(argv: list[str] | None = None) -> Config:
    return common.parse_config(Config, argv, __doc__.split("\n\n")[0], prog="python -m training.translation")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    command = common.command_line("training.translation", argv)
    return export_only(cfg, command) if cfg.export_only else train(cfg, command=command)
