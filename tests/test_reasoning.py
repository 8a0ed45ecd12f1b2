"""utils/reasoning.py: the task and its worked solutions, the verifier on tricky responses,
supervised finetuning's masks, batched sampling against one prompt at a time, majority
voting, GRPO's advantages and clipped objective against hand computations (values and
gradients), a GRPO and a rejection-sampling round, a short GRPO run that lifts held-out
accuracy, a GRPO round on chapter 9's Qwen3, and the full-run command's file handling."""

import dataclasses
import json
import math

import pytest
import torch

from utils.cli.reasoning_run import main as reasoning_run_main
from utils.cli.reasoning_run import write_json_atomically
from utils.llama import QWEN3_TINY, CachedLlama, LlamaModel
from utils.model import GPTModel
from utils.reasoning import (ARITHMETIC_TOKENIZER, MAX_RESPONSE, METHODS, REASONING_TINY,
                             CharTokenizer, Problem, RLConfig, accuracy, chapter_problems,
                             compare_methods, extract_answer, grpo_loss, grpo_round, grpo_step,
                             group_advantages, majority_vote, make_problems, policy_update,
                             response_mask, reward, rft_step, rl_log_line, sample_ids,
                             sample_responses, self_consistency, sft_batch, token_logprobs,
                             train_rl, train_sft)

TOK = ARITHMETIC_TOKENIZER


@pytest.fixture(scope="module")
def problem_sets():
    return chapter_problems()


@pytest.fixture(scope="module")
def start_model(problem_sets):
    """The chapter's starting model, with fewer supervised steps: right on some problems."""
    torch.manual_seed(123)
    model = GPTModel(REASONING_TINY)
    train_sft(model, problem_sets[1], TOK, steps=250)
    return model


def random_model(seed=0):
    torch.manual_seed(seed)
    return GPTModel(REASONING_TINY).eval()


# -- the task --------------------------------------------------------------------------------

def test_tokenizer_round_trip_and_errors():
    text = "357+468=7+8+0=15,5+6+1=12,3+4+1=8>825."
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.n_vocab == 15 and TOK.decode([TOK.end_id]) == "."
    with pytest.raises(ValueError, match="not in this tokenizer's alphabet"):
        TOK.encode("3 + 4")
    with pytest.raises(ValueError, match="distinct characters"):
        CharTokenizer("0012", end="1")
    with pytest.raises(ValueError, match="end character"):
        CharTokenizer("012", end=".")


def test_worked_solutions():
    assert Problem(357, 468).prompt == "357+468="
    assert Problem(357, 468).solution() == "7+8+0=15,5+6+1=12,3+4+1=8>825."
    assert Problem(7, 250).prompt == "007+250="
    assert Problem(999, 1).solution() == "9+1+0=10,9+0+1=10,9+0+1=10>1000."
    assert Problem(12, 34, digits=2).solution() == "2+4+0=6,1+3+0=4>46."
    for p in make_problems(300, seed=5):  # every worked solution ends in the right answer
        assert extract_answer(p.solution()) == p.answer == p.a + p.b
        assert len(p.prompt + p.solution()) <= REASONING_TINY.context_length


def test_problem_sets_are_seeded_distinct_and_disjoint(problem_sets):
    assert make_problems(50, seed=3) == make_problems(50, seed=3) != make_problems(50, seed=4)
    held_out, sft, rl = problem_sets
    assert (len(held_out), len(sft), len(rl)) == (200, 20_000, 5_000)
    sets = [set(held_out), set(sft), set(rl)]
    assert [len(s) for s in sets] == [200, 20_000, 5_000]  # no repeats within a set
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert max(len(p.solution()) for p in sft) <= MAX_RESPONSE
    with pytest.raises(ValueError, match="only 100 problems"):
        make_problems(101, seed=0, digits=1)


# -- the verifier ----------------------------------------------------------------------------

