"""The Transformer and the four graphs exported from it.

- ``encoder.onnx`` (:class:`EncoderGraph`): ``src_ids [B, S]`` -> ``memory [B, S, D]`` (padding is id 0,
  masked inside);
- ``model.onnx`` (:class:`DecoderStepGraph`): ``tgt_ids [B, T]`` (BOS + tokens so far, right-padded
  with 0), ``memory``, ``src_ids`` -> ``log_probs [B, V]`` of the token after each row's last real
  token, so that rows of different lengths can share a call;
- ``encoder_kv.onnx`` and ``decoder_cached.onnx`` (:class:`CrossKVGraph`, :class:`CachedStepGraph`):
  the same model as a key/value-cache pair, one token per row and step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from training.translation.train import Config

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3, relied on by the graphs and the service
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values [B, heads, length, head_dim]
Axes = dict[str, dict[int, str]]  # dynamic axes of an exported graph


def pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


class Attention(nn.Module):
    """Multi-head attention written out (no fused kernels): it exports to plain ONNX ops.

    One implementation for every use: over a whole prefix (training, the full-prefix graphs), and for
    one new token over a key/value cache (``past``) and over cross-attention keys and values computed
    once per source (the cached graphs).
    """

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dk = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.dropout = nn.Dropout(dropout)

    def keys_values(self, kv: torch.Tensor, batch: int | None = None) -> KV:
        """``[B, S, D]`` -> keys and values ``[B, heads, S, head_dim]``."""
        b = kv.shape[0] if batch is None else batch
        k = self.k(kv).view(b, -1, self.heads, self.dk).transpose(1, 2)
        v = self.v(kv).view(b, -1, self.heads, self.dk).transpose(1, 2)
        return k, v

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | KV, bias: torch.Tensor, past: KV | None = None
    ) -> tuple[torch.Tensor, KV]:
        """``x [B, T, D]`` attends to ``kv``: states ``[B, S, D]`` projected here, or keys and values
        already projected; with ``past`` (cached keys and values) before them. ``bias`` (0 or -1e9) is
        added to the scores. Returns the output and ``kv``'s keys and values (what a cache appends)."""
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.dk).transpose(1, 2)
        k, v = self.keys_values(kv, b) if isinstance(kv, torch.Tensor) else kv
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))
        scores = q @ keys.transpose(-1, -2) / math.sqrt(self.dk) + bias
        attn = self.dropout(torch.softmax(scores, dim=-1))
        return self.o((attn @ values).transpose(1, 2).reshape(b, t, d)), (k, v)


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

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        memory: torch.Tensor | KV | None = None,
        memory_bias: torch.Tensor | None = None,
        past: KV | None = None,
    ) -> tuple[torch.Tensor, KV]:
        """New states of ``x``'s tokens, and their self-attention keys and values.

        ``memory``: the encoder output, or its cross-attention keys and values (decoder blocks);
        ``past``: cached self-attention keys and values of earlier tokens.
        """
        h = self.norm1(x)
        attended, kv = self.self_attn(h, h, self_bias, past)
        x = x + self.dropout(attended)
        if self.cross:
            x = x + self.dropout(self.cross_attn(self.norm2(x), memory, memory_bias)[0])
        return x + self.dropout(self.ff(self.norm3(x))), kv


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
            x, _ = block(x, bias)
        return self.enc_norm(x)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """Hidden states for every target position [B, T, D] (causal)."""
        t = tgt.shape[1]
        causal = torch.triu(torch.full((t, t), -1e9, device=tgt.device), diagonal=1)
        x, memory_bias = self._embed(tgt), self.padding_bias(src)
        for block in self.decoder:
            x, _ = block(x, causal, memory, memory_bias)
        return self.dec_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embed.weight.t()

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.logits(self.decode(tgt_in, self.encode(src), src))


# --- exported graphs: each names its file, outputs and dynamic axes, and makes example inputs --------


