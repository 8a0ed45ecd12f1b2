"""utils/llama.py against the reference implementation (Hugging Face transformers), and its
loader on small checkpoints made in exactly the published format, offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from utils.core.assets import ASSETS, Asset
from utils.core.download import AssetUnavailableError, fetch
from utils.fast import KVCache
from utils.generation import generate
from utils.llama import (LLAMA32_1B, LLAMA_TINY, QWEN3_0_6B, QWEN3_TINY, CachedLlama,
                         GroupedQueryAttention, HubTokenizer, LlamaConfig, LlamaModel,
                         RopeScaling, config_from_hf, format_chat, kv_cache_bytes,
                         load_hf_weights_into_llama, load_llama_checkpoint, load_pretrained_llama,
                         rope_frequencies)
from hf_parity import assert_cache_matches_full_pass, assert_same_logits, perturbed

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
transformers.logging.set_verbosity_error()

VOCAB = 320
CONFIGS = {"llama": dataclasses.replace(LLAMA_TINY, vocab_size=VOCAB),
           "qwen3": dataclasses.replace(QWEN3_TINY, vocab_size=VOCAB)}

# The published config.json files, byte for byte (their sha256 is in the download registry).
PUBLISHED_CONFIGS = {
    "qwen3-0.6b-config": """{
  "architectures": [
    "Qwen3ForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 1024,
  "initializer_range": 0.02,
  "intermediate_size": 3072,
  "max_position_embeddings": 40960,
  "max_window_layers": 28,
  "model_type": "qwen3",
  "num_attention_heads": 16,
  "num_hidden_layers": 28,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-06,
  "rope_scaling": null,
  "rope_theta": 1000000,
  "sliding_window": null,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}""",
    "llama-3.2-1b-config": """{
  "architectures": [
    "LlamaForCausalLM"
  ],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": 128001,
  "head_dim": 64,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 8192,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 16,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.45.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
}
""",
}
PRESETS = {"qwen3-0.6b-config": QWEN3_0_6B, "llama-3.2-1b-config": LLAMA32_1B}
SPECIAL_TOKENS = {
    "qwen3": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"],
}
TEXT = ("I had always thought Jack Gisburn rather a cheap genius -- though a good fellow "
        "enough -- so it was no great surprise to me to hear that, in the height of his glory, "
        "he had dropped his painting, married a rich widow, and established himself in a villa "
        "on the Riviera. What is the capital of France? Paris is.") * 3


def hf_config(cfg: LlamaConfig):
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_base, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_context_length}
    settings = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim,
                    intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                    num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_groups,
                    head_dim=cfg.head_dim, max_position_embeddings=cfg.context_length,
                    rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                    rope_parameters=rope, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if cfg.qk_norm:
        return transformers.Qwen3Config(**settings)
    return transformers.LlamaConfig(**settings)


def random_hf_model(cfg: LlamaConfig, seed: int = 0):
    """A transformers model of `cfg` with weights large enough for logits of size 1-10."""
    torch.manual_seed(seed)
    model_class = transformers.Qwen3ForCausalLM if cfg.qk_norm else transformers.LlamaForCausalLM
    return perturbed(model_class(hf_config(cfg)), seed)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(our config, their model, our model with their weights) for a tiny Llama 3 and Qwen3."""
    cfg = CONFIGS[request.param]
    theirs = random_hf_model(cfg)
    ours = load_hf_weights_into_llama(LlamaModel(cfg), theirs.state_dict()).eval()
    return cfg, theirs, ours


def test_config_read_from_transformers_is_ours(pair):
    cfg, theirs, _ = pair
    assert config_from_hf(theirs.config.to_dict()) == cfg


def test_logits_match_transformers(pair):
    cfg, theirs, ours = pair
    assert_same_logits(theirs, ours, VOCAB)


def test_kv_cache_logits_match_the_full_forward_pass(pair):
    cfg, _, ours = pair
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 40))
    cache = KVCache(cfg.n_layers, capacity=64)
    # a prefill, then 3 tokens at once, then one by one
    assert_cache_matches_full_pass(ours, cache, idx, cuts=[17, 20])
    assert cache.length == 40
    assert cache.keys[0].shape == (2, cfg.n_kv_groups, 64, cfg.head_dim)  # G heads, not H


