"""The LaTRO objective, checked against hand-worked numbers and brute-force computations.

The brute force scores every sequence with a plain full-vocabulary log_softmax over model(tokens) - no fused
scoring, no spans helper - and builds the loss from the paper's formulas directly.
"""
import copy

import pytest
import torch

import latro
from latro import LatroConfig, cut_rationale, rloo_advantages, adjusted_reward, penalised_reward, latro_loss
from model import load


# ------------------------------------------------------------------------------------------------------------
# Hand-worked numbers

def test_rloo_advantages_hand_worked():
    # one question, K = 4, r = [1, 2, 3, 6]: leave-one-out means are 11/3, 10/3, 9/3, 6/3
    a = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4)
    assert torch.allclose(a, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    # two questions of K = 2: A = +-(r1 - r2) / 1 within each pair, and questions do not mix
    a = rloo_advantages(torch.tensor([0.0, 1.0, 10.0, 4.0]), 2)
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, 6.0, -6.0]))
    # RLOO advantages of a group always sum to 0 (they are K/(K-1) times the group-centred rewards)
    assert torch.allclose(rloo_advantages(torch.randn(12), 3).view(4, 3).sum(1), torch.zeros(4), atol=1e-6)
    # equal rewards (a group whose rationales were all penalised) give exactly 0, not rounding noise that Adam
    # would turn into a full-size update
    assert torch.equal(rloo_advantages(torch.full((6,), -109.15377), 3), torch.zeros(6))


def test_adjusted_reward_and_penalty_hand_worked():
    reward = torch.tensor([-2.0, -4.0, -6.0, -8.0])
    stopped = torch.tensor([True, False, True, True])
    # batch mean R = -5, gamma = 2: the unfinished rationale's reward becomes -10
    assert torch.equal(penalised_reward(reward, stopped, 2.0), torch.tensor([-2.0, -10.0, -6.0, -8.0]))
    # r = R - beta * (logp - logp_ref): -2 - 0.5 * (-3 - -5) = -3
    r = adjusted_reward(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-5.0]), 0.5)
    assert r.item() == pytest.approx(-3.0)


def test_latro_loss_terms_hand_worked():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    logp_answer = torch.tensor([-3.0, -5.0], requires_grad=True)
    adv = torch.tensor([2.0, -2.0])
    loss, pg, answer = latro_loss(logp, logp_answer, adv, answer_weight=0.5, n=2)
    # pg = -(2 * -1 + -2 * -2) / 2 = -1 ; answer = -(-3 - 5) / 2 = 4 ; loss = -1 + 0.5 * 4 = 1
    assert (pg.item(), answer.item(), loss.item()) == (-1.0, 4.0, 1.0)
    loss.backward()
    assert torch.equal(logp.grad, torch.tensor([-1.0, 1.0]))         # d/dlogp = -A / n
    assert torch.equal(logp_answer.grad, torch.tensor([-0.25, -0.25]))  # d/dlogp_y = -alpha / n


# ------------------------------------------------------------------------------------------------------------
# Cutting rationales at stops

def test_cut_at_stop_string_spanning_tokens(tiny_llama_dir):
    _, tok = load(tiny_llama_dir)
    text = "So 3 + 4 = 7 apples. The answer is 7."
    ids = tok.encode(text, add_special_tokens=False)
    z, stopped = cut_rationale(ids, tok, latro.STOP_STRINGS, set(tok.eos_ids))
    assert stopped
    # brute force: the longest token prefix whose text ends at or before where "The answer is" starts
    cut = text.find("The answer is")
    best = max(k for k in range(len(ids) + 1) if len(tok.decode(ids[:k])) <= cut)
    assert z == ids[:best]
    assert "answer" not in tok.decode(z) and tok.decode(z).startswith("So 3 + 4 = 7 apples.")
    # the stop string must not have been a single token, or this would not test a cross-token match
    assert not any(tok.decode([i]) == "The answer is" for i in ids)


