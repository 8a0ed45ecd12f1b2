"""utils/latent_attention.py against the reference implementation (Hugging Face transformers'
DeepseekV3ForCausalLM with dense layers only) at tiny random configurations, offline."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from utils.latent_attention import (DEEPSEEK_V3, MLA_TINY, CachedMLA, LatentKVCache, MLAConfig, MLAModel,
                 load_hf_weights_into_mla, mla_cache_bytes, mla_config_from_hf, set_absorbed)
from utils.generation import generate
from utils.llama import LlamaConfig, kv_cache_bytes
from hf_parity import assert_cache_matches_full_pass, assert_same_logits, perturbed

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 320
CONFIGS = {  # the default (query latent, interleaved RoPE), and the two other shapes
    "q_latent": dataclasses.replace(MLA_TINY, vocab_size=VOCAB),
    "no_q_latent": dataclasses.replace(MLA_TINY, vocab_size=VOCAB, q_lora_rank=None,
                                       v_head_dim=12),  # Dv != Dn catches a swapped split
    "half_split_rope": dataclasses.replace(MLA_TINY, vocab_size=VOCAB, rope_interleave=False),
}


def hf_config(cfg: MLAConfig):
    """A DeepseekV3Config of `cfg` whose every layer is dense (no experts)."""
    return transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, first_k_dense_replace=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim, rope_interleave=cfg.rope_interleave,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        bos_token_id=None, eos_token_id=None, pad_token_id=0)


def random_hf_model(cfg: MLAConfig, seed: int = 0):
    """A DeepseekV3ForCausalLM of `cfg` with weights large enough for logits of size 1-10."""
    torch.manual_seed(seed)
    return perturbed(transformers.DeepseekV3ForCausalLM(hf_config(cfg)), seed)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(our config, their model, our model with their weights)."""
    cfg = CONFIGS[request.param]
    theirs = random_hf_model(cfg)
    ours = load_hf_weights_into_mla(MLAModel(cfg), theirs.state_dict()).eval()
    return cfg, theirs, ours


def test_transformers_defaults_are_our_presets():
    hf = transformers.DeepseekV3Config()
    assert hf.rope_interleave is True and MLA_TINY.rope_interleave is True
    for ours, theirs in [("emb_dim", "hidden_size"), ("n_heads", "num_attention_heads"),
                         ("n_layers", "num_hidden_layers"), ("kv_lora_rank", "kv_lora_rank"),
                         ("q_lora_rank", "q_lora_rank"), ("qk_nope_head_dim", "qk_nope_head_dim"),
                         ("qk_rope_head_dim", "qk_rope_head_dim"), ("v_head_dim", "v_head_dim"),
                         ("head_dim", "head_dim"), ("vocab_size", "vocab_size"),
                         ("hidden_dim", "intermediate_size"), ("norm_eps", "rms_norm_eps")]:
        assert getattr(DEEPSEEK_V3, ours) == getattr(hf, theirs), ours
    assert (DEEPSEEK_V3.emb_dim, DEEPSEEK_V3.n_heads, DEEPSEEK_V3.kv_lora_rank) == (7168, 128, 512)


def test_config_read_from_transformers_is_ours(pair):
    cfg, theirs, _ = pair
    assert mla_config_from_hf(theirs.config.to_dict()) == cfg


