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
The same model is also exported as a key/value-cache pair (``encoder_kv``, ``decoder_cached``). All
are parity-checked against torch, and greedy decoding with each pair against torch greedy decoding
on real validation sentences.

- :mod:`training.translation.model`: the Transformer and its exported graphs;
- :mod:`training.translation.decoding`: greedy decoding (torch, each pair of graphs), BLEU, and beam
  search with the service's own decoder;
- :mod:`training.translation.train`: the command line, data, tokenizer, training loop and export.
"""

from training.translation.decoding import bleu, greedy, onnx_cached_greedy, onnx_greedy, onnx_greedy_batched
from training.translation.model import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Translator, pad
from training.translation.train import (
    Config,
    build_tokenizer,
    export_only,
    main,
    model_config,
    normalise_reference,
    parse_args,
    read_pairs,
    split_by_english,
    train,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "UNK_ID",
    "Config",
    "Translator",
    "bleu",
    "build_tokenizer",
    "export_only",
    "greedy",
    "main",
    "model_config",
    "normalise_reference",
    "onnx_cached_greedy",
    "onnx_greedy",
    "onnx_greedy_batched",
    "pad",
    "parse_args",
    "read_pairs",
    "split_by_english",
    "train",
]