def test_cut_at_end_of_turn_and_at_length(tiny_llama3_dir):
    _, tok = load(tiny_llama3_dir)
    eos = set(tok.eos_ids)
    ids = tok.encode("Four plus three is seven", add_special_tokens=False)
    assert cut_rationale(ids + [tok.eot_id] + ids, tok, latro.STOP_STRINGS, eos) == (ids, True)
    assert cut_rationale(ids, tok, latro.STOP_STRINGS, eos) == (ids, False)   # ran out of length: not stopped
    # an end-of-turn before a later stop string wins
    tail = tok.encode(" The answer is 7", add_special_tokens=False)
    assert cut_rationale(ids + [tok.eot_id] + tail, tok, latro.STOP_STRINGS, eos) == (ids, True)


# ------------------------------------------------------------------------------------------------------------
# The whole objective against brute force

def naive_logprobs(model, tokens):
    """(B, T) with out[b, t] = log p(tokens[b, t] | tokens[b, :t]) from a full log_softmax; out[:, 0] = 0."""
    logp = torch.log_softmax(model(tokens).float(), -1)[:, :-1].gather(2, tokens[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logp, (1, 0))


def test_packed_rows_score_as_their_own_rows(tiny_llama_dir):
    """latro.pack runs each prompt once for its rows; every row's log pi(z|x) (at the sampling temperature) and
    log pi(y|x,z) (at 1) must equal a full log_softmax over that row alone, with gradients. The micro-batch spans
    two questions with prompts of different lengths, and one rationale is empty."""
    model, _ = load(tiny_llama_dir)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist()
    x1, x2 = ids(9), ids(5)
    rows = [(0, 0, x1, ids(4), ids(3)), (1, 0, x1, [], ids(3)), (2, 0, x1, ids(7), ids(2)), (3, 1, x2, ids(6), ids(4))]
    mb = latro.pack(rows, "cpu")
    assert mb.tokens.shape == (1, 8 + 8 + 4 + 10 + 4 + 11)  # x1[:-1], three rows of x1[-1] z y, x2[:-1], one row
    model.train()
    logp, logp_answer = latro.span_logprobs(model, mb, temperature=0.7)
    (logp.sum() + 2 * logp_answer.sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for (_, _, x, z, y), lp_z, lp_y in zip(rows, logp, logp_answer):
        row = torch.tensor([x + z + y])
        at_temperature = torch.log_softmax(model(row).float() / 0.7, -1)[0, :-1].gather(1, row[0, 1:, None])[:, 0]
        at_one = naive_logprobs(model, row)[0, 1:]
        want_z, want_y = at_temperature[len(x) - 1:len(x) + len(z) - 1].sum(), at_one[len(x) + len(z) - 1:].sum()
        assert lp_z.item() == pytest.approx(want_z.item(), abs=1e-4)
        assert lp_y.item() == pytest.approx(want_y.item(), abs=1e-4)
        total = total + want_z + 2 * want_y
    total.backward()
    for n, p in model.named_parameters():
        assert (packed_grads[n] - p.grad).abs().max().item() <= 1e-4 * p.grad.abs().max().item() + 1e-6, n


def perturbed_copy(model, scale=0.02, seed=0):
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ref.requires_grad_(False)


def make_prompts(tok, questions):
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
            for q in questions]


@pytest.mark.parametrize("style,lora", [("chatml", False), ("llama3", False), ("chatml", True)])
def test_rollout_and_gradient_match_brute_force(tmp_path, style, lora):
    """lora: the policy is the base plus rank-4 adapters (B drawn non-zero) and pi_ref is the same module with its
    adapters off (parallel.AdaptersOff), as train.py --lora runs it; the gradient reaches the adapters alone."""
    from conftest import make_tiny_model
    directory = make_tiny_model(tmp_path / style, tokenizer_style=style, seed=4)
    policy, tok = load(directory)
    reference = perturbed_copy(policy)       # a different pi_ref, so the KL term is not zero
    if lora:
        import parallel
        from model import add_lora
        add_lora(policy, r=4, alpha=8.0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        reference = parallel.AdaptersOff(policy)
    prompts = make_prompts(tok, ["What is 3 + 4? Let's think step by step.", "Add 12 and 5. Let's think step by step."])
    answers = ["The answer is 7.", "The answer is 17."]
    cfg = LatroConfig(num_samples=3, beta=0.3, answer_weight=0.7, max_rationale_tokens=12, micro_batch_size=2,
                      temperature=1.0)
    ro = latro.sample(policy, tok, prompts, answers, cfg, seeds=[11, 12])
    terms = latro.compute_advantages(policy, reference, ro, cfg)

    # Rebuild everything from the rows and their lengths with a full log_softmax.
    pol, ref = naive_logprobs(policy, ro.tokens).detach(), naive_logprobs(reference, ro.tokens)
    t = torch.arange(ro.tokens.shape[1])
    z = (t >= ro.prompt_end[:, None]) & (t < ro.rationale_end[:, None])
    y = (t >= ro.rationale_end[:, None]) & (t < ro.answer_end[:, None])
    logp, logp_ref, R = (pol * z).sum(1), (ref * z).sum(1), (pol * y).sum(1)
    R_pen = torch.where(ro.stopped, R, cfg.penalty_factor * R.mean())
    r = R_pen - cfg.beta * (logp - logp_ref)
    g = r.view(2, 3)
    A = (g - (g.sum(1, keepdim=True) - g) / 2).view(-1)
    assert terms.reward.mean().item() == pytest.approx(R.mean().item(), abs=1e-4)
    kl = (terms.logp - terms.logp_ref).mean().item()
    assert kl == pytest.approx((logp - logp_ref).mean().item(), abs=1e-4)
    assert kl != 0.0
    assert torch.allclose(terms.advantages, A, atol=1e-4)

    # The answer y is scored up to and including its end-of-turn token, even when that id is also the pad id.
    for b in range(ro.tokens.shape[0]):
        assert ro.tokens[b, ro.answer_end[b] - 1].item() == tok.eot_id
        assert tok.decode(ro.tokens[b, ro.rationale_end[b]:ro.answer_end[b] - 1].tolist()) == answers[b // 3]
    if style == "llama3":
        assert tok.pad_id in tok.eos_ids

    # Gradient of L (micro-batched, fused scoring) == gradient of the brute-force loss.
    policy.train()
    latro.backward_on_rollout(policy, ro, terms.advantages, cfg)
    fused = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) == lora for n in fused) and all(p.grad is None for n, p in policy.named_parameters()
                                                              if n not in fused)
    policy.zero_grad()
    pol = naive_logprobs(policy, ro.tokens)
    loss = -(A * (pol * z).sum(1)).mean() + cfg.answer_weight * -(pol * y).sum(1).mean()
    loss.backward()
    for n, p in policy.named_parameters():
        if n not in fused:
            continue
        # fp32 sums in a different order: compare relative to the gradient's scale (it reaches ~1e2 here)
        scale = p.grad.abs().max().item()
        assert (fused[n] - p.grad).abs().max().item() <= 2e-5 * scale + 1e-6, n


def test_exact_reward_advantages_hand_worked(tiny_llama_dir):
    """reward_kind="exact" (the verifiable-reward ablation): R = 1 when the stated answer is right, else 0, stopped or
    not (no non-stop penalty: with R in {0, 1}, gamma * mean(R) would pay rationales for not stopping), then the
    same KL adjustment and RLOO as LaTRO."""
    policy, tok = load(tiny_llama_dir)
    reference = perturbed_copy(policy)
    prompts = make_prompts(tok, ["What is 3 + 4?"])
    cfg = LatroConfig(num_samples=4, max_rationale_tokens=6, reward_kind="exact", beta=0.0)
    ro = latro.sample(policy, tok, prompts, ["The answer is 7."], cfg, seeds=[3])
    ro.stopped = torch.tensor([True, True, False, False])
    correct = torch.tensor([True, False, True, False])  # row 2 is right though it never stopped: R = 1, no penalty
    terms = latro.compute_advantages(policy, reference, ro, cfg, correct=correct)
    assert torch.equal(terms.reward_penalised, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    # A_k = r_k - mean of the other three: 1 - 1/3, 0 - 2/3, 1 - 1/3, 0 - 2/3
    assert torch.allclose(terms.advantages, torch.tensor([2 / 3, -2 / 3, 2 / 3, -2 / 3]))
    # with beta = 0.5 the KL estimate enters as in LaTRO: r = R - 0.5 * (log pi(z|x) - log pi_ref(z|x))
    cfg.beta = 0.5
    terms = latro.compute_advantages(policy, reference, ro, cfg, correct=correct)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0]) - 0.5 * (terms.logp - terms.logp_ref)
    assert (terms.logp - terms.logp_ref).abs().min() > 0
    assert torch.allclose(terms.advantages, r - (r.sum() - r) / 3, atol=1e-5)