@pytest.mark.parametrize("response, answer", [
    ("7+8+0=15,5+6+1=12,3+4+1=8>825.", 825),
    ("7+8+0=14,5+6+1=12,3+4+1=8>825.", 825),  # wrong work, right answer: still 825
    ("7+8+0=15>815,5+6+1=12,3+4+1=8>825.", 825),  # the last answer counts
    ("7+8+0=15,5+6+1=12,3+4+1=8>825>826.", 826),
    ("...>825 . ", 825),  # spaces around the end mark
    (">825", 825),  # no end mark (cut off after the answer)
    ("7+8+0=15,5+6+1=12>825,3+4+1=8.", None),  # work after the answer
    ("7+8+0=15,5+6+1=12,3+4+1=8.", None),  # no answer
    ("", None),
    ("> -3.", -3),
])
def test_extract_answer_on_tricky_responses(response, answer):
    assert extract_answer(response) == answer


def test_reward():
    p = Problem(357, 468)
    assert reward(p, p.solution()) == 1.0
    assert reward(p, "7+8+0=15,5+6+1=12,3+4+1=8>826.") == 0.0
    assert reward(p, "7+8+0=15,5+6+1=12>825,3+4+1=8.") == 0.0


# -- supervised finetuning -------------------------------------------------------------------

def test_sft_batch_masks_the_prompt_and_the_padding():
    problems = [Problem(357, 468), Problem(999, 1)]
    inputs, targets = sft_batch(problems, TOK)
    width = len(problems[1].prompt + problems[1].solution()) - 1  # inputs stop before the end
    assert inputs.shape == targets.shape == (2, width)
    row = targets[0].tolist()
    assert row[:7] == [-100] * 7  # the prompt's targets (8 tokens, the last predicts the response)
    response = problems[0].solution()
    assert TOK.decode(row[7:7 + len(response)]) == response  # the end mark is a target, once
    assert row[7 + len(response):] == [-100] * (width - 7 - len(response))
    assert TOK.decode(inputs[0, :8].tolist()) == "357+468="
    _, bare = sft_batch(problems[:1], TOK, worked=False)
    assert TOK.decode([t for t in bare[0].tolist() if t >= 0]) == ">825."


def test_train_sft_lowers_the_loss():
    model = random_model()
    losses = train_sft(model, make_problems(500, seed=9), TOK, steps=40, batch_size=16)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


# -- sampling --------------------------------------------------------------------------------

class FixedModel(torch.nn.Module):
    """Always predicts `token` next: to test where sampling cuts and ends responses."""

    def __init__(self, token):
        super().__init__()
        self.token = token
        self.cfg = REASONING_TINY
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        logits = torch.full((*idx.shape, REASONING_TINY.vocab_size), -10.0)
        logits[..., self.token] = 10.0
        return logits


def test_sample_ids_keeps_the_end_token_and_cuts_after_it():
    prompt = torch.tensor([TOK.encode("357+468=")] * 2)
    ended = sample_ids(FixedModel(TOK.end_id), prompt, 10, 0.0, TOK.end_id)
    assert ended == [[TOK.end_id], [TOK.end_id]]  # generate dropped it; put back
    never = sample_ids(FixedModel(3), prompt, 10, 0.0, TOK.end_id)
    assert never == [[3] * 10, [3] * 10]  # cut off at the limit: no end token added


def test_batched_sampling_equals_one_prompt_at_a_time():
    model = random_model(1)
    # prompts of two lengths (2- and 3-digit problems) go in two batches
    prompts = [p.prompt for p in make_problems(3, seed=1) + make_problems(3, seed=2, digits=2)]
    batched = sample_responses(model, prompts, TOK, num_samples=2)
    singles = [sample_responses(model, [p], TOK)[0] for p in prompts]
    assert [b[0] for b in batched] == [s[0] for s in singles]
    assert all(b[0] == b[1] for b in batched)  # greedy: both samples alike
    assert all(len(r) <= MAX_RESPONSE for b in batched for r in b)