def test_config_refuses_what_we_do_not_build():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        mla_config_from_hf(transformers.DeepseekV3Config().to_dict())  # layers 3-60 are MoE
    yarn = hf_config(MLA_TINY).to_dict()
    yarn["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0}
    with pytest.raises(ValueError, match="rope_type=yarn"):
        mla_config_from_hf(yarn)
    for bad in [dict(qk_rope_head_dim=7), dict(q_lora_rank=0), dict(kv_lora_rank=True),
                dict(rope_interleave="yes"), dict(latent_norm_eps=0.0)]:
        with pytest.raises(ValueError):
            dataclasses.replace(MLA_TINY, **bad)
    with pytest.raises(ValueError):  # derived from qk_rope_head_dim, never passed
        dataclasses.replace(MLA_TINY, head_dim=16)
    assert (MLA_TINY.head_dim, MLA_TINY.n_kv_groups) == (8, 4)


def test_logits_match_transformers(pair):
    cfg, theirs, ours = pair
    assert_same_logits(theirs, ours, VOCAB)


def test_latent_cache_matches_the_full_pass_and_stores_only_latents(pair):
    cfg, _, ours = pair
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 40))
    cache = LatentKVCache(cfg.n_layers, capacity=64)
    # a prefill, then 3 tokens at once, then one by one
    assert_cache_matches_full_pass(ours, cache, idx, cuts=[17, 20])
    assert cache.length == 40
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # 40, not 2 x H x D
    assert all(t.shape == (2, 64, width) for t in cache.latents)


def test_greedy_generation_matches_transformers_with_and_without_cache(pair):
    cfg, theirs, ours = pair
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 6))
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=30, do_sample=False)
    assert torch.equal(generate(ours, prompt, 30, context_size=cfg.context_length), expected)
    cached = CachedMLA(ours, min_capacity=16)  # too small on purpose: it has to grow
    assert torch.equal(generate(cached, prompt, 30, context_size=cfg.context_length), expected)
    assert isinstance(cached.cache, LatentKVCache) and cached.cache.capacity > 16


def test_absorbed_attention_gives_the_same_logits(pair):
    cfg, theirs, ours = pair
    absorbed = set_absorbed(copy.deepcopy(ours))
    torch.manual_seed(4)
    idx = torch.randint(0, VOCAB, (2, 30))
    cache = LatentKVCache(cfg.n_layers, capacity=32)
    with torch.no_grad():
        expected = theirs(idx).logits
        torch.testing.assert_close(absorbed(idx), expected, atol=1e-5, rtol=0)
        steps = [absorbed(idx[:, :20], cache)] + [absorbed(idx[:, t:t + 1], cache)
                                                  for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=0)
    assert set_absorbed(absorbed, False).state_dict().keys() == ours.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_cache_bytes_are_mla_cache_bytes(dtype):
    cfg = CONFIGS["q_latent"]
    model = MLAModel(cfg).to(dtype).eval()
    cache = LatentKVCache(cfg.n_layers, capacity=24)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 24)), cache)
    measured = sum(t.numel() * t.element_size() for t in cache.latents)
    assert measured == mla_cache_bytes(cfg, 24, torch.finfo(dtype).bits // 8)
    mha = LlamaConfig(n_layers=61, n_heads=128, n_kv_groups=128, head_dim=128, emb_dim=7168)
    assert mla_cache_bytes(DEEPSEEK_V3, 1) == 61 * 576 * 2 < kv_cache_bytes(mha, 1) / 50


def test_latent_norms_keep_their_own_eps():
    cfg = dataclasses.replace(CONFIGS["q_latent"], norm_eps=1e-2)  # only the block norms
    theirs = random_hf_model(cfg, seed=5)
    ours = load_hf_weights_into_mla(MLAModel(cfg), theirs.state_dict()).eval()
    idx = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=0)


def test_loader_refuses_a_wrong_shape_and_leaves_the_model_untouched(pair):
    cfg, theirs, _ = pair
    model = MLAModel(cfg)
    before = copy.deepcopy(model.state_dict())
    params = dict(theirs.state_dict())
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    params[name] = params[name][:, :-1]  # a latent one value too narrow
    with pytest.raises(ValueError, match="wrong shape: model.layers.1.self_attn.kv_b_proj"):
        load_hf_weights_into_mla(model, params)
    other = CONFIGS["no_q_latent" if cfg.q_lora_rank else "q_latent"]
    with pytest.raises(ValueError, match="missing"):  # query latent or not: other names
        load_hf_weights_into_mla(model, random_hf_model(other).state_dict())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
