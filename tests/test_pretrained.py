"""utils/pretrained.py against an independent implementation (Hugging Face transformers)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from utils.checkpoint import save_checkpoint
from utils.core.download import AssetUnavailableError
from utils.generation import generate
from utils.model import GPTConfig, GPTModel
from utils.pretrained import (gpt2_stand_in_reason, load_chapter5_model, load_pretrained_gpt2,
                              load_weights_into_gpt)

transformers = pytest.importorskip("transformers")

VOCAB, CTX, EMB, HEADS, LAYERS = 500, 32, 48, 4, 2
OURS = GPTConfig(vocab_size=VOCAB, context_length=CTX, emb_dim=EMB, n_heads=HEADS,
                 n_layers=LAYERS, drop_rate=0.0, qkv_bias=True)


@pytest.fixture(scope="module")
def hf_model():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=EMB, n_head=HEADS,
                                  n_layer=LAYERS, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger random weights than the default init: non-trivial logits
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "ln" in name else 0.15))
    return model


def hub_style(hf_model, tmp_path):
    """Like openai-community/gpt2*: no prefix, with the causal-mask buffers of old exports."""
    params = {k: v.clone().contiguous() for k, v in hf_model.transformer.state_dict().items()}
    mask = torch.tril(torch.ones(CTX, CTX)).view(1, 1, CTX, CTX)
    for i in range(LAYERS):
        params[f"h.{i}.attn.bias"] = mask.clone()
        params[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(params, tmp_path / "hub.safetensors")
    return load_file(tmp_path / "hub.safetensors")


def transformers_style(hf_model, tmp_path):
    """What current `transformers` writes with save_pretrained: `transformer.` prefix."""
    hf_model.save_pretrained(tmp_path / "saved")
    return load_file(tmp_path / "saved" / "model.safetensors")


def with_lm_head(hf_model, tmp_path):
    params = transformers_style(hf_model, tmp_path)
    params["lm_head.weight"] = hf_model.lm_head.weight.detach().clone()
    return params


@pytest.mark.parametrize("make_params", [hub_style, transformers_style, with_lm_head])
def test_logits_and_greedy_generation_match_transformers(hf_model, tmp_path, make_params):
    ours = load_weights_into_gpt(GPTModel(OURS), make_params(hf_model, tmp_path)).eval()
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        expected = hf_model(idx).logits
        torch.testing.assert_close(ours(idx), expected, atol=1e-4, rtol=0)
        assert expected.abs().max() > 1.0  # the comparison is not between near-zero values
    prompt = idx[:1, :5]
    theirs = hf_model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0,
                               attention_mask=torch.ones_like(prompt))
    assert torch.equal(generate(ours, prompt, 15, context_size=CTX), theirs)


def test_wrong_files_are_clear_errors_naming_the_tensor(hf_model, tmp_path):
    params = hub_style(hf_model, tmp_path)
    model = GPTModel(OURS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing: \['h.1.mlp.c_fc.bias'\]"):
        load_weights_into_gpt(model, {k: v for k, v in params.items() if k != "h.1.mlp.c_fc.bias"})
    with pytest.raises(ValueError, match=r"unexpected: \['h.2.ln_1.weight'\]"):
        load_weights_into_gpt(model, {**params, "h.2.ln_1.weight": torch.ones(EMB)})
    with pytest.raises(ValueError, match=r"wpe.weight: file \(32, 48\), model expects \(16, 48\)"):
        load_weights_into_gpt(GPTModel(dataclasses.replace(OURS, context_length=16)), params)
    with pytest.raises(ValueError, match="qkv_bias=True"):
        load_weights_into_gpt(GPTModel(dataclasses.replace(OURS, qkv_bias=False)), params)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_unknown_model_name_suggests_the_right_one():
    with pytest.raises(ValueError, match="Did you mean 'gpt2-medium \\(355M\\)'"):
        load_pretrained_gpt2("gpt2-meduim (355M)")


@pytest.fixture
def no_gpt2_here(monkeypatch, tmp_path, no_network):
    """A machine with no GPT-2 weights in the cache or a mirror, and no internet."""
    monkeypatch.setenv("LLM_COURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LLM_COURSE_MIRROR", "")
    monkeypatch.setenv("LLM_COURSE_CHECKPOINTS", str(tmp_path / "ckpt"))
    for name in ("LLM_COURSE_OFFLINE", "LLM_COURSE_FALLBACK", "LLM_COURSE_MAX_DOWNLOAD_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("utils.core.download.time.sleep", lambda s: None)  # skip retry back-off
    return tmp_path


def test_the_loader_loads_gpt2_or_fails_and_never_substitutes(no_gpt2_here, monkeypatch):
    save_checkpoint(no_gpt2_here / "ckpt" / "05_pretrained_the_verdict.pt", GPTModel(OURS))
    for settings in ({}, {"LLM_COURSE_OFFLINE": "1"}, {"LLM_COURSE_FALLBACK": "1"}):
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(AssetUnavailableError, match="huggingface.co/openai-community/gpt2/"):
            load_pretrained_gpt2("gpt2-small (124M)", progress=False)


def test_the_stand_in_reason_says_when_and_why(no_gpt2_here, monkeypatch):
    assert gpt2_stand_in_reason("gpt2-small (124M)") is None  # online: GPT-2 will download
    monkeypatch.setenv("LLM_COURSE_MAX_DOWNLOAD_MB", "100")
    assert "LLM_COURSE_MAX_DOWNLOAD_MB=100 allows downloads up to 100 MB" in \
        gpt2_stand_in_reason("gpt2-small (124M)")
    monkeypatch.setenv("LLM_COURSE_OFFLINE", "1")
    assert "offline mode is on" in gpt2_stand_in_reason("gpt2-medium (355M)")
    weights = no_gpt2_here / "data" / "gpt2-weights" / "gpt2-small-124M.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"cached")  # on this machine: GPT-2 itself (fetch checks it later)
    assert gpt2_stand_in_reason("gpt2-small (124M)") is None
    monkeypatch.setenv("LLM_COURSE_FALLBACK", "1")  # asked for, even with the weights here
    assert gpt2_stand_in_reason("gpt2-small (124M)") == "the stand-in was asked for"
    with pytest.raises(ValueError, match="Did you mean 'gpt2-small \\(124M\\)'"):
        gpt2_stand_in_reason("gpt2-smal (124M)")


def test_the_stand_in_is_chapter_5s_model_without_dropout(no_gpt2_here):
    with pytest.raises(AssetUnavailableError, match=r"run chapter 5's notebook \(05_pretraining.ipynb\) first"):
        load_chapter5_model()
    torch.manual_seed(0)
    small = GPTModel(dataclasses.replace(OURS, qkv_bias=False, drop_rate=0.1))
    save_checkpoint(no_gpt2_here / "ckpt" / "05_pretrained_the_verdict.pt", small)
    model = load_chapter5_model()
    assert not model.training
    assert model.cfg == dataclasses.replace(small.cfg, drop_rate=0.0)  # finetuning: no dropout
    assert torch.equal(model.out_head.weight, small.out_head.weight)