def test_accuracy_counts_verified_greedy_answers(start_model, problem_sets):
    held_out = problem_sets[0][:50]
    responses = sample_responses(start_model, [p.prompt for p in held_out], TOK)
    right = sum(extract_answer(r[0]) == p.answer for p, r in zip(held_out, responses))
    assert accuracy(start_model, held_out, TOK) == right / 50
    assert 0.1 <= right / 50 <= 0.8  # the starting model: right sometimes, not always


def test_majority_vote():
    assert majority_vote([">5.", ">7.", ">7.", "no answer"]) == 7
    assert majority_vote([">5.", ">7."]) == 5  # a tie goes to the first answer given
    assert majority_vote(["5+1=6.", ""]) is None
    assert majority_vote(["x", ">3.", "y"]) == 3  # responses without an answer do not vote


def test_self_consistency_votes_over_the_first_k_samples(start_model, problem_sets):
    held_out = problem_sets[0][:20]
    torch.manual_seed(5)
    results = self_consistency(start_model, held_out, TOK, [1, 3], temperature=0.7)
    torch.manual_seed(5)
    samples = sample_responses(start_model, [p.prompt for p in held_out], TOK, 3, 0.7)
    for k in (1, 3):
        votes = [majority_vote(s[:k]) == p.answer for p, s in zip(held_out, samples)]
        assert results[k]["accuracy"] == sum(votes) / 20
        assert results[k]["tokens"] == sum(len(r) for s in samples for r in s[:k]) / 20


# -- GRPO ------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0, 0, 1, 0, 0, 0, 0], [1.0] * 8])
    adv = group_advantages(rewards)
    std = math.sqrt((2 * 0.75**2 + 6 * 0.25**2) / 7)  # Bessel-corrected
    assert adv[0, 0].item() == pytest.approx(0.75 / std, abs=1e-3)
    assert adv[0, 1].item() == pytest.approx(-0.25 / std, abs=1e-3)
    assert torch.equal(adv[1], torch.zeros(8))  # all alike: nothing to learn
    assert adv.sum(dim=1).abs().max() < 1e-5
    shifted = group_advantages(torch.tensor([[0.5, 1.5, 0.5, 1.5]]))
    assert torch.allclose(shifted, group_advantages(torch.tensor([[0.0, 1.0, 0.0, 1.0]])))


def test_response_mask():
    e = TOK.end_id
    responses = torch.tensor([[1, 2, e, e, e], [1, e, 3, e, e], [1, 2, 3, 4, 5], [e, e, e, e, e]])
    assert response_mask(responses, e).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0],
                                                    [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_token_logprobs_match_a_loop():
    model = random_model(2)
    sequences = torch.tensor([TOK.encode("357+468=7+8+0=15."), TOK.encode("111+222=1+2+0=3..")])
    got = token_logprobs(model, sequences, prompt_len=8)
    assert got.shape == (2, sequences.shape[1] - 8)
    with torch.no_grad():
        for row in range(2):
            for t in range(8, sequences.shape[1]):
                logits = model(sequences[row:row + 1, :t])[0, -1]
                want = torch.log_softmax(logits, -1)[sequences[row, t]]
                assert got[row, t - 8].item() == pytest.approx(want.item(), abs=1e-5)


def k3(ref_p, new_p):
    return ref_p / new_p - math.log(ref_p / new_p) - 1


def test_grpo_loss_by_hand():
    new = torch.log(torch.tensor([[0.7, 0.45, 0.9], [0.2, 0.55, 0.3]]))
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    ref = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.4, 0.4]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's third token is padding
    adv = torch.tensor([1.0, -0.5])
    loss, stats = grpo_loss(new, old, ref, adv, mask, clip_eps=0.2, kl_coef=0.1)
    row0 = (min(1.4, 1.2) - 0.1 * k3(0.5, 0.7) + min(0.9, 0.9) - 0.1 * k3(0.5, 0.45)) / 2
    # negative advantage: min(ratio * A, clip(ratio) * A) picks the larger |.|
    row1 = (min(0.4 * -0.5, 0.8 * -0.5) - 0.1 * k3(0.4, 0.2)
            + min(1.1 * -0.5, 1.1 * -0.5) - 0.1 * k3(0.4, 0.55)
            + min(0.6 * -0.5, 0.8 * -0.5) - 0.1 * k3(0.4, 0.3)) / 3
    assert loss.item() == pytest.approx(-(row0 + row1) / 2, abs=1e-5)
    kl0 = (k3(0.5, 0.7) + k3(0.5, 0.45)) / 2
    kl1 = (k3(0.4, 0.2) + k3(0.4, 0.55) + k3(0.4, 0.3)) / 3
    assert stats["kl"] == pytest.approx((kl0 + kl1) / 2, abs=1e-5)
    assert stats["clip_frac"] == pytest.approx(3 / 5)  # 1.4, 0.4 and 0.6 lie outside [0.8, 1.2]
    no_ref, stats = grpo_loss(new, old, None, adv, mask, kl_coef=0.1)
    assert stats["kl"] == 0.0 and no_ref.item() < loss.item()