def test_one_step_changes_every_parameter_but_not_the_reference(tiny_llama_dir):
    policy, tok = load(tiny_llama_dir)
    reference = copy.deepcopy(policy).requires_grad_(False)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ref_before = {n: p.clone() for n, p in reference.state_dict().items()}
    cfg = LatroConfig(num_samples=4, max_rationale_tokens=10)
    prompts = make_prompts(tok, ["What is 3 + 4?", "What is 2 + 2?"])
    ro = latro.sample(policy, tok, prompts, ["The answer is 7.", "The answer is 4."], cfg, seeds=[1, 2])
    terms = latro.compute_advantages(policy, reference, ro, cfg)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    policy.train()
    latro.backward_on_rollout(policy, ro, terms.advantages, cfg)
    opt.step()
    for n, p in policy.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{n} did not change"
    for n, p in reference.state_dict().items():
        assert torch.equal(p, ref_before[n]), f"reference {n} changed"
    assert all(p.grad is None for p in reference.parameters())


def test_training_raises_the_self_reward(tiny_llama_dir):
    """A few dozen steps must raise R = log pi(y | x, z) on the training questions. Why it must: the answer-likelihood
    term's gradient is exactly the gradient of R (with z fixed), so with alpha = 1 every step is an ascent step on
    R for the sampled rationales; the policy-gradient term moves probability towards rationales with higher r. R is
    measured before and after on the same questions with the same sampling seeds (not the noisy training metric)."""
    torch.manual_seed(0)
    policy, tok = load(tiny_llama_dir)
    reference = copy.deepcopy(policy).requires_grad_(False)
    prompts = make_prompts(tok, ["What is 3 + 4?", "What is 10 - 2?"])
    answers = ["The answer is 7.", "The answer is 8."]
    cfg = LatroConfig(num_samples=4, max_rationale_tokens=8, beta=0.05)

    def mean_reward():
        ro = latro.sample(policy, tok, prompts, answers, cfg, seeds=[100, 101])
        return latro.compute_advantages(policy, reference, ro, cfg).reward.mean().item()

    start = mean_reward()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for step in range(20):
        policy.eval()
        ro = latro.sample(policy, tok, prompts, answers, cfg, seeds=[step, 1000 + step])
        terms = latro.compute_advantages(policy, reference, ro, cfg)
        policy.train()
        latro.backward_on_rollout(policy, ro, terms.advantages, cfg)
        opt.step()
        opt.zero_grad()
    policy.eval()
    end = mean_reward()
    # answers are ~6 tokens; random init gives ~ -6 * log(V) nats. Expect a large, not marginal, gain.
    assert end > start + 5.0, (start, end)
