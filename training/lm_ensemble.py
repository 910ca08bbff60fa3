"""Score language-model checkpoints of one tokenizer alone and as mixtures (the mean of their
next-token probabilities), on the validation and test sentences of their split.

    python -m training.lm_ensemble --data-dir ../shared/data/translation --output /tmp/mix.json RUN_DIR ...

Each folder is a ``python -m training.text_generation --checkpoint`` folder; the held-out sentences
are those of the split the checkpoints were trained with (they must agree). Every subset of the
folders is scored; subsets are ranked by validation bits per character (the test figure is reported
beside it, not used to choose). The mixture's log-probability of a token is
``logsumexp_i(log p_i) - log k``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from training import common
from training.text_generation import (
    Config,
    LanguageModel,
    encode,
    read_checkpoint,
    read_sentences,
    smoke_sized,
    split_sentences,
    token_log_probs,
    trained_config,
)

# The settings that decide the held-out sentences: every member must have trained with the same.
SPLIT_FIELDS = ("split_seed", "validation_fraction", "test_fraction", "smoke")


def architecture(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Embedding width, LSTM width and depth, read from the weights."""
    layers = sum(1 for k in state if k.startswith("lstm.weight_hh_l"))
    return {
        "embed_dim": state["embed.weight"].shape[1],
        "hidden": state["lstm.weight_hh_l0"].shape[1],
        "layers": layers,
    }


def load_member(record: dict, device: torch.device) -> LanguageModel:
    state = record["state"]
    cfg = dataclasses.replace(Config(), **architecture(state))
    model = LanguageModel(state["embed.weight"].shape[0], cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def mixture_bits(per_member: list[torch.Tensor]) -> float:
    stacked = torch.stack(per_member)
    nats = -(torch.logsumexp(stacked, dim=0) - math.log(len(per_member))).sum()
    return float(nats) / math.log(2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.lm_ensemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="+")
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    device = common.pick_device(args.device)
    records = {folder.name: read_checkpoint(folder) for folder in args.folders}
    splits_of = {name: tuple(r["config"][k] for k in SPLIT_FIELDS) for name, r in records.items()}
    if len(set(splits_of.values())) != 1:
        raise SystemExit(f"the checkpoints were trained on different splits ({', '.join(SPLIT_FIELDS)}): {splits_of}")
    tokenizers = {(f / "tokenizer.json").read_text() for f in args.folders}
    if len(tokenizers) != 1:
        raise SystemExit("the checkpoints do not share one tokenizer")
    tokenizer = Tokenizer.from_file(str(args.folders[0] / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    cfg = trained_config(Config(), next(iter(records.values()))["config"])
    splits = split_sentences(read_sentences(args.data_dir), cfg.validation_fraction, cfg.test_fraction, cfg.split_seed)
    if cfg.smoke:
        _, splits = smoke_sized(cfg, splits)
    chars = {k: sum(len(t) + 1 for t in splits[k]) for k in ("validation", "test")}
    seqs = {k: encode(tokenizer, splits[k]) for k in ("validation", "test")}
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, record in records.items():
        model = load_member(record, device)
        scores[name] = {k: token_log_probs(model, seqs[k]) for k in seqs}
        del model
    names = sorted(scores)
    subsets = []
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            bpc = {k: mixture_bits([scores[n][k] for n in subset]) / chars[k] for k in seqs}
            subsets.append(
                {"members": list(subset), **{f"{k}_bits_per_character": round(v, 4) for k, v in bpc.items()}}
            )
    subsets.sort(key=lambda s: s["validation_bits_per_character"])
    result = {"characters": chars, "subsets": subsets}
    common.write_json(args.output, result)
    for s in subsets[:10]:
        print(s)
    return result


if __name__ == "__main__":
    main()