def test_greedy_generation_matches_transformers_with_and_without_cache(pair):
    cfg, theirs, ours = pair
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 6))
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=40, do_sample=False)
    assert torch.equal(generate(ours, prompt, 40, context_size=cfg.context_length), expected)
    cached = CachedLlama(ours, min_capacity=16)  # too small on purpose: it has to grow
    assert torch.equal(generate(cached, prompt, 40, context_size=cfg.context_length), expected)
    assert cached.cache.capacity > 16 and cached.cache.keys[0].shape[1] == cfg.n_kv_groups


def test_cached_llama_starts_over_for_a_new_prompt(pair):
    cfg, _, ours = pair
    cached = CachedLlama(ours)
    torch.manual_seed(4)
    a, b = torch.randint(0, VOCAB, (1, 8)), torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        cached(a)
        torch.testing.assert_close(cached(b), ours(b)[:, -1:], atol=1e-5, rtol=0)


def test_both_ways_of_reading_shared_heads_give_the_reference_logits(pair, monkeypatch):
    import utils.llama
    cfg, theirs, ours = pair
    torch.manual_seed(5)
    idx = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        expected = theirs(idx).logits
        for direct in (True, False):  # enable_gqa, or the repeat_interleave copy
            if direct and not utils.llama.SDPA_ENABLE_GQA:
                continue  # PyTorch before 2.5
            monkeypatch.setattr(utils.llama, "SDPA_ENABLE_GQA", direct)
            cache = KVCache(cfg.n_layers, capacity=64)
            prefill = ours(idx[:, :20], cache, last_only=True)  # (B, 1, V): the head scores one
            steps = [ours(idx[:, t:t + 1], cache) for t in range(20, 30)]
            torch.testing.assert_close(prefill, expected[:, 19:20], atol=1e-5, rtol=0)
            torch.testing.assert_close(torch.cat(steps, dim=1), expected[:, 20:], atol=1e-5, rtol=0)
            torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_is_exercised_and_matches_transformers():
    cfg = CONFIGS["llama"]
    ours = load_hf_weights_into_llama(LlamaModel(cfg), random_hf_model(cfg).state_dict()).eval()
    unscaled = LlamaModel(dataclasses.replace(cfg, rope_scaling=None)).eval()
    unscaled.load_state_dict(ours.state_dict())
    idx = torch.randint(0, VOCAB, (1, 200))
    with torch.no_grad():
        assert (unscaled(idx) - ours(idx)).abs().max() > 1e-2  # the tiny config's scaling matters
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
    for config in [cfg, LLAMA32_1B]:
        expected = rotary(hf_config(config)).inv_freq
        ours = rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling)
        torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


class LetterTokenizer:
    """Token IDs 0-319 as letters (from U+0100 on): enough of a tokenizer for the samples."""

    def encode(self, text, allowed_special=None):
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids):
        return "".join(chr(0x100 + i) for i in ids)


def test_chapter5_training_loop_trains_a_llama_with_samples(capsys):
    from torch.utils.data import DataLoader, TensorDataset

    from utils.train import train_model_simple
    torch.manual_seed(123)
    model = LlamaModel(dataclasses.replace(LLAMA_TINY, vocab_size=VOCAB))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data = torch.randint(0, VOCAB, (4, 33))
    loader = DataLoader(TensorDataset(data[:, :-1], data[:, 1:]), batch_size=2)
    history = train_model_simple(model, loader, loader, optimizer, "cpu", num_epochs=15,
                                 eval_freq=10, eval_iter=2, start_context="\u0105\u0106",
                                 tokenizer=LetterTokenizer())  # unchanged, samples and all
    first, last = history.records[0], history.records[-1]
    assert 5.0 < first["train_loss"] < 9.0  # about ln(320) = 5.8 and above, untrained
    assert last["train_loss"] < 0.6 * first["train_loss"]  # it memorises the four sequences
    assert len(history.samples) == 15 and all(s.startswith("\u0105\u0106") and len(s) == 52
                                             for s in history.samples)  # 2 + 50 new tokens
    assert history.samples[-1] in capsys.readouterr().out


