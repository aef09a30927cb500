"""Text encoder (Fig. 3, "Linguistic backbone"): BERT, self-contained.

The network is BERT without pooler (docs/architecture.md#text-encoder: post-LN, exact GELU, padding masked,
token types 0, positions 0..T-1), written here with Hugging Face `BertModel`'s module and parameter names,
so that its state dict, BERT folders (`config.json` + `model.safetensors` or `pytorch_model.bin`, read
without running pickle code, found by `lgformer.text.tokenizer.find_file`) and the authors' checkpoints
load as they are; `transformers` is not imported. The encoder returns the last hidden state (B, T, D).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lgformer.errors import LGFormerError
from lgformer.model import fast
from lgformer.model.layers import LayerNorm, linear
from lgformer.safe_load import load_safetensors_file, load_torch_file
from lgformer.text.tokenizer import BERT_BASE, WEIGHT_FILES, find_file, missing_message


@dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT `config.json` this network reads; the defaults are bert-base-uncased's."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02

    @classmethod
    def load(cls, path: Path) -> BertConfig:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LGFormerError(f"{path}: not a readable JSON config ({type(exc).__name__})") from None
        for key, expected in (
            ("model_type", "bert"),
            ("hidden_act", "gelu"),
            ("position_embedding_type", "absolute"),
        ):
            if data.get(key, expected) != expected:
                raise LGFormerError(
                    f"{path}: {key} is {data[key]!r}; the text encoder is BERT, expected {expected!r}"
                )
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


class BertLayer(nn.Module):
    """Post-LN transformer layer: x -> LN(x + SelfAttn(x)) -> LN(· + FFN(·)), exact GELU."""

    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        d, eps = c.hidden_size, c.layer_norm_eps
        self.heads = c.num_attention_heads
        self.dropout, self.attn_dropout = c.hidden_dropout_prob, c.attention_probs_dropout_prob
        # containers named as Hugging Face's, so that state dicts match key for key; the products run
        # through `layers.linear` (oneDNN on x86 CPUs, the GELU fused in inference)
        self.attention = nn.ModuleDict(
            {
                "self": nn.ModuleDict(
                    {"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}
                ),
                "output": nn.ModuleDict({"dense": nn.Linear(d, d), "LayerNorm": LayerNorm(d, eps=eps)}),
            }
        )
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(d, c.intermediate_size)})
        self.output = nn.ModuleDict(
            {"dense": nn.Linear(c.intermediate_size, d), "LayerNorm": LayerNorm(d, eps=eps)}
        )

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, T, D), keep (B, 1, 1, T) bool, True on real tokens -> (B, T, D)."""
        b, t, d = x.shape
        attn, out = self.attention["self"], self.attention["output"]
        q, k, v = (
            _dense(attn[n], x).view(b, t, self.heads, -1).transpose(1, 2) for n in ("query", "key", "value")
        )
        p = self.attn_dropout if self.training else 0.0
        ctx = (
            F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
            .transpose(1, 2)
            .reshape(b, t, d)
        )
        x = out["LayerNorm"](F.dropout(_dense(out["dense"], ctx), self.dropout, self.training) + x)
        h = _dense(self.intermediate["dense"], x, "gelu")
        y = F.dropout(_dense(self.output["dense"], h), self.dropout, self.training)
        return self.output["LayerNorm"](y + x)


def _dense(m: nn.Linear, x: Tensor, activation: str | None = None) -> Tensor:
    """`m(x)` then `activation`: through `linear` (oneDNN on CPU), or plainly with `bert-onednn` off."""
    if fast.enabled("bert-onednn"):
        return linear(x, m.weight, m.bias, activation)
    with fast.disabled("onednn", "bf16-onednn"):  # `linear`'s own plain form: F.linear, then the activation
        return linear(x, m.weight, m.bias, activation)


class Bert(nn.Module):
    """BERT without pooler, with Hugging Face `BertModel`'s parameter names.

    forward(ids (B, T), mask (B, T)) -> last hidden state (B, T, D); token types 0, positions 0..T-1."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        c, d = config, config.hidden_size
        self.config = c
        self.embeddings = nn.ModuleDict(
            {
                "word_embeddings": nn.Embedding(c.vocab_size, d, padding_idx=c.pad_token_id),
                "position_embeddings": nn.Embedding(c.max_position_embeddings, d),
                "token_type_embeddings": nn.Embedding(c.type_vocab_size, d),
                "LayerNorm": LayerNorm(d, eps=c.layer_norm_eps),
            }
        )
        self.encoder = nn.ModuleDict(
            {"layer": nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))}
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, the padding row zero."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.initializer_range)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embeddings["word_embeddings"].weight[self.config.pad_token_id].zero_()

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        e = self.embeddings
        t = ids.shape[1]
        # as BertModel: (words + token type 0) + positions, then LN and dropout
        x = e["word_embeddings"](ids) + e["token_type_embeddings"].weight[0]
        x = e["LayerNorm"](x + e["position_embeddings"].weight[:t])
        x = F.dropout(x, self.config.hidden_dropout_prob, self.training)
        keep = mask[:, None, None, :].bool()
        for layer in self.encoder["layer"]:
            x = layer(x, keep)
        return x


def load_bert_weights(path: Path) -> dict[str, Tensor]:
    """The encoder's tensors of a BERT weight file, keyed as `Bert`'s state dict: a "bert." prefix removed,
    legacy LayerNorm gamma/beta renamed, pooler and pre-training heads dropped."""
    if path.suffix == ".safetensors":
        raw = load_safetensors_file(path, "BERT weights")
    else:
        raw = load_torch_file(path, "BERT weights")
        if not isinstance(raw, dict):
            raise LGFormerError(f"{path}: expected a state dict of tensors, found {type(raw).__name__}")
    state = {}
    for key, value in raw.items():
        key = key.removeprefix("bert.")
        if key.startswith(("embeddings.", "encoder.")) and not key.endswith("position_ids"):
            key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias"
            )
            state[key] = value
    return state


class TextEncoder(nn.Module):
    """BERT without pooler. forward(ids (B,T), mask (B,T)) -> last hidden state (B, T, D)."""

    def __init__(self, bert: Bert) -> None:
        super().__init__()
        self.bert = bert
        self.dim: int = bert.config.hidden_size

    @classmethod
    def build(cls, name: str, pretrained: bool = True, dropout: float | None = None) -> TextEncoder:
        """Load `name` (folder, hub id or 'minilm'); with `pretrained=False` only its config is used
        (random weights), falling back to bert-base's config for `bert-base-uncased` when offline.
        `dropout` replaces the config's hidden and attention-probability dropout rates."""
        random_base = name == BERT_BASE and not pretrained  # a cached config, else `BertConfig`'s defaults
        config_file = find_file(name, ("config.json",), download=not random_base)
        if config_file is None and not random_base:
            raise LGFormerError(missing_message(name, "no config.json"))
        config = BertConfig.load(config_file) if config_file else BertConfig()
        if dropout is not None:
            config = replace(config, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        bert = Bert(config)
        if pretrained:
            weights = find_file(name, WEIGHT_FILES)
            if weights is None:
                raise LGFormerError(missing_message(name, f"no {' or '.join(WEIGHT_FILES)}"))
            state = load_bert_weights(weights)
            missing = sorted(set(bert.state_dict()) - set(state))
            if missing:
                raise LGFormerError(f"{weights}: no BERT tensor {missing[0]!r} ({len(missing)} missing)")
            try:
                bert.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                raise LGFormerError(f"{weights}: {str(exc).splitlines()[-1].strip()}") from None
        return cls(bert)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bert(ids, mask)
