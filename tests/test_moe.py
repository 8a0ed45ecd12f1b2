"""utils/moe.py against the reference implementation (Hugging Face transformers' Qwen3MoeForCausalLM
and load_balancing_loss_func), on tiny random models, offline."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from utils.moe import (QWEN3_30B_A3B, QWEN3_MOE_TINY, MoEConfig, MoEFeedForward, MoEModel,
                       flops_per_token, load_balancing_loss, load_hf_weights_into_moe,
                       load_moe_checkpoint, moe_config_from_hf, parameter_counts)
from utils.fast import KVCache
from utils.generation import generate
from utils.llama import QWEN3_TINY, CachedLlama, LlamaModel
from hf_parity import assert_cache_matches_full_pass, assert_same_logits, perturbed

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func  # noqa: E402

VOCAB = 320
CONFIGS = {  # Qwen3's layout (tied here), and the 30B's untied head with unnormalised weights
    "tied-normalised": dataclasses.replace(QWEN3_MOE_TINY, vocab_size=VOCAB),
    "untied-raw": dataclasses.replace(QWEN3_MOE_TINY, vocab_size=VOCAB, tie_embeddings=False,
                                      norm_topk_prob=False, num_experts=6,
                                      num_experts_per_tok=3, moe_hidden_dim=40),
}


def hf_config(cfg: MoEConfig):
    return transformers.Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim, intermediate_size=cfg.hidden_dim,
        moe_intermediate_size=cfg.moe_hidden_dim, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=[],  # every layer a mixture, as in Qwen3-30B-A3B
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_groups, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_base},
        bos_token_id=None, eos_token_id=None, pad_token_id=0)


def random_hf_model(cfg: MoEConfig, seed: int = 0):
    """A Qwen3MoeForCausalLM of `cfg` with weights large enough for logits of size 1-10 and
    router scores far enough apart that every token has a clear top K."""
    torch.manual_seed(seed)
    return perturbed(transformers.Qwen3MoeForCausalLM(hf_config(cfg)), seed)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    """(our config, their model, our model with their weights)."""
    cfg = CONFIGS[request.param]
    theirs = random_hf_model(cfg)
    ours = load_hf_weights_into_moe(MoEModel(cfg), theirs.state_dict()).eval()
    return cfg, theirs, ours


@pytest.mark.parametrize("experts", ["eager", "grouped_mm"])  # their loop, their default
def test_logits_match_transformers(pair, experts):
    cfg, theirs, ours = pair
    theirs.set_experts_implementation(experts)
    for shape in [(2, 7), (2, 100)]:
        assert_same_logits(theirs, ours, VOCAB, shape)


def test_router_logits_and_aux_loss_match_transformers(pair):
    cfg, theirs, ours = pair
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 60))
    with torch.no_grad():
        out = theirs(idx, output_router_logits=True)
        ours(idx)
    assert len(ours.router_logits()) == cfg.n_layers
    for mine, their in zip(ours.router_logits(), out.router_logits):
        torch.testing.assert_close(mine, their, atol=1e-5, rtol=0)  # (B * T, E) each
    torch.testing.assert_close(ours.aux_loss(), out.aux_loss, atol=1e-6, rtol=0)
    counts = torch.stack([F.one_hot(r.topk(cfg.num_experts_per_tok).indices, cfg.num_experts)
                          .sum(dim=(0, 1)) for r in ours.router_logits()])
    assert (counts > 0).sum() >= cfg.n_layers * cfg.num_experts // 2  # many experts get tokens


@pytest.mark.parametrize("num_layers,num_tokens,num_experts,top_k",
                         [(1, 5, 4, 1), (3, 40, 8, 2), (2, 33, 16, 4)])
def test_load_balancing_loss_equals_transformers(num_layers, num_tokens, num_experts, top_k):
    torch.manual_seed(num_tokens)
    logits = tuple(torch.randn(num_tokens, num_experts) * 2 for _ in range(num_layers))
    expected = load_balancing_loss_func(logits, num_experts, top_k)
    torch.testing.assert_close(load_balancing_loss(logits, num_experts, top_k), expected,
                               atol=1e-6, rtol=0)


def test_load_balancing_loss_by_hand():
    # two tokens, two experts, one each: f = (1/2, 1/2), P = (1/2, 1/2) -> 2 x (1/4 + 1/4) = 1
    even = torch.tensor([[3.0, -3.0], [-3.0, 3.0]])
    assert load_balancing_loss([even], 2, 1).item() == pytest.approx(1.0)
    # both tokens to expert 0: f = (1, 0), P_0 = softmax(3, -3)[0] -> 2 x P_0, almost 2
    skewed = torch.tensor([[3.0, -3.0], [3.0, -3.0]])
    p0 = torch.softmax(skewed[0], dim=0)[0].item()
    assert load_balancing_loss([skewed], 2, 1).item() == pytest.approx(2 * p0)


def test_aux_loss_trains_the_router():
    model = MoEModel(dataclasses.replace(QWEN3_MOE_TINY, vocab_size=VOCAB, n_layers=1))
    model(torch.randint(0, VOCAB, (2, 16)))
    model.aux_loss().backward()
    router = model.trf_blocks[0].ff.router.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_a_trained_model_can_be_copied():
    model = MoEModel(dataclasses.replace(QWEN3_MOE_TINY, vocab_size=VOCAB, n_layers=1))
    model(torch.randint(0, VOCAB, (1, 8))).sum().backward()  # router logits now in a graph
    copied = copy.deepcopy(model)
    assert copied.trf_blocks[0].ff.router_logits is None
    assert model.trf_blocks[0].ff.router_logits is not None  # the original keeps them


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_moe_feed_forward_is_the_weighted_sum_of_the_chosen_experts(norm_topk_prob):
    torch.manual_seed(3)
    ff = MoEFeedForward(16, 24, num_experts=5, top_k=2, norm_topk_prob=norm_topk_prob)
    x = torch.randn(3, 4, 16)  # (B, T, C)
    with torch.no_grad():
        out = ff(x)
        token = x[1, 2]  # (C,): one token, by hand
        probs = torch.softmax(ff.router.weight @ token, dim=0)  # (E,)
        best = probs.argsort(descending=True)[:2]
        weights = probs[best] / (probs[best].sum() if norm_topk_prob else 1.0)
        expected = sum(w * ff.experts[e].down(F.silu(ff.experts[e].gate.weight @ token)
                                              * (ff.experts[e].up.weight @ token))
                       for w, e in zip(weights, best.tolist()))
    assert out.shape == x.shape
    torch.testing.assert_close(out[1, 2], expected, atol=1e-6, rtol=0)
    assert ff.router_logits.shape == (12, 5)  # (B * T, E)


def test_greedy_generation_matches_transformers_with_and_without_cache(pair):
    cfg, theirs, ours = pair
    torch.manual_seed(4)
    prompt = torch.randint(0, VOCAB, (1, 6))
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt),
                               max_new_tokens=30, do_sample=False)
    assert torch.equal(generate(ours, prompt, 30, context_size=cfg.context_length), expected)
    cached = CachedLlama(ours, min_capacity=16)  # too small on purpose: it has to grow
    assert torch.equal(generate(cached, prompt, 30, context_size=cfg.context_length), expected)
    assert cached.cache.capacity > 16


def test_kv_cache_logits_match_the_full_forward_pass(pair):
    cfg, _, ours = pair
    torch.manual_seed(5)
    idx = torch.randint(0, VOCAB, (2, 24))
    cache = KVCache(cfg.n_layers, capacity=32)
    assert_cache_matches_full_pass(ours, cache, idx, cuts=[10])


def test_loader_refuses_wrong_shapes_and_names_and_leaves_the_model_untouched():
    cfg = CONFIGS["tied-normalised"]
    ours = MoEModel(cfg)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    fewer_experts = random_hf_model(dataclasses.replace(cfg, num_experts=4)).state_dict()
    with pytest.raises(ValueError, match=r"wrong shape: .*model\.layers\.0\.mlp\.experts\."
                                         r"gate_up_proj: file \(4, 192, 64\), model expects "
                                         r"\(8, 192, 64\)"):
        load_hf_weights_into_moe(ours, fewer_experts)
    dense = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32)).state_dict()
    with pytest.raises(ValueError, match=r"missing: \['model\.layers\.0\.mlp\.experts.*"
                                         r"unexpected: \['model\.layers\.0\.mlp\.down_proj"):
        load_hf_weights_into_moe(ours, dense)  # a dense Qwen3 checkpoint
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


def test_config_checks_its_fields():
    with pytest.raises(ValueError, match="cannot exceed num_experts"):
        dataclasses.replace(QWEN3_MOE_TINY, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        dataclasses.replace(QWEN3_MOE_TINY, num_experts=0)
    with pytest.raises(ValueError, match="norm_topk_prob must be True or False"):
        dataclasses.replace(QWEN3_MOE_TINY, norm_topk_prob=1)
    with pytest.raises(ValueError, match="n_kv_groups"):  # LlamaConfig's own checks still run
        dataclasses.replace(QWEN3_MOE_TINY, n_kv_groups=3)
    with pytest.raises(TypeError, match="needs a MoEConfig"):
        MoEModel(QWEN3_TINY)


def test_parameter_counts_of_qwen3_30b_a3b_are_the_published_ones():
    total, active = parameter_counts(QWEN3_30B_A3B)
    assert (total, active) == (30_532_122_624, 3_353_032_704)
    # the model card: "30.5B in total and 3.3B activated", "29.9B non-embedding"; its 3.3B
    # is our 3.353B cut to one decimal (or rounded without the routers' 12.6M)
    embeddings = 2 * 151_936 * 2048  # untied: input table and output head
    assert round(total / 1e9, 1) == 30.5 and round((total - embeddings) / 1e9, 1) == 29.9
    assert int(active / 1e8) / 10 == 3.3 and round((active - 48 * 128 * 2048) / 1e9, 1) == 3.3
    per_layer_idle = (128 - 8) * 3 * 2048 * 768  # the experts a token does not use
    assert total - active == 48 * per_layer_idle
    assert flops_per_token(QWEN3_30B_A3B) == 2 * (active - 151_936 * 2048)


def test_tiny_moe_has_the_active_parameters_of_the_dense_tiny_model():
    moe_total, moe_active = parameter_counts(QWEN3_MOE_TINY)
    dense_total, dense_active = parameter_counts(QWEN3_TINY)
    assert dense_total == dense_active == sum(p.numel() for p in LlamaModel(QWEN3_TINY).parameters())
    assert moe_active - dense_active == QWEN3_TINY.n_layers * 64 * 8  # only the routers
    assert moe_total == sum(p.numel() for p in MoEModel(QWEN3_MOE_TINY).parameters())
    untied = dataclasses.replace(QWEN3_MOE_TINY, tie_embeddings=False)  # one table more
    assert parameter_counts(untied)[0] == moe_total + QWEN3_MOE_TINY.vocab_size * 64


def test_moe_config_reads_the_published_and_the_transformers_5_names(pair):
    cfg, theirs, _ = pair
    written = theirs.config.to_dict()  # transformers 5: num_local_experts
    assert "num_local_experts" in written and moe_config_from_hf(written) == cfg
    published = {k: v for k, v in written.items() if k != "num_local_experts"}
    assert moe_config_from_hf({**published, "num_experts": cfg.num_experts}) == cfg
    with pytest.raises(ValueError, match="decoder_sparse_step=2"):
        moe_config_from_hf({**written, "decoder_sparse_step": 2})


def test_a_sharded_checkpoint_folder_loads_lazily_and_exactly(pair, tmp_path):
    cfg, theirs, _ = pair
    theirs.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards and an index
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_moe_checkpoint(tmp_path, dtype=torch.float32)
    assert model.cfg == cfg and not model.training
    assert_same_logits(theirs, model, VOCAB, shape=(2, 20))
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of the"):
        load_moe_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_moe_checkpoint(tmp_path / "nowhere")
