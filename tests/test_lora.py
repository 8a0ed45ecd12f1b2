"""utils/lora.py: LoRA starts as a no-op, trains only its own parameters, and merges exactly."""

import pytest
import torch

from utils.lora import LinearWithLoRA, LoRALayer, merge_lora, replace_linear_with_lora
from utils.model import GPT_TINY, GPTModel

IDX = torch.tensor([[3, 14, 15, 92, 65, 35]])


def tiny():
    torch.manual_seed(0)
    return GPTModel(GPT_TINY).eval()


def test_output_equals_the_base_model_at_initialisation():
    model = tiny()
    with torch.no_grad():
        base = model(IDX)
        replace_linear_with_lora(model, rank=4, alpha=8)
        assert torch.equal(model(IDX), base)  # B is zero, so the update is exactly zero
    assert all(torch.count_nonzero(m.lora.B) == 0 for m in model.modules()
               if isinstance(m, LinearWithLoRA))


def test_every_linear_is_wrapped_and_only_lora_parameters_train():
    model = tiny()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=4, alpha=8)
    wrapped = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(wrapped) == n_linear == 2 * 6 + 1  # q, k, v, out_proj, 2 MLP layers; head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora.A", "lora.B")) for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        4 * (m.linear.in_features + m.linear.out_features) for m in wrapped)


def test_merged_model_equals_unmerged():
    model = tiny()
    replace_linear_with_lora(model, rank=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_(std=0.05)  # as if trained
        unmerged = model(IDX)
        merge_lora(model)
        merged = model(IDX)
    assert not any(isinstance(m, (LinearWithLoRA, LoRALayer)) for m in model.modules())
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(unmerged, tiny()(IDX), atol=1e-3)  # the update mattered


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank"):
        LoRALayer(4, 4, rank=0, alpha=1)