def test_grpo_loss_gradients():
    # At the sampling policy (ratio 1, no KL) the gradient is the policy gradient:
    # -A / (tokens of the response) for every token's log-probability.
    logps = torch.log(torch.tensor([[0.3, 0.6], [0.5, 0.5]])).requires_grad_()
    mask = torch.ones(2, 2)
    loss, _ = grpo_loss(logps, logps.detach(), None, torch.tensor([2.0, -1.0]), mask, kl_coef=0)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-0.5, -0.5], [0.25, 0.25]]))
    # A clipped token gets no gradient from the surrogate; the KL term still pulls it.
    new = torch.log(torch.tensor([[0.7, 0.5]])).requires_grad_()
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    loss, _ = grpo_loss(new, old, None, torch.tensor([1.0]), torch.ones(1, 2), kl_coef=0)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0 and new.grad[0, 1].item() == pytest.approx(-0.5)
    new.grad = None
    ref = torch.log(torch.tensor([[0.5, 0.5]]))
    loss, _ = grpo_loss(new, old, ref, torch.tensor([1.0]), torch.ones(1, 2), kl_coef=1.0)
    loss.backward()  # d/dnew of k3 = 1 - exp(ref - new); the loss has +KL / 2
    assert new.grad[0, 0].item() == pytest.approx((1 - 0.5 / 0.7) / 2, abs=1e-5)


