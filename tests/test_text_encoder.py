"""Our BERT and tokenizer are Hugging Face's (the reference, a dev dependency): same ids on every RefCOCO
val/test sentence, same hidden states and gradients on the real MiniLM-L6 weights, same parameter names;
BERT folders in their usual forms load, and bad ones are one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED
from safetensors.torch import load_file

from lgformer.errors import LGFormerError
from lgformer.model import text_encoder as te
from lgformer.text import tokenizer as tk

SENTENCES = SHARED / "data" / "refer-sentences"


def _reference_bert(folder: Path):
    from transformers import BertModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    return BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()


def _sentences() -> list[str]:
    files = sorted(SENTENCES.glob("*.csv"))
    assert files, f"refer-sentences not found at {SENTENCES}"
    return [row["sent"] for f in files for row in csv.DictReader(f.open(encoding="utf-8"))]


@pytest.fixture
def vocab_only(tmp_path: Path) -> Path:
    """MiniLM's tokenizer as an older BERT folder has it: vocab.txt and tokenizer_config.json only."""
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(tk.minilm_path() / name, tmp_path / name)
    return tmp_path


def test_tokenizer_matches_transformers_on_every_refer_sentence(vocab_only: Path) -> None:
    from transformers import AutoTokenizer

    sentences = _sentences()
    assert len(sentences) > 60000
    expected = AutoTokenizer.from_pretrained(str(tk.minilm_path()))(sentences, truncation=False)["input_ids"]
    assert tk.Tokenizer(tk.MINILM).encode(sentences) == expected  # from tokenizer.json
    assert tk.Tokenizer(str(vocab_only)).encode(sentences) == expected  # from vocab.txt
    ids, mask = tk.Tokenizer(tk.MINILM, max_tokens=20)(["a " * 30 + "dog", "dog"])
    assert ids[0].tolist() == [101] + [1037] * 19 and mask[0].all()  # sliced: the [SEP] is lost
    assert ids[1, :3].tolist() == [101, 3899, 102] and mask[1].tolist() == [1] * 3 + [0] * 17


def test_bert_is_transformers_bert_on_minilm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Products through F.linear: the same bits as `BertModel` in eval and the same gradients; through
    oneDNN (the default on x86 CPUs) the same up to summation order."""
    ours = te.TextEncoder.build(tk.MINILM).eval()
    reference = _reference_bert(tk.minilm_path())
    assert ours.dim == 384
    assert {k: v.shape for k, v in ours.bert.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    ids, mask = tk.Tokenizer(tk.MINILM)(["the man on the left holding a phone", "zebra"])
    expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours(ids, mask), expected, atol=2e-4, rtol=1e-4)

    def plain(x, weight, bias=None, activation=None):
        y = F.linear(x, weight, bias)
        return y if activation is None else F.gelu(y)

    monkeypatch.setattr(te, "linear", plain)
    out = ours(ids, mask)
    assert torch.equal(out, expected)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for (name, p), q in zip(ours.bert.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_random_bert_base_has_bert_base_names_and_init() -> None:
    from transformers import BertConfig, BertModel

    ours = te.TextEncoder.build(tk.BERT_BASE, pretrained=False).bert
    reference = BertModel(BertConfig(), add_pooling_layer=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    w = ours.encoder["layer"][0].attention["self"]["query"].weight
    assert 0.018 < w.std().item() < 0.022 and ours.embeddings["word_embeddings"].weight[0].abs().max() == 0


def test_bert_folder_forms_load(tmp_path: Path, vocab_only: Path) -> None:
    """A pytorch_model.bin as the hub's bert-base-uncased stores it ("bert." prefix, LayerNorm gamma/beta,
    pooler and pre-training heads) gives the same encoder as MiniLM's safetensors."""
    state = load_file(tk.minilm_path() / "model.safetensors")
    legacy = {
        "bert."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in state.items()
    }
    legacy["cls.predictions.bias"] = torch.zeros(3)
    torch.save(legacy, vocab_only / "pytorch_model.bin")
    shutil.copy(tk.minilm_path() / "config.json", vocab_only / "config.json")
    ours = te.TextEncoder.build(str(vocab_only))
    expected = te.TextEncoder.build(tk.MINILM)
    for (name, p), q in zip(ours.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(p, q), name


def _one_line(info: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_bert_folders_are_one_line_errors(tmp_path: Path, vocab_only: Path) -> None:
    with pytest.raises(LGFormerError) as info:
        te.TextEncoder.build(str(vocab_only))
    assert "no config.json" in _one_line(info) and str(vocab_only) in str(info.value)
    config = json.loads((tk.minilm_path() / "config.json").read_text())
    (vocab_only / "config.json").write_text(json.dumps(config))
    with pytest.raises(LGFormerError) as info:
        te.TextEncoder.build(str(vocab_only))
    assert "no model.safetensors or pytorch_model.bin" in _one_line(info)
    (vocab_only / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(LGFormerError) as info:
        te.TextEncoder.build(str(vocab_only), pretrained=False)
    assert "hidden_act is 'relu'" in _one_line(info) and "config.json" in str(info.value)
    (vocab_only / "config.json").write_text(json.dumps(config))
    torch.save({"encoder.layer.0.output.dense.weight": torch.zeros(1)}, vocab_only / "pytorch_model.bin")
    with pytest.raises(LGFormerError) as info:
        te.TextEncoder.build(str(vocab_only))
    assert "no BERT tensor 'embeddings." in _one_line(info)
    torch.save({"x": Path("evil")}, vocab_only / "pytorch_model.bin")  # a pickle naming a class
    with pytest.raises(LGFormerError) as info:
        te.TextEncoder.build(str(vocab_only))
    assert "pytorch_model.bin" in _one_line(info)
    with pytest.raises(LGFormerError) as info:
        tk.Tokenizer(str(tmp_path / "nothing"))
    assert "not found or incomplete" in _one_line(info)


def test_hub_ids_come_from_the_cache_and_offline_misses_are_one_line_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id is looked up in the Hugging Face cache first; `bert-base-uncased` found there is used for
    both the weights and the tokenizer; a hub id neither cached nor reachable is a one-line error."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tk._load_tokenizer.cache_clear()
    monkeypatch.setattr(tk, "_load_tokenizer", tk._load_tokenizer.__wrapped__)  # no cached tokenizers
    with pytest.raises(LGFormerError) as info:
        te.TextEncoder.build("someone/bert-uncased-small")
    message = _one_line(info)
    assert "'someone/bert-uncased-small' is not a local folder and could not be fetched" in message
    assert "config.json not cached and the hub not reachable" in message
    with pytest.raises(LGFormerError):
        te.TextEncoder.build(tk.BERT_BASE)
    assert te.TextEncoder.build(tk.BERT_BASE, pretrained=False).dim == 768  # offline: bert-base's config
    snapshot = tmp_path / "models--bert-base-uncased" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--bert-base-uncased" / "refs").mkdir()
    (tmp_path / "models--bert-base-uncased" / "refs" / "main").write_text("0123abc")
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(tk.minilm_path() / name, snapshot / name)  # MiniLM standing in for bert-base-uncased
    cached = te.TextEncoder.build(tk.BERT_BASE)
    assert cached.dim == 384
    assert tk.Tokenizer(tk.BERT_BASE).encode(["the dog"]) == [[101, 1996, 3899, 102]]
