"""utils/sliding_window.py against the reference implementation (Hugging Face transformers'
Gemma3ForCausalLM) at a tiny random config whose window (8) is far shorter than the
sequences (40 tokens), so that both layer types and the window's edge are exercised."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from utils.sliding_window import (FULL_ATTENTION, GEMMA3_270M, GEMMA3_TINY, SLIDING_ATTENTION,
                                  CachedGemma3, Gemma3Config, Gemma3Model, RollingKVCache,
                                  gemma3_config_from_hf, gemma3_kv_cache_bytes,
                                  gemma3_layer_types, load_gemma3_checkpoint,
                                  load_hf_weights_into_gemma3, sliding_window_mask)
from utils.fast import CachedModel, KVCache
from utils.generation import generate
from hf_parity import assert_cache_matches_full_pass, assert_same_logits, perturbed

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 320
CFG = dataclasses.replace(GEMMA3_TINY, vocab_size=VOCAB)


def hf_config(cfg: Gemma3Config, attn_implementation: str = "sdpa"):
    full_rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_global_scale != 1.0:
        full_rope = {**full_rope, "rope_type": "linear", "factor": cfg.rope_global_scale}
    config = transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_groups, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        query_pre_attn_scalar=cfg.query_pre_attn_scalar, sliding_window=cfg.sliding_window,
        layer_types=list(cfg.layer_types),
        rope_parameters={SLIDING_ATTENTION: {"rope_type": "default",
                                             "rope_theta": cfg.rope_local_base},
                         FULL_ATTENTION: full_rope},
        bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config._attn_implementation = attn_implementation
    return config


def random_hf_model(cfg: Gemma3Config, seed: int = 0, attn_implementation: str = "sdpa"):
    """A Gemma3ForCausalLM of `cfg` with weights large enough for logits of size 1-10."""
    torch.manual_seed(seed)
    return perturbed(transformers.Gemma3ForCausalLM(hf_config(cfg, attn_implementation)), seed)


@pytest.fixture(scope="module")
def pair():
    """(their model, our model with their weights)."""
    theirs = random_hf_model(CFG)
    ours = load_hf_weights_into_gemma3(Gemma3Model(CFG), theirs.state_dict()).eval()
    return theirs, ours


def test_tiny_config_has_both_layer_types_and_a_short_window():
    assert CFG.layer_types == (SLIDING_ATTENTION,) * 5 + (FULL_ATTENTION,)
    assert CFG.sliding_window == 8 < 40


def test_config_read_from_transformers_is_ours(pair):
    theirs, _ = pair
    assert gemma3_config_from_hf(theirs.config.to_dict()) == CFG


def test_mask_sees_itself_and_the_window_minus_one_before():
    mask = sliding_window_mask(3, 6, window=3)  # queries at positions 3, 4, 5 of 0 .. 5
    assert mask.int().tolist() == [[0, 1, 1, 1, 0, 0],
                                   [0, 0, 1, 1, 1, 0],
                                   [0, 0, 0, 1, 1, 1]]
    assert torch.equal(sliding_window_mask(4, 4, None), torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_logits_match_transformers_beyond_the_window(pair, attn_implementation):
    theirs, ours = pair
    if attn_implementation != "sdpa":
        theirs = random_hf_model(CFG, attn_implementation=attn_implementation)
        ours = load_hf_weights_into_gemma3(Gemma3Model(CFG), theirs.state_dict()).eval()
    assert_same_logits(theirs, ours, VOCAB, shape=(2, 40))


def test_bfloat16_logits_are_identical_to_transformers(pair):
    """In bfloat16 the order of casts matters (norm scale before the cast, sqrt(C) rounded
    to 25.25-like values, cos/sin rounded): the same order gives the same bits."""
    theirs = random_hf_model(CFG).to(torch.bfloat16)
    rotary = theirs.model.rotary_emb  # .to() rounded its frequencies; from_pretrained with
    for kind in rotary.layer_types:  # dtype=bfloat16 keeps them in float32, as we do
        init = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS.get(
            rotary.rope_type[kind], rotary.compute_default_rope_parameters)
        setattr(rotary, f"{kind}_inv_freq", init(rotary.config, layer_type=kind)[0])
    ours = load_hf_weights_into_gemma3(Gemma3Model(CFG), theirs.state_dict()).eval()
    ours = ours.to(torch.bfloat16)  # after loading: the RoPE tables computed in float32 first
    idx = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert torch.equal(ours(idx), theirs(idx).logits)


def test_the_window_changes_the_logits_only_past_its_edge(pair):
    _, ours = pair
    local_only = dataclasses.replace(CFG, layer_types=(SLIDING_ATTENTION,) * 6)
    windowed = Gemma3Model(local_only).eval()
    windowed.load_state_dict(ours.state_dict())
    unlimited = Gemma3Model(dataclasses.replace(local_only, sliding_window=40)).eval()
    unlimited.load_state_dict(ours.state_dict())
    idx = torch.randint(0, VOCAB, (1, 40))
    with torch.no_grad():
        a, b = windowed(idx), unlimited(idx)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)  # window not yet full
    assert (a[:, 8:] - b[:, 8:]).abs().amax(dim=-1).min() > 1e-4  # every later position differs


def test_rolling_cache_logits_match_the_full_forward_pass(pair):
    _, ours = pair
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 40))
    cache = RollingKVCache([8] * 5 + [None], capacity=64)
    # a prefill shorter than the window, one longer than it, then 3 at once, then one by one
    assert_cache_matches_full_pass(ours, cache, idx, cuts=[5, 17, 20])
    assert cache.length == 40
    assert [k.shape[2] for k in cache.keys] == [8] * 5 + [64]


def test_chapter_8s_cache_gives_the_same_logits(pair):
    _, ours = pair
    idx = torch.randint(0, VOCAB, (1, 30))
    cache = KVCache(CFG.n_layers, capacity=32)  # keeps everything: the mask does the windowing
    with torch.no_grad():
        steps = [ours(idx[:, :10], cache)] + [ours(idx[:, t:t + 1], cache) for t in range(10, 30)]
        torch.testing.assert_close(torch.cat(steps, dim=1), ours(idx), atol=1e-5, rtol=0)


def test_rolling_buffer_holds_exactly_the_last_window_positions():
    cache = RollingKVCache([5], capacity=100)
    positions = torch.arange(23.0).view(1, 1, 23, 1)  # each key is its own position
    start = 0
    for size in [3, 1, 7, 1, 1, 6, 1, 1, 1, 1]:
        keys, _ = cache.append(0, positions[:, :, start:start + size],
                               positions[:, :, start:start + size])
        start += size
        visible = sorted(keys.flatten().tolist())  # what the new queries were shown: one
        first = start - 5 if size == 1 else start - size - 5  # query, its window; several,
        assert visible == list(range(max(0, first), start))  # the buffer too (then masked)
        held = sorted(cache.keys[0][:, :, :min(start, 5)].flatten().tolist())
        assert held == list(range(max(0, start - 5), start))
        assert cache.keys[0].shape == (1, 1, 5, 1)


def test_greedy_generation_matches_transformers_with_and_without_cache(pair):
    theirs, ours = pair
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 6))
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=30, do_sample=False)  # 36 tokens: over 4 windows
    assert torch.equal(generate(ours, prompt, 30, context_size=CFG.context_length), expected)
    cached = CachedGemma3(ours, min_capacity=16)  # too small on purpose: it has to grow
    assert isinstance(cached, CachedModel)
    assert torch.equal(generate(cached, prompt, 30, context_size=CFG.context_length), expected)
    assert cached.cache.capacity > 16 and cached.cache.length == 35  # the last token not run
    for kind, keys in zip(CFG.layer_types, cached.cache.keys):
        assert keys.shape[2] == (8 if kind == SLIDING_ATTENTION else cached.cache.capacity)


def test_kv_cache_bytes_counts_the_cache_tensors(pair):
    _, ours = pair
    cache = RollingKVCache([8] * 5 + [None], capacity=40)
    with torch.no_grad():
        ours(torch.zeros(1, 40, dtype=torch.long), cache)
    measured = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
    assert measured == gemma3_kv_cache_bytes(CFG, 40, bytes_per_value=4)
    # the 270M at its full 32k context, in bfloat16: 15 local layers hold 512 positions each
    assert gemma3_kv_cache_bytes(GEMMA3_270M, 32_768) == 108_527_616  # 103.5 MiB, not 576 MiB
    everywhere = dataclasses.replace(GEMMA3_270M, layer_types=(FULL_ATTENTION,) * 18)
    assert gemma3_kv_cache_bytes(everywhere, 32_768) == 576 * 2**20


def test_loader_refuses_what_does_not_fit_and_leaves_the_model_untouched(pair):
    theirs, _ = pair
    params = theirs.state_dict()
    model = Gemma3Model(CFG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(ValueError, match=rf"wrong shape: {name}: file \(32, 64\), "
                                         r"model expects \(64, 64\)"):
        load_hf_weights_into_gemma3(model, {**params, name: params[name][:32]})
    name = "model.layers.2.pre_feedforward_layernorm.weight"
    with pytest.raises(ValueError, match=rf"missing: \['{name}'\]"):
        load_hf_weights_into_gemma3(model, {k: v for k, v in params.items() if k != name})
    with pytest.raises(ValueError, match=r"unexpected: \['model.layers.6.input_layernorm"):
        load_hf_weights_into_gemma3(model, {**params, "model.layers.6.input_layernorm.weight":
                                            torch.zeros(CFG.emb_dim)})
    with pytest.raises(ValueError, match="Gemma 3 ties them"):
        load_hf_weights_into_gemma3(model, {**params, "lm_head.weight":
                                            torch.zeros(VOCAB, CFG.emb_dim)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_configs_refuse_what_cannot_work():
    with pytest.raises(ValueError, match="layer_types must be a tuple of 4"):
        dataclasses.replace(CFG, n_layers=4)
    with pytest.raises(ValueError, match="divisible by n_kv_groups"):
        dataclasses.replace(CFG, n_kv_groups=3)
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        dataclasses.replace(CFG, sliding_window=0)
    with pytest.raises(ValueError, match="rope_global_scale must be a finite number"):
        dataclasses.replace(CFG, rope_global_scale=float("nan"))
    hf = hf_config(CFG).to_dict()
    for change, word in [({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
                         ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
                         ({"hidden_activation": "gelu"}, "hidden_activation=gelu"),
                         ({"model_type": "gemma3"}, "text_config")]:
        with pytest.raises(ValueError, match=word):
            gemma3_config_from_hf({**hf, **change})


def test_the_published_270m_config_gives_our_preset():
    published = {  # google/gemma-3-270m config.json, as transformers 4 wrote it (rope fields)
        "model_type": "gemma3_text", "vocab_size": 262144, "max_position_embeddings": 32768,
        "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
        "rope_scaling": None, "sliding_window": 512, "_sliding_window_pattern": 6,
        "attn_logit_softcapping": None, "final_logit_softcapping": None,
        "attention_bias": False, "tie_word_embeddings": True,
        "use_bidirectional_attention": False}
    assert gemma3_config_from_hf(published) == GEMMA3_270M
    rewritten = transformers.Gemma3TextConfig(**{k: v for k, v in published.items()
                                                 if k != "model_type"}).to_dict()
    ours = gemma3_config_from_hf(rewritten)
    assert ours == GEMMA3_270M  # and as transformers 5 rewrites it
    assert GEMMA3_270M.layer_types == gemma3_layer_types(18)
    assert [i for i, kind in enumerate(GEMMA3_270M.layer_types) if kind == FULL_ATTENTION] == [5, 11, 17]
    with torch.device("meta"):
        count = sum(p.numel() for p in Gemma3Model(GEMMA3_270M).parameters())
    assert count == 268_098_176  # "270M": 167.8M of it the (tied) embedding matrix


def test_a_checkpoint_folder_loads_in_bfloat16_and_in_float32(pair, tmp_path):
    theirs, ours = pair
    theirs.save_pretrained(tmp_path)  # config.json and one model.safetensors
    model = load_gemma3_checkpoint(tmp_path, dtype=torch.float32)
    assert model.cfg == CFG and model.out_head.weight is model.tok_emb.weight  # tied again
    assert_same_logits(theirs, model, VOCAB, shape=(2, 40))  # its RoPE tables rebuilt
    half = load_gemma3_checkpoint(tmp_path)  # bfloat16, the default
    assert half.tok_emb.weight.dtype == torch.bfloat16
    idx = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():  # bfloat16 rounding only: the same model
        assert (half(idx).float() - ours(idx)).abs().max() < 0.5
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds neither model.safetensors"):
        load_gemma3_checkpoint(tmp_path)