def test_policy_update_moves_only_the_policy():
    policy, reference = random_model(3), random_model(3)
    sequences = torch.tensor([TOK.encode("357+468=>825."), TOK.encode("357+468=>824.")])
    mask = torch.ones(2, 5)
    before_ref = [p.clone() for p in reference.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    with torch.no_grad():
        start = token_logprobs(policy, sequences, 8).sum(dim=1)
    stats = policy_update(policy, reference, optimizer, sequences, 8,
                          torch.tensor([1.0, -1.0]), mask, RLConfig(updates=3))
    with torch.no_grad():
        end = token_logprobs(policy, sequences, 8).sum(dim=1)
    assert end[0] > start[0] and end[1] < start[1]  # the better response became likelier
    assert all(torch.equal(a, b) for a, b in zip(before_ref, reference.parameters()))
    assert stats["kl"] > 0 and set(stats) == {"loss", "kl", "clip_frac"}


def test_grpo_and_rft_rounds(start_model, problem_sets):
    from utils.dpo import frozen_reference
    cfg = RLConfig(prompts_per_step=4, group_size=4)
    problems = problem_sets[2][:4]
    for step in (grpo_step, rft_step):
        policy = GPTModel(REASONING_TINY)
        policy.load_state_dict(start_model.state_dict())
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        torch.manual_seed(0)
        stats = step(policy, frozen_reference(start_model), optimizer, problems, TOK, cfg)
        assert 0.0 <= stats["reward"] <= 1.0 and 1 <= stats["length"] <= MAX_RESPONSE
        moved = any(not torch.equal(a, b) for a, b in
                    zip(policy.parameters(), start_model.parameters()))
        assert moved == (stats["reward"] not in (0.0, 1.0) or step is rft_step
                         and stats["reward"] > 0)


def test_rft_without_a_right_answer_changes_nothing():
    from utils.dpo import frozen_reference
    policy = random_model(4)  # untrained: never right
    before = [p.clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = rft_step(policy, frozen_reference(policy), optimizer, make_problems(2, seed=0), TOK,
                     RLConfig(group_size=2))
    assert stats["reward"] == 0.0 and math.isnan(stats["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_a_short_grpo_run_lifts_held_out_accuracy(start_model, problem_sets):
    held_out, _, rl = problem_sets
    before = [p.clone() for p in start_model.parameters()]
    results = compare_methods(start_model, rl, held_out[:100], TOK,
                              RLConfig(steps=20, eval_every=10), methods=["GRPO with KL"],
                              progress=False)
    history = results["GRPO with KL"]["history"]
    assert [r["step"] for r in history if "accuracy" in r] == [0, 10, 20]
    assert history[-1]["accuracy"] >= history[0]["accuracy"] + 0.05
    assert all(torch.equal(a, b) for a, b in zip(before, start_model.parameters()))
    assert "held-out accuracy" in rl_log_line("GRPO with KL", history[-1])


def test_train_rl_rejects_an_unknown_method(start_model, problem_sets):
    with pytest.raises(ValueError, match="unknown method 'PPO'"):
        train_rl(start_model, problem_sets[2], problem_sets[0], TOK, method="PPO")
    assert set(METHODS) == {"rejection sampling (RFT)", "GRPO with KL", "GRPO without KL"}


def test_grpo_round_on_qwen3():
    torch.manual_seed(0)
    cfg = dataclasses.replace(QWEN3_TINY, vocab_size=TOK.n_vocab, context_length=64)
    policy = LlamaModel(cfg)
    reference = LlamaModel(cfg).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    before = [p.clone() for p in policy.parameters()]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    prompt = TOK.encode("357+468=")
    rl = RLConfig(group_size=6, temperature=1.0)
    stats = grpo_round(policy, reference, optimizer, CachedLlama(policy), prompt,
                       lambda text: float("7" in text), TOK.decode, TOK.end_id, rl,
                       max_new_tokens=12)
    assert 0.0 <= stats["reward"] <= 1.0 and 1 <= stats["length"] <= 12
    changed = any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert changed == (0.0 < stats["reward"] < 1.0)


# -- the full-run command --------------------------------------------------------------------

def test_full_run_command_keeps_an_existing_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("earlier run")
    with pytest.raises(SystemExit):
        reasoning_run_main(["--json", str(path), "--rl-steps", "1"])
    assert path.read_text() == "earlier run"
    with pytest.raises(SystemExit):
        reasoning_run_main(["--rl-steps", "0"])


def test_results_are_written_whole_with_nan_as_null(tmp_path):
    path = tmp_path / "out" / "run.json"
    write_json_atomically({"kl": float("nan"), "history": [{"kl": float("nan"), "a": 1.5}]}, path)
    assert json.loads(path.read_text()) == {"kl": None, "history": [{"kl": None, "a": 1.5}]}
    with pytest.raises(TypeError):  # something JSON cannot hold: the earlier file stays
        write_json_atomically({"x": object()}, path)
    assert json.loads(path.read_text())["history"][0]["a"] == 1.5
    assert [p.name for p in path.parent.iterdir()] == ["run.json"]
