"""What the parity tests of chapters 9 and 10 share: a random Hugging Face model made to give
logits of size 1-10 (so that a comparison is not one of numbers near zero), and the two
checks every model of ours passes against it and against itself."""

import torch


def perturbed(model, seed: int = 0):
    """`model` in eval mode with noise added to its weights (more to the norms' scales): larger
    logits and, for routers, clear winners."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.1))
    return model.eval()


def assert_same_logits(theirs, ours, vocab_size: int, shape=(2, 150), seed: int = 1) -> None:
    """Our logits within 1e-5 of theirs on random tokens, and theirs not all near zero."""
    torch.manual_seed(seed)
    idx = torch.randint(0, vocab_size, shape)
    with torch.no_grad():
        expected = theirs(idx).logits
        torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1.0


def assert_cache_matches_full_pass(ours, cache, idx: torch.Tensor, cuts: list[int]) -> None:
    """Feeding `idx` through `cache` in pieces (cut at `cuts`, then one token at a time) gives
    the logits of one full pass without a cache."""
    bounds = [0, *cuts]
    with torch.no_grad():
        full = ours(idx)
        chunks = [ours(idx[:, a:b], cache) for a, b in zip(bounds, bounds[1:])]
        chunks += [ours(idx[:, t:t + 1], cache) for t in range(bounds[-1], idx.shape[1])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=0)