def test_rope_tables_are_computed_once_per_model(pair, monkeypatch):
    import utils.llama
    cfg, _, ours = pair
    assert not {"cos", "sin"} & set(ours.state_dict())  # tables, not weights: never saved
    inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
    cos, sin = utils.llama.rope_angles(torch.arange(cfg.context_length), inv_freq)
    assert torch.equal(ours.cos, cos) and torch.equal(ours.sin, sin)

    def recomputed(*args, **kwargs):
        raise AssertionError("RoPE's tables were computed again")

    for name in ("rope_frequencies", "rope_angles", "rope_tables"):
        monkeypatch.setattr(utils.llama, name, recomputed)
    prompt = torch.randint(0, VOCAB, (1, 5))
    out = generate(CachedLlama(ours), prompt, 6, context_size=cfg.context_length)  # 7 passes
    assert out.shape == (1, 11)


def test_cached_llama_builds_on_chapter_8s_public_cache():
    from utils.fast import CachedGPT, CachedModel
    assert issubclass(CachedLlama, CachedModel) and not issubclass(CachedLlama, CachedGPT)
    overridden = {name for name in vars(CachedLlama) if not name.startswith("__")}
    assert overridden <= {"new_cache", "step"}  # the two model-specific parts, nothing private


def test_configs_and_modules_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="divisible by n_kv_groups"):
        LlamaConfig(n_heads=32, n_kv_groups=6)
    with pytest.raises(ValueError, match="head_dim must be even"):
        LlamaConfig(head_dim=63)
    with pytest.raises(ValueError, match="divisible by num_kv_groups"):
        GroupedQueryAttention(64, num_heads=4, num_kv_groups=3, head_dim=16)
    model = LlamaModel(dataclasses.replace(LLAMA_TINY, vocab_size=VOCAB, context_length=16))
    with pytest.raises(ValueError, match="exceed the context length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="token IDs"):
        model(torch.zeros(1, 4))


@pytest.mark.parametrize("change", [{"rope_base": 0.0}, {"rope_base": -500_000.0},
                                    {"rope_base": float("nan")}, {"rope_base": float("inf")},
                                    {"norm_eps": -1e-5}, {"norm_eps": 0.0}])
def test_config_refuses_a_rope_base_or_norm_eps_that_is_not_a_positive_number(change):
    [(name, value)] = change.items()
    with pytest.raises(ValueError, match=rf"LlamaConfig.{name} must be a finite number above "
                                         rf"0, got {value!r}; .*uses"):
        dataclasses.replace(LLAMA_TINY, **change)


def test_rope_scaling_refuses_factors_that_would_give_nan_or_nonsense():
    for change, word in [({"factor": 0.0}, "factor must be a finite number above 0"),
                         ({"factor": -4.0}, "factor must be"),
                         ({"low_freq_factor": 0.0}, "low_freq_factor must be"),
                         ({"high_freq_factor": float("nan")}, "high_freq_factor must be"),
                         ({"low_freq_factor": 4.0, "high_freq_factor": 4.0},
                          r"high_freq_factor \(4.0\) must be larger than low_freq_factor"),
                         ({"original_context_length": 0}, "original_context_length must be"),
                         ({"original_context_length": True}, "original_context_length .*not True")]:
        with pytest.raises(ValueError, match=f"RopeScaling.{word}"):
            RopeScaling(**change)
    published = json.loads(PUBLISHED_CONFIGS["llama-3.2-1b-config"])
    with pytest.raises(ValueError, match="RopeScaling.factor must be"):  # not NaN logits
        config_from_hf({**published, "rope_scaling": {**published["rope_scaling"],
                                                      "factor": 0.0}})
    with pytest.raises(ValueError, match="rope_scaling must be a RopeScaling or None"):
        dataclasses.replace(LLAMA_TINY, rope_scaling={"factor": 4.0})


@pytest.mark.parametrize("name", ["vocab_size", "context_length", "emb_dim", "n_heads",
                                  "n_kv_groups", "n_layers", "hidden_dim", "head_dim"])
def test_config_counts_refuse_booleans_and_fractions(name):
    for value in [True, False, 2.0]:
        with pytest.raises(ValueError, match=rf"LlamaConfig.{name} must be a positive "
                                             rf"integer \(a whole number, not True or False\), "
                                             rf"got {value!r}"):
            dataclasses.replace(LLAMA_TINY, **{name: value})
    with pytest.raises(ValueError, match="qk_norm must be True or False, got 'yes'"):
        dataclasses.replace(LLAMA_TINY, qk_norm="yes")


def test_config_from_hf_refuses_what_llama_model_does_not_implement():
    published = json.loads(PUBLISHED_CONFIGS["llama-3.2-1b-config"])
    for change, word in [({"attention_bias": True}, "attention_bias"),
                         ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type=yarn"),
                         ({"hidden_act": "gelu"}, "hidden_act=gelu"),
                         ({"model_type": "gpt2"}, "not supported")]:
        with pytest.raises(ValueError, match=word):
            config_from_hf({**published, **change})


def test_weight_mapping_errors_name_the_tensor_and_leave_the_model_untouched(pair):
    cfg, theirs, _ = pair
    params = theirs.state_dict()
    model = LlamaModel(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing: \['model.layers.1.mlp.up_proj.weight'\]"):
        load_hf_weights_into_llama(model, {k: v for k, v in params.items()
                                           if k != "model.layers.1.mlp.up_proj.weight"})
    extra = "model.layers.2.input_layernorm.weight"
    with pytest.raises(ValueError, match=rf"unexpected: \['{extra}'\]"):
        load_hf_weights_into_llama(model, {**params, extra: torch.ones(cfg.emb_dim)})
    with pytest.raises(ValueError, match=r"model.embed_tokens.weight: file \(320, 64\), "
                                         r"model expects \(400, 64\)"):
        load_hf_weights_into_llama(LlamaModel(dataclasses.replace(cfg, vocab_size=400)), params)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- the published checkpoints: configs, registry, and the format, offline ----------------

@pytest.mark.parametrize("asset_name", list(PUBLISHED_CONFIGS))
def test_published_configs_are_the_registered_files_and_give_our_presets(asset_name):
    raw = PUBLISHED_CONFIGS[asset_name].encode()
    asset = ASSETS[asset_name]
    assert len(raw) == asset.size and hashlib.sha256(raw).hexdigest() == asset.sha256
    published = json.loads(raw)
    assert config_from_hf(published) == PRESETS[asset_name]
    # transformers reads the same file into its own config; its (version 5) dict reads back too
    config_class = transformers.Qwen3Config if published["model_type"] == "qwen3" \
        else transformers.LlamaConfig
    assert config_from_hf(config_class.from_dict(published).to_dict()) == PRESETS[asset_name]


@pytest.mark.parametrize("prefix, preset, stores_head", [("qwen3-0.6b", QWEN3_0_6B, True),
                                                         ("llama-3.2-1b", LLAMA32_1B, False)])
def test_registered_weight_sizes_fit_the_presets_in_bfloat16(prefix, preset, stores_head):
    """The file is a header plus 2 bytes per number: the preset's parameters, and a stored copy
    of the tied head in Qwen3-0.6B's file but not in Llama 3.2 1B's."""
    with torch.device("meta"):
        model = LlamaModel(preset)
    numbers = sum(p.numel() for p in model.parameters())
    numbers += preset.vocab_size * preset.emb_dim if stores_head else 0
    tensors = 2 + preset.n_layers * (11 if preset.qk_norm else 9) + (1 if stores_head else 0)
    header = ASSETS[f"{prefix}-weights"].size - 2 * numbers
    assert 80 * tensors < header < 160 * tensors  # a JSON entry of ~115 bytes per tensor


def write_tokenizer(path: Path, model_type: str) -> None:
    """A small byte-level BPE tokenizer.json with the model family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS[model_type],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    if model_type == "llama":  # Llama 3 puts <|begin_of_text|> before a plain text
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(path))


def write_published_checkpoint(folder: Path, asset_prefix: str, cfg: LlamaConfig) -> dict:
    """config.json, model.safetensors and tokenizer.json as on the Hub, for a tiny `cfg`:
    the published config's keys and layout, bfloat16 tensors under the published names
    (with Qwen3-0.6B's stored head copy), safetensors metadata {"format": "pt"}."""
    folder.mkdir(parents=True, exist_ok=True)
    published = json.loads(PUBLISHED_CONFIGS[f"{asset_prefix}-config"])
    tiny = {"vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length,
            "hidden_size": cfg.emb_dim, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_groups, "num_hidden_layers": cfg.n_layers,
            "intermediate_size": cfg.hidden_dim, "head_dim": cfg.head_dim,
            "bos_token_id": 0, "eos_token_id": 1}
    if cfg.rope_scaling is not None:
        tiny["rope_scaling"] = {**published["rope_scaling"], "factor": cfg.rope_scaling.factor,
                                "original_max_position_embeddings":
                                    cfg.rope_scaling.original_context_length}
    if "max_window_layers" in published:
        tiny["max_window_layers"] = cfg.n_layers
    config = {k: tiny.get(k, v) for k, v in published.items()}  # the published key order
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    model = random_hf_model(cfg, seed=5)
    tensors = {k: v.to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()}
    if asset_prefix.startswith("llama"):
        del tensors["lm_head.weight"]  # Llama 3.2 1B's file has no head; Qwen3-0.6B's has a copy
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    write_tokenizer(folder / "tokenizer.json", published["model_type"])
    return tensors


def register_and_mirror(monkeypatch, tmp_path: Path, asset_prefix: str, source: Path) -> Path:
    """Point the registry's entries for the model at the tiny files (their size and sha256)
    and put them in an offline mirror; returns the (empty) data folder."""
    mirror = tmp_path / "mirror"
    for part, file in [("config", "config.json"), ("tokenizer", "tokenizer.json"),
                       ("weights", "model.safetensors")]:
        real = ASSETS[f"{asset_prefix}-{part}"]
        body = (source / file).read_bytes()
        (mirror / real.filename).parent.mkdir(parents=True, exist_ok=True)
        (mirror / real.filename).write_bytes(body)
        monkeypatch.setitem(ASSETS, real.name, dataclasses.replace(
            real, size=len(body), sha256=hashlib.sha256(body).hexdigest()))
    monkeypatch.setenv("LLM_COURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LLM_COURSE_MIRROR", str(mirror))
    monkeypatch.setenv("LLM_COURSE_OFFLINE", "1")
    return tmp_path / "data"


@pytest.mark.parametrize("repo_id, asset_prefix, model_type", [
    ("Qwen/Qwen3-0.6B", "qwen3-0.6b", "qwen3"),
    ("meta-llama/Llama-3.2-1B", "llama-3.2-1b", "llama")])
def test_loading_a_checkpoint_in_the_published_format(monkeypatch, tmp_path, no_network,
                                                      repo_id, asset_prefix, model_type):
    cfg = CONFIGS[model_type]
    source = tmp_path / "published"
    tensors = write_published_checkpoint(source, asset_prefix, cfg)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    data_dir = register_and_mirror(monkeypatch, tmp_path, asset_prefix, source)

    model, tokenizer = load_pretrained_llama(repo_id, progress=False)
    assert (data_dir / asset_prefix / "model.safetensors").is_file()  # fetched into the cache
    assert model.cfg == cfg and not model.training
    assert model.out_head.weight is model.tok_emb.weight  # tied again after loading
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    reference = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    torch.manual_seed(6)
    idx = torch.randint(0, VOCAB, (2, 60))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-5, rtol=0)

    expected = transformers.PreTrainedTokenizerFast(tokenizer_file=str(source / "tokenizer.json"))
    assert tokenizer.encode(TEXT[:200]) == expected.encode(TEXT[:200], add_special_tokens=False)
    assert tokenizer.encode("Paris", add_special_tokens=True) == expected.encode("Paris")
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    chat = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert tokenizer.stop_id == tokenizer.token_id(SPECIAL_TOKENS[model_type][2 if model_type ==
                                                                              "qwen3" else 4])
    start = "<|im_start|>" if model_type == "qwen3" else "<|start_header_id|>"
    assert chat.count(tokenizer.token_id(start)) == 2  # one token each, not split into pieces
    reply = generate(CachedLlama(model), torch.tensor([chat]), max_new_tokens=5,
                     context_size=cfg.context_length, eos_id=tokenizer.stop_id)
    assert reply.shape[1] <= len(chat) + 5

    bf16, _ = load_llama_checkpoint(data_dir / asset_prefix, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(bf16(idx).float()).all()


def write_sharded_checkpoint(folder: Path, cfg: LlamaConfig) -> Path:
    """config.json and model.safetensors in `folder`, and a copy of the same tensors in
    `folder`/sharded as the Hub stores a large model: two shards and the index listing them."""
    folder.mkdir(parents=True, exist_ok=True)
    model = random_hf_model(cfg, seed=5)
    model.config.save_pretrained(folder)  # config.json
    tensors = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    sharded = folder / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((folder / "config.json").read_bytes())
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate([names[::2], names[1::2]], start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, sharded / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return sharded


def test_a_sharded_checkpoint_loads_as_the_single_file_does(tmp_path):
    cfg = CONFIGS["llama"]
    sharded = write_sharded_checkpoint(tmp_path / "single", cfg)
    assert not (sharded / "model.safetensors").exists()
    single, _ = load_llama_checkpoint(tmp_path / "single")
    from_shards, tokenizer = load_llama_checkpoint(sharded)
    assert from_shards.cfg == single.cfg == cfg and tokenizer is None
    ours, theirs = single.state_dict(), from_shards.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert from_shards.out_head.weight is from_shards.tok_emb.weight


def test_a_checkpoint_folder_without_its_weights_names_what_is_missing(tmp_path):
    sharded = write_sharded_checkpoint(tmp_path / "single", CONFIGS["qwen3"])
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sharded lacks 1 of the 2 shards that "
                                                r"model.safetensors.index.json lists: "
                                                r"model-00002-of-00002.safetensors; download"):
        load_llama_checkpoint(sharded)
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"sharded holds neither model.safetensors nor "
                                                r"model.safetensors.index.json"):
        load_llama_checkpoint(sharded)
    with pytest.raises(FileNotFoundError, match="empty has no config.json"):
        load_llama_checkpoint(tmp_path / "empty")


def test_offline_without_the_files_says_what_to_do(monkeypatch, tmp_path, no_network):
    monkeypatch.setenv("LLM_COURSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LLM_COURSE_MIRROR", "")
    monkeypatch.setenv("LLM_COURSE_OFFLINE", "1")
    with pytest.raises(AssetUnavailableError) as err:
        load_pretrained_llama("Qwen/Qwen3-0.6B")
    message = str(err.value)
    for expected in ["'qwen3-0.6b-config'", "offline mode is on", "unset LLM_COURSE_OFFLINE",
                     "https://huggingface.co/Qwen/Qwen3-0.6B/resolve/main/config.json",
                     "needs internet access but no account"]:
        assert expected in message, expected
    with pytest.raises(AssetUnavailableError) as err:
        load_pretrained_llama("meta-llama/Llama-3.2-1B")
    for expected in ["'llama-3.2-1b-config'", "this file is gated", "HF_TOKEN",
                     "https://huggingface.co/meta-llama/Llama-3.2-1B,"]:
        assert expected in str(err.value), expected
    with pytest.raises(ValueError, match="Did you mean 'Qwen/Qwen3-0.6B'"):
        load_pretrained_llama("Qwen/Qwen3-0.6b")


def hub_handler(http_server, token: str):
    """A loopback "Hub": /gated answers 401 without the right bearer token, else moves the
    file within the host (/cache, which checks the token too), which redirects to a storage
    server, here the same server under another name (localhost), as the Hub does."""
    def answer(request):
        if request.headers.get("Authorization") != f"Bearer {token}":
            return 401, {}, b""
        if request.path == "/gated":
            return 307, {"Location": "/cache"}, b""  # same host: the token goes along
        return 302, {"Location": http_server.url("/storage", host="localhost")}, b""

    return answer


def test_gated_download_sends_the_token_to_the_hub_only(monkeypatch, tmp_path, http_server):
    body = b"weights" * 1000
    http_server.routes["/gated"] = http_server.routes["/cache"] = hub_handler(http_server,
                                                                              "secret")
    http_server.routes["/storage"] = (200, body, "ok")
    monkeypatch.setitem(ASSETS, "gated", Asset("gated", "g/file.bin", http_server.url("/gated"),
                                               len(body), hashlib.sha256(body).hexdigest(),
                                               token_env="TEST_HUB_TOKEN"))
    monkeypatch.delenv("TEST_HUB_TOKEN", raising=False)
    with pytest.raises(AssetUnavailableError, match=r"HTTP 401 .*a gated file: set "
                                                    r"\$TEST_HUB_TOKEN"):
        fetch("gated", data_dir=tmp_path, mirror="", offline=False, progress=False)
    monkeypatch.setenv("TEST_HUB_TOKEN", "wrong")
    with pytest.raises(AssetUnavailableError, match="its token was refused"):
        fetch("gated", data_dir=tmp_path, mirror="", offline=False, progress=False)
    monkeypatch.setenv("TEST_HUB_TOKEN", "secret")
    http_server.requests.clear()
    path = fetch("gated", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert path.read_bytes() == body
    assert [(r.path, r.headers.get("Authorization")) for r in http_server.requests] == [
        ("/gated", "Bearer secret"), ("/cache", "Bearer secret"),
        ("/storage", None)]  # never to another host


# ---- chat formats and small pieces ---------------------------------------------------------

def test_chat_formats():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there "}]
    assert format_chat(messages, "qwen3") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there <|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert format_chat(messages, "qwen3", thinking=True).endswith("<|im_start|>assistant\n")
    assert format_chat(messages, "llama") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="role"):
        format_chat([{"role": "robot", "content": "beep"}], "qwen3")
    with pytest.raises(ValueError, match="no chat format"):
        format_chat(messages, "gpt2")


def test_hub_tokenizer_knows_its_stop_token(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json", "qwen3")
    tokenizer = HubTokenizer(tmp_path / "tokenizer.json", "qwen3")
    assert tokenizer.decode([tokenizer.stop_id]) == "<|im_end|>"
    assert tokenizer.n_vocab == 300
    with pytest.raises(KeyError, match="not a token"):
        tokenizer.token_id("<|eot_id|>")


def test_kv_cache_bytes_counts_the_cache_tensors():
    cfg = dataclasses.replace(QWEN3_TINY, vocab_size=VOCAB)
    cache = KVCache(cfg.n_layers, capacity=cfg.context_length)
    with torch.no_grad():
        LlamaModel(cfg)(torch.zeros(1, cfg.context_length, dtype=torch.long), cache)
    measured = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert measured == kv_cache_bytes(cfg, cfg.context_length, bytes_per_value=4)
    assert kv_cache_bytes(LLAMA32_1B, LLAMA32_1B.context_length) == 4 * 2**30  # 4 GiB in bfloat16


def test_presets_have_the_published_parameter_counts():
    counts = {}
    for name, cfg in [("llama", LLAMA32_1B), ("qwen3", QWEN3_0_6B)]:
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in LlamaModel(cfg).parameters())
    assert counts == {"llama": 1_235_814_400, "qwen3": 596_049_920}
    assert counts["qwen3"] - QWEN3_0_6B.vocab_size * QWEN3_0_6B.emb_dim == 440_467_456  # "0.44B"
    assert LLAMA32_1B.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
