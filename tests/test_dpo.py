"""utils/dpo.py: the DPO loss against a hand computation, the masking of prompt and padding,
gradients that reach only the policy, a reference that training leaves unchanged, and a
reward margin that grows on a tiny model."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from utils.dpo import (PreferenceDataset, dpo_loss, dpo_loss_batch, evaluate_dpo_loader,
                       frozen_reference, logprob_margins, pair_logprobs,
                       preference_collate_fn, response_logprobs, train_model_dpo_simple)
from utils.instruct import RESPONSE_HEADER, format_input
from utils.model import GPT_TINY, GPTModel

PAD = 50256  # GPT-2's end-of-text token, the collate's default padding
SMALL_PAD = 127  # the padding and end token of the bigram model's small vocabulary


class CharTokenizer:
    """One token per character (IDs below 256): enough to test the dataset offline."""

    def encode(self, text, **kwargs):
        return [ord(c) % 256 for c in text]


class BigramModel(nn.Module):
    """Logits at position t depend only on token t, so the tests can see which positions
    a log-probability reads."""

    def __init__(self, vocab_size=SMALL_PAD + 1):
        super().__init__()
        torch.manual_seed(123)
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx):
        return self.table(idx)  # (B, T, V)


def item(prompt, chosen, rejected):
    return {"prompt_length": len(prompt), "chosen": prompt + chosen, "rejected": prompt + rejected}


TOY_BATCH = [item([1, 2, 3], [4, 5], [6]), item([7, 8], [9, 10, 11], [12, 13])]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- the loss ---------------------------------------------------------------------------

def test_dpo_loss_equals_a_hand_computation():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.4])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -0.6]), torch.tensor([-1.8, -0.3])
    beta = 0.1
    loss, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected,
                                                      ref_chosen, ref_rejected, beta)
    # pair 1: beta * ((-1.0 + 1.5) - (-2.0 + 1.8)) = 0.1 * 0.7; pair 2: 0.1 * (0.1 - -0.1)
    expected = (-math.log(sigmoid(0.07)) - math.log(sigmoid(0.02))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.05, 0.01], abs=1e-6)
    assert rejected_rewards.tolist() == pytest.approx([-0.02, -0.01], abs=1e-6)


def test_dpo_loss_beta_scales_the_margin_and_ties_give_log_2():
    same = torch.tensor([-1.0, -3.0])
    loss, chosen, rejected = dpo_loss(same, same - 1, same, same - 1, beta=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert chosen.abs().max().item() == 0.0 and rejected.abs().max().item() == 0.0
    strong = dpo_loss(torch.tensor([0.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1),
                      beta=2.0)[0]
    assert strong.item() == pytest.approx(-math.log(sigmoid(2.0)), abs=1e-6)


def test_the_loss_falls_as_the_policy_prefers_the_chosen_response():
    ref = torch.zeros(1)
    losses = [dpo_loss(torch.tensor([m]), torch.tensor([-m]), ref, ref)[0].item()
              for m in (-1.0, 0.0, 1.0, 5.0)]
    assert losses == sorted(losses, reverse=True) and losses[0] > math.log(2) > losses[-1]


def test_response_logprobs_equal_a_hand_computation():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [2.0, 1.0, 1.0]]])  # (1, 3, 3)
    targets = torch.tensor([[-100, 2, 0]])  # the first position belongs to the prompt
    log_p = [math.log(math.exp(3.0) / (2 + math.exp(3.0))),
             math.log(math.exp(2.0) / (math.exp(2.0) + 2 * math.exp(1.0)))]
    total = response_logprobs(logits, targets, average=False)
    mean = response_logprobs(logits, targets)
    assert total.item() == pytest.approx(sum(log_p), abs=1e-5)
    assert mean.item() == pytest.approx(sum(log_p) / 2, abs=1e-5)


# --- the data and the masking -----------------------------------------------------------

def test_dataset_puts_the_response_after_the_prompt():
    entry = {"instruction": "Say hi.", "input": "", "output": "Hi.", "chosen": "Hello!",
             "rejected": "What."}
    tok = CharTokenizer()
    [encoded] = PreferenceDataset([entry], tok)
    prompt = tok.encode(format_input(entry) + RESPONSE_HEADER)
    assert encoded["prompt_length"] == len(prompt)
    assert encoded["chosen"] == prompt + tok.encode("Hello!")
    assert encoded["rejected"] == prompt + tok.encode("What.")


def test_collate_masks_prompt_and_padding_and_keeps_one_end_token():
    inputs, targets = preference_collate_fn(TOY_BATCH)
    assert inputs.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11],
                               [1, 2, 3, 6, PAD], [7, 8, 12, 13, PAD]]
    assert targets.tolist() == [[-100, -100, 4, 5, PAD], [-100, 9, 10, 11, PAD],
                                [-100, -100, 6, PAD, -100], [-100, 12, 13, PAD, -100]]


def test_collate_truncates_into_the_response_but_refuses_a_response_cut_off_entirely():
    inputs, targets = preference_collate_fn([item(list(range(10)), [20, 21], [22])],
                                            allowed_max_length=10)
    assert inputs.shape == targets.shape == (2, 10)
    assert targets[:, -1].tolist() == [20, 22]  # one response token left in each row
    # a prompt longer than the context leaves nothing to score: refused, naming the entry
    entries = [{"instruction": "Hi.", "chosen": "Yes.", "rejected": "No."},
               {"instruction": "x" * 50, "chosen": "Yes.", "rejected": "No."}]
    dataset = PreferenceDataset(entries, CharTokenizer())
    context = dataset[0]["prompt_length"] + 5  # entry 0 fits, entry 1's prompt does not
    with pytest.raises(ValueError, match=rf"entry 1: its prompt has \d+ tokens, so "
                                         rf"allowed_max_length={context} cuts off .*raise "
                                         rf"allowed_max_length .*or shorten"):
        preference_collate_fn([dataset[0], dataset[1]], allowed_max_length=context)
    preference_collate_fn([dataset[0]], allowed_max_length=context)  # entry 0 alone fits
    with pytest.raises(ValueError, match="pair 0 of the batch"):  # items made by hand
        preference_collate_fn([item(list(range(10)), [20, 21], [22])], allowed_max_length=6)
    # a response with nothing left but its end token is still scored on ending
    assert (preference_collate_fn([item(list(range(10)), [20], [22])],
                                  allowed_max_length=10)[1][:, -1] == 20).any()


def test_response_logprobs_of_a_row_without_targets_is_0():
    logprobs = response_logprobs(torch.randn(2, 6, PAD + 1), torch.full((2, 6), -100))
    assert logprobs.tolist() == [0.0, 0.0]  # nothing to score: no NaN, no crash


def test_dataset_names_the_entry_and_the_keys_it_lacks():
    good = {"instruction": "Say hi.", "input": "", "chosen": "Hello!", "rejected": "What."}
    no_input = {k: v for k, v in good.items() if k != "input"}  # "input" is optional
    assert len(PreferenceDataset([good, no_input], CharTokenizer())) == 2
    lacking = {"instruction": "Say hi.", "chosen": "Hello!"}
    with pytest.raises(ValueError, match=r"entry 2 of the preference data lacks \['rejected'\]"
                                         r".*'instruction', 'chosen', 'rejected'.*'input'"):
        PreferenceDataset([good, no_input, lacking], CharTokenizer())
    with pytest.raises(ValueError, match=r"entry 0: 'chosen' must be a text \(str\), got int"):
        PreferenceDataset([{**good, "chosen": 3}], CharTokenizer())
    with pytest.raises(ValueError, match="entry 0 .* is a str"):
        PreferenceDataset(["Say hi."], CharTokenizer())


def logprobs_of(model, batch, pad_token_id=PAD):
    inputs, targets = preference_collate_fn(batch, pad_token_id=pad_token_id)
    chosen, rejected = pair_logprobs(model, inputs, targets)
    return torch.cat([chosen, rejected])


def test_prompt_and_padding_tokens_are_not_scored_but_response_tokens_are():
    model = BigramModel()
    with torch.no_grad():
        def scored(batch):
            return logprobs_of(model, batch, pad_token_id=SMALL_PAD)

        base = scored(TOY_BATCH)
        # a prompt token before the last one predicts only prompt tokens: masked
        changed_prompt = [item([99, 2, 3], [4, 5], [6]), TOY_BATCH[1]]
        assert torch.equal(scored(changed_prompt), base)
        # padding inputs (after the end token) predict nothing that counts
        inputs, targets = preference_collate_fn(TOY_BATCH, pad_token_id=SMALL_PAD)
        inputs[2, -1] = 123  # the rejected response of pair 1 is padded at the end
        chosen, rejected = pair_logprobs(model, inputs, targets)
        assert torch.equal(torch.cat([chosen, rejected]), base)
        # a response token is scored
        changed_response = [item([1, 2, 3], [4, 77], [6]), TOY_BATCH[1]]
        new = scored(changed_response)
        assert new[0] != base[0] and torch.equal(new[1:], base[1:])
        # so is the last prompt token, which predicts the first response token
        changed_last = [item([1, 2, 99], [4, 5], [6]), TOY_BATCH[1]]
        assert scored(changed_last)[0] != base[0]


def test_a_pairs_logprobs_do_not_depend_on_the_padding_of_its_batch():
    torch.manual_seed(123)
    model = GPTModel(GPT_TINY).eval()
    short = item([5, 6, 7], [8, 9], [10])
    long = item(list(range(20, 40)), list(range(40, 55)), [60])
    with torch.no_grad():
        alone = logprobs_of(model, [short])
        padded = logprobs_of(model, [short, long])[[0, 2]]  # chosen and rejected of `short`
    assert torch.allclose(alone, padded, atol=1e-5)


# --- policy, reference and training -----------------------------------------------------

def tiny_policy_and_reference():
    torch.manual_seed(123)
    policy = GPTModel(GPT_TINY)
    return policy, frozen_reference(policy)


def random_pairs(n=8, seed=123):
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(0, 200, (6,), generator=gen).tolist()
        chosen = torch.randint(0, 200, (4,), generator=gen).tolist()
        rejected = torch.randint(0, 200, (5,), generator=gen).tolist()
        pairs.append(item(prompt, chosen, rejected))
    return pairs


def test_frozen_reference_is_an_equal_but_separate_copy():
    policy, reference = tiny_policy_and_reference()
    assert not reference.training
    assert all(not p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    for (name, p), q in zip(policy.named_parameters(), reference.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name


def test_gradients_reach_only_the_policy():
    torch.manual_seed(123)
    policy = GPTModel(GPT_TINY)
    reference = copy.deepcopy(policy)  # even with requires_grad left on, nothing flows there
    with torch.no_grad():  # make the two differ, so the loss has a gradient to give
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs, targets = preference_collate_fn(random_pairs(4))
    loss, _, _ = dpo_loss_batch(policy, reference, inputs, targets, beta=0.1)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_training_grows_the_margin_and_leaves_the_reference_unchanged():
    policy, reference = tiny_policy_and_reference()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    torch.manual_seed(123)
    loader = torch.utils.data.DataLoader(random_pairs(8), batch_size=4, shuffle=True,
                                         collate_fn=preference_collate_fn)
    start = evaluate_dpo_loader(policy, reference, loader, beta=0.1)
    assert start["loss"] == pytest.approx(math.log(2), abs=1e-6) and start["margin"] == 0.0
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    history = train_model_dpo_simple(policy, reference, loader, loader, optimizer, "cpu",
                                     num_epochs=3, beta=0.1, eval_freq=2, eval_iter=2,
                                     verbose=False)
    assert history["step"] == [0, 2, 4]
    assert set(history.records[-1]) >= {"train_loss", "val_loss", "train_margin", "val_margin",
                            "train_chosen_reward", "train_rejected_reward",
                            "val_chosen_reward", "val_rejected_reward"}
    margins = history["train_margin"]
    assert 0 < margins[0] < margins[-1]  # the margin grows step by step
    assert 0.05 < history["train_loss"][-1] < 0.65  # below log 2 = 0.693
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(),
                                                        reference.parameters()))


def test_a_reference_that_shares_the_policys_weights_is_refused():
    policy, _ = tiny_policy_and_reference()
    loader = [preference_collate_fn(random_pairs(2))]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="shares parameters"):
        train_model_dpo_simple(policy, policy, loader, loader, optimizer, "cpu", num_epochs=1,
                               beta=0.1, eval_freq=1, eval_iter=1, verbose=False)


class CountingOptimizer:
    """Counts the optimizer steps a training loop takes."""

    def __init__(self):
        self.steps = 0

    def zero_grad(self):
        pass

    def step(self):
        self.steps += 1


@pytest.mark.parametrize("beta", [-1.0, 0, 0.0, float("nan"), float("inf"), True, "0.1"])
def test_a_beta_that_is_not_a_finite_number_above_0_is_refused(beta):
    ref = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be a finite number above 0.*beta=0.1"):
        dpo_loss(torch.tensor([0.0, 1.0]), torch.tensor([-1.0, 0.0]), ref, ref, beta)
    model = BigramModel()
    inputs, targets = preference_collate_fn(TOY_BATCH, pad_token_id=SMALL_PAD)
    with pytest.raises(ValueError, match="beta must be a finite number above 0"):
        dpo_loss_batch(model, frozen_reference(model), inputs, targets, beta=beta)
    optimizer = CountingOptimizer()
    with pytest.raises(ValueError, match="beta must be a finite number above 0"):
        train_model_dpo_simple(model, frozen_reference(model), [(inputs, targets)], [],
                               optimizer, "cpu", num_epochs=1, beta=beta, eval_freq=1,
                               eval_iter=1, verbose=False)
    assert optimizer.steps == 0


@pytest.mark.parametrize("name, value", [("eval_freq", 0), ("eval_freq", True),
                                         ("eval_freq", 2.0), ("eval_iter", 0),
                                         ("eval_iter", None), ("num_epochs", 0),
                                         ("num_epochs", -1), ("num_epochs", False)])
def test_training_checks_its_counts_before_the_first_step(name, value):
    model = BigramModel()
    loader = [preference_collate_fn(TOY_BATCH, pad_token_id=SMALL_PAD)]
    optimizer = CountingOptimizer()
    settings = {"num_epochs": 1, "eval_freq": 1, "eval_iter": 1, name: value}
    with pytest.raises(ValueError, match=rf"{name} must be a whole number of at least 1, "
                                         rf"got {value!r}; pass e.g. {name}=5"):
        train_model_dpo_simple(model, frozen_reference(model), loader, loader, optimizer,
                               "cpu", beta=0.1, verbose=False, **settings)
    assert optimizer.steps == 0  # refused before any training step


def test_logprob_margins_count_the_pairs_the_model_prefers():
    model = BigramModel()
    loader = [preference_collate_fn(TOY_BATCH, pad_token_id=SMALL_PAD)]
    margins = logprob_margins(model, loader)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, *loader[0])
    assert margins.shape == (2,) and torch.allclose(margins, chosen - rejected)