class EncoderGraph(nn.Module):
    file, outputs = "encoder.onnx", ("memory",)
    axes: ClassVar[Axes] = {"src_ids": {0: "batch", 1: "source"}, "memory": {0: "batch", 1: "source"}}

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def example(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"src_ids": src}

    def forward(self, src_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode(src_ids)


class DecoderStepGraph(nn.Module):
    """Log-probabilities of the token after each row's last real token (rows may differ in length)."""

    file, outputs = "model.onnx", ("log_probs",)
    axes: ClassVar[Axes] = {
        "tgt_ids": {0: "batch", 1: "target"},
        "memory": {0: "batch", 1: "source"},
        "src_ids": {0: "batch", 1: "source"},
        "log_probs": {0: "batch"},
    }

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def example(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        tgt = pad([[BOS_ID], [BOS_ID, 5, 6], [BOS_ID, 7]])
        return {"tgt_ids": tgt, "memory": self.model.encode(src).detach(), "src_ids": src}

    def forward(self, tgt_ids: torch.Tensor, memory: torch.Tensor, src_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.decode(tgt_ids, memory, src_ids)  # [B, T, D]
        last = (tgt_ids != PAD_ID).sum(dim=1) - 1  # index of each row's last real token
        index = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[2])
        picked = hidden.gather(1, index).squeeze(1)  # [B, D]
        return torch.log_softmax(self.model.logits(picked), dim=-1)


class CrossKVGraph(nn.Module):
    """Encoder plus every decoder layer's cross-attention keys and values, computed once per source:
    ``src_ids [B, S]`` -> ``mem_k``, ``mem_v`` ``[layers, B, heads, S, head_dim]``."""

    file, outputs = "encoder_kv.onnx", ("mem_k", "mem_v")
    axes: ClassVar[Axes] = {
        "src_ids": {0: "batch", 1: "source"},
        "mem_k": {0: "layers", 1: "batch", 3: "source"},
        "mem_v": {0: "layers", 1: "batch", 3: "source"},
    }

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def example(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"src_ids": src}

    def forward(self, src_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        memory = self.model.encode(src_ids)
        keys, values = zip(*(block.cross_attn.keys_values(memory) for block in self.model.decoder), strict=True)
        return torch.stack(keys), torch.stack(values)


class CachedStepGraph(nn.Module):
    """One decoder step from each row's last token and a key/value cache of its earlier tokens.

    ``token [B, 1]``, ``position [B]`` (index of that token), ``past_k``/``past_v``
    ``[layers, B, heads, T, head_dim]`` right-padded, ``past_mask [B, T]`` (1 = cached token),
    ``mem_k``/``mem_v`` from :class:`CrossKVGraph`, ``src_ids [B, S]`` -> ``log_probs [B, V]`` and the
    token's own keys and values ``new_k``/``new_v`` ``[layers, B, heads, 1, head_dim]`` to append.
    """

    file, outputs = "decoder_cached.onnx", ("log_probs", "new_k", "new_v")
    axes: ClassVar[Axes] = {
        "token": {0: "batch"},
        "position": {0: "batch"},
        "past_k": {1: "batch", 3: "past"},
        "past_v": {1: "batch", 3: "past"},
        "past_mask": {0: "batch", 1: "past"},
        "mem_k": {1: "batch", 3: "source"},
        "mem_v": {1: "batch", 3: "source"},
        "src_ids": {0: "batch", 1: "source"},
        "log_probs": {0: "batch"},
        "new_k": {1: "batch"},
        "new_v": {1: "batch"},
    }

    def __init__(self, model: Translator) -> None:
        super().__init__()
        self.model = model

    def example(self, src: torch.Tensor, past: int = 4) -> dict[str, torch.Tensor]:
        """Inputs for ``src`` with ``past`` cached (random) tokens, one row with a shorter cache."""
        m, b = self.model, src.shape[0]
        layers, heads, dk = len(m.decoder), m.decoder[0].self_attn.heads, m.decoder[0].self_attn.dk
        mem_k, mem_v = CrossKVGraph(m)(src)
        past_mask = torch.ones(b, past, dtype=torch.long)
        if past > 1:
            past_mask[0, -1] = 0
        return {
            "token": torch.randint(4, m.embed.num_embeddings, (b, 1)),
            "position": past_mask.sum(1),
            "past_k": torch.randn(layers, b, heads, past, dk),
            "past_v": torch.randn(layers, b, heads, past, dk),
            "past_mask": past_mask,
            "mem_k": mem_k.detach(),
            "mem_v": mem_v.detach(),
            "src_ids": src,
        }

    def forward(self, token, position, past_k, past_v, past_mask, mem_k, mem_v, src_ids):
        m = self.model
        x = m.embed(token) * m.scale + m.positions[position].unsqueeze(1)  # [B, 1, D]
        # Attend to the cached tokens and to itself; padding of the cache is masked out.
        self_bias = torch.cat([(past_mask == 0).float() * -1e9, torch.zeros(x.shape[0], 1)], dim=1)[:, None, None, :]
        memory_bias = m.padding_bias(src_ids)
        new_k, new_v = [], []
        for i, block in enumerate(m.decoder):
            x, (k, v) = block(x, self_bias, (mem_k[i], mem_v[i]), memory_bias, past=(past_k[i], past_v[i]))
            new_k.append(k)
            new_v.append(v)
        log_probs = torch.log_softmax(m.logits(m.dec_norm(x)[:, 0]), dim=-1)
        return log_probs, torch.stack(new_k), torch.stack(new_v)


GRAPHS = {
    "encoder": EncoderGraph,
    "decoder": DecoderStepGraph,
    "encoder_kv": CrossKVGraph,
    "decoder_cached": CachedStepGraph,
}
