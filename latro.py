r"""LaTRO: LaTent Reasoning Optimization (Chen et al. 2024, "Language Models are Hidden Reasoners", arXiv 2411.04282).

The objective
-------------
A question x (the chat prompt with "Let's think step by step."), its gold answer y (the template
"The answer is 18." plus the end-of-turn token), and a rationale z treated as a latent variable. Jensen's inequality
bounds the answer's marginal likelihood by an ELBO whose "reasoner" q is the policy itself (paper Eq. 2-3):

    log pi(y|x) >= J(theta) = E_{z ~ pi(.|x)} [ log pi(y | x + z) ] - beta * KL[ pi(z|x) || pi_ref(z|x) ]

pi_ref is the frozen initial model. The model rewards itself with R(z) = log pi(y | x + z): no reward model, no
answer checking. Differentiating J (paper Prop. 2, Eq. 4) and using one sample's log-ratio as the KL estimate,

    r(z_k)  = R(z_k) - beta * (log pi(z_k|x) - log pi_ref(z_k|x))             adjusted reward
    A_k     = r(z_k) - 1/(K-1) * sum_{j != k} r(z_j)                          RLOO advantage (leave-one-out)
    grad J ~= 1/(NK) sum_{i,k} [ A_k grad log pi(z_k|x)  +  grad log pi(y | x + z_k) ]

so the loss minimised here, with A held constant, is

    L = -mean_{i,k}[ A_k * log pi(z_k|x) ]  +  alpha * -mean_{i,k}[ log pi(y | x + z_k) ]
        (policy-gradient term:                (answer-likelihood term: the model learns
         trains the reasoner)                   to judge its own reasoning)

The paper's gradient has alpha = 1, the default here; the official code's `sft_penalty` defaults to 0 (see below).
log-probabilities of z and y are sums over their tokens, not per-token means.

Rationales are cut at the first stop: an answer-template string such as "The answer is", an end-of-turn id, or the
length limit L. A rationale that hit the limit without stopping gets the official code's penalised reward
R := gamma * mean(R over the batch) (gamma = 2; R <= 0, so twice the batch's mean log-likelihood), before the KL.

Simplifications and choices versus the paper and its official code (SalesforceAIResearch/LaTRO):
  * alpha (answer-likelihood weight) defaults to 1 as in Eq. 4; the code's default is 0. Set answer_weight=0 for it.
  * R scores exactly the answer tokens y. The code's reward also includes the last rationale token (an off-by-one).
  * Stop strings are matched on decoded text, so a stop string split across tokens is still found; the code
    matched isolated token-id patterns. The cut keeps whole sampled tokens that end before the string starts.
  * Sampling stops at the first stop instead of always generating L tokens (same result, less compute).
  * The non-stop penalty's batch mean is over the global batch (all ranks), so N processes equal one process;
    the code used each GPU's local batch.
  * The rationale is scored at the sampling temperature (the distribution it was drawn from); the reward
    log pi(y|x+z) is the model's likelihood at temperature 1. Both are 1 by default, as in the paper.
  * One optimiser step per sampled batch, fully on-policy: no PPO ratio or clipping, no advantage whitening.

reward_kind="exact" swaps R for the verifiable reward that GRPO/RLOO users train with, 1[stated answer == gold],
in the same loop with the same KL and RLOO advantages (an ablation: see the README, "Does it work?").
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from model import generate, pad_right, token_logprobs

# The official code's stop list, minus its function-calling leftovers. Matching on decoded text makes its
# " "/"\n"-prefixed variants redundant ("The answer is" already matches them), and " the answer is" covers
# "So, the answer is" and "Therefore, the answer is".
STOP_STRINGS = ("The answer is", " the answer is", "the final answer is", "Answer:")


@dataclass
class LatroConfig:
    num_samples: int = 16              # K rationales per question
    beta: float = 0.05                 # KL coefficient (paper: 0.05 GSM8K, 0.25 ARC-Challenge)
    answer_weight: float = 1.0         # alpha on -log pi(y|x,z); paper Eq. 4 = 1, official code = 0
    max_rationale_tokens: int = 500    # L
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    nonstop_penalty: bool = True
    penalty_factor: float = 2.0        # gamma
    stop_strings: tuple = STOP_STRINGS
    micro_batch_size: int = 4          # rollout rows per scoring forward / backward (packed: see pack)
    reward_kind: str = "self"          # "self": R = log pi(y|x,z) (LaTRO); "exact": R = 1[stated answer == gold]
    compiled: bool = False             # sample with the compiled fixed-shape decoding step (model.generate)
    sample_questions: int = 0          # questions per generate() call, 0 = all: bounds the KV cache, same samples

    def __post_init__(self):
        if self.reward_kind not in ("self", "exact"):
            raise ValueError(f"LatroConfig.reward_kind: expected 'self' or 'exact', got {self.reward_kind!r}")


@dataclass
class Rollout:
    """K sampled rationales per question, laid out as right-padded rows [prompt | z | y] with spans from lengths."""
    tokens: torch.Tensor         # (N, T) long, N = questions * K, a question's samples adjacent
    prompt_end: torch.Tensor     # (N,) z starts here
    rationale_end: torch.Tensor  # (N,) y starts here
    answer_end: torch.Tensor     # (N,) row length
    stopped: torch.Tensor        # (N,) bool: the rationale ended at a stop string or end-of-turn
    rationales: list             # decoded z, for logging and answer checks
    sampled_tokens: int          # tokens generated before cutting (the sampler's work)


class MicroBatch(NamedTuple):
    """Rollout rows packed into one sequence that runs each question's prompt once (see pack)."""
    tokens: torch.Tensor     # (1, S) long
    positions: torch.Tensor  # (1, S) each token's position in its own row [x | z | y]
    mask: torch.Tensor       # (1, S, S) bool: mask[0, t, s] = token t attends to token s
    z_start: torch.Tensor    # (n,) where each row's z starts in the packed sequence
    z_end: torch.Tensor      # (n,) where it ends, and y starts
    y_end: torch.Tensor      # (n,) where y ends
    rows: torch.Tensor       # (n,) the rows' indices in the rollout


class Terms(NamedTuple):
    """The objective's per-row terms, (N,) fp32 each, in the order they are computed."""
    logp: torch.Tensor              # log pi(z|x)
    reward: torch.Tensor            # R = log pi(y|x,z)
    logp_ref: torch.Tensor          # log pi_ref(z|x)
    reward_penalised: torch.Tensor  # R after the non-stop penalty
    adjusted_reward: torch.Tensor   # r = R - beta * KL
    advantages: torch.Tensor        # A_k, RLOO


# --------------------------------------------------------------------------------------------------------------
# Steps 1-2: sample K continuations per question, cut each into its rationale z, pack the rows [x | z | y]

def cut_rationale(tokens, tokenizer, stop_strings, eos_ids):
    """tokens: a sampled continuation -> (z tokens, stopped). z ends before the first end-of-turn id or before the
    first stop string, whichever comes first; a string may start mid-token, in which case that token is dropped
    too (z keeps only whole sampled tokens, so log pi(z|x) is the probability of what was sampled)."""
    eos = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    z = tokens if eos is None else tokens[:eos]
    text = tokenizer.decode(z)
    hits = [text.find(s) for s in stop_strings if s in text]
    if not hits:
        return list(z), eos is not None
    cut = min(hits)
    lo, hi = 0, len(z)  # the longest prefix of z whose text ends at or before `cut` (decoding is monotone)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(z[:mid])) <= cut:
            lo = mid
        else:
            hi = mid - 1
    return list(z[:lo]), True


@torch.no_grad()
def sample(policy, tokenizer, prompts, answers, cfg, seeds=None, progress=None):
    """Samples K rationales per question and packs them with their answers into a Rollout.

    prompts: list of token lists (chat-templated questions x); answers: the answer-template texts
    ("The answer is 18."). seeds: one per question (sampling then depends only on the question's own seed).
    progress: optional callable("sample", **counts) after each decoding step (see model.generate)."""
    K, device, eos = cfg.num_samples, next(policy.parameters()).device, set(tokenizer.eos_ids)
    stop_strings = cfg.stop_strings if cfg.reward_kind == "self" else ()  # "exact" reads the answer z itself states
    chunk, samples = cfg.sample_questions or len(prompts), []
    for i in range(0, len(prompts), chunk):  # a question's samples depend on its seed alone: chunks change nothing
        samples += generate(policy, prompts[i:i + chunk], cfg.max_rationale_tokens, cfg.temperature, cfg.top_p,
                            cfg.top_k, stop=sorted(eos) + list(stop_strings), num_samples=K,
                            seed=seeds and seeds[i:i + chunk], tokenizer=tokenizer, compiled=cfg.compiled,
                            progress=progress and (lambda **c: progress("sample", **c)))
    # y = the answer template + end-of-turn, tokenised on its own and appended after the cut rationale
    answer_ids = [tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eot_id] for a in answers]
    rows, spans, stopped, texts = [], [], [], []
    for i, continuation in enumerate(samples):
        z, s = cut_rationale(continuation, tokenizer, stop_strings, eos)
        x, y = prompts[i // K], answer_ids[i // K]
        rows.append(x + z + y)
        spans.append((len(x), len(x) + len(z), len(x) + len(z) + len(y)))
        stopped.append(s)
        texts.append(tokenizer.decode(z))
    prompt_end, rationale_end, answer_end = torch.tensor(spans, device=device).unbind(1)
    return Rollout(pad_right(rows, device), prompt_end, rationale_end, answer_end, torch.tensor(stopped, device=device),
                   texts, sum(len(s) for s in samples))


# --------------------------------------------------------------------------------------------------------------
# Step 3: scoring spans with the one fused scoring function, on rows packed so that each prompt runs once

def pack(rows, device):
    """rows: (row index, question, x, z, y), the last three token lists, a question's rows adjacent -> MicroBatch:

        [ x[:-1] | x[-1] z_1 y_1 | x[-1] z_2 y_2 | ... | the next question's x[:-1] | ... ]

    Each row's segment repeats its prompt's last token at that token's position and attends only to its own
    question's x[:-1] and to itself, so every token sees exactly the context, at exactly the positions, it has in
    its own row [x | z | y]: the log-probs are the row's. The prompt runs once per micro-batch instead of once per
    row (K rows share it, and it is ~40% of a GSM8K row's tokens), and no row is padded."""
    tokens, positions, question, segment, spans = [], [], [], [], []  # per packed token: question, segment (0 = x)
    for i, (_, q, x, z, y) in enumerate(rows):
        if i == 0 or q != rows[i - 1][1]:
            tokens += x[:-1]
            positions += range(len(x) - 1)
            question += [q] * (len(x) - 1)
            segment += [0] * (len(x) - 1)
        start = len(tokens) + 1                                   # where z starts, after the repeated x[-1]
        tokens += [x[-1]] + z + y
        positions += range(len(x) - 1, len(x) + len(z) + len(y))
        question += [q] * (1 + len(z) + len(y))
        segment += [i + 1] * (1 + len(z) + len(y))
        spans.append((start, start + len(z), start + len(z) + len(y)))
    t = torch.arange(len(tokens), device=device)
    question, segment = torch.tensor(question, device=device), torch.tensor(segment, device=device)
    # (S, S): token t sees token s at or before it, of its own question, in the shared x or in its own row
    mask = (t[None, :] <= t[:, None]) & (question[None, :] == question[:, None]) & \
        ((segment[None, :] == 0) | (segment[None, :] == segment[:, None]))
    z_start, z_end, y_end = torch.tensor(spans, device=device).unbind(1)
    return MicroBatch(torch.tensor([tokens], device=device), torch.tensor([positions], device=device), mask[None],
                      z_start, z_end, y_end, torch.tensor([r[0] for r in rows], device=device))


def micro_batches(rollout, size, k):
    """The rollout's rows, `size` at a time in order (k per question, adjacent), each group packed (pack)."""
    tokens, spans = rollout.tokens.tolist(), torch.stack([rollout.prompt_end, rollout.rationale_end,
                                                          rollout.answer_end], 1).tolist()   # one host sync
    for i in range(0, len(tokens), size):
        yield pack([(j, j // k, tokens[j][:p], tokens[j][p:r], tokens[j][r:a])
                    for j, (p, r, a) in enumerate(spans[i:i + size], start=i)], rollout.tokens.device)


def span_logprobs(model, mb, temperature, dense=False, answer=True):
    """-> (log pi(z|x), log pi(y|x,z)), each (n,) fp32 sums over a MicroBatch's rows. One forward when
    temperature == 1: the same pass scores both spans. z is scored at the sampling temperature, y at the model's
    own (1). answer=False: log pi(z|x) only (None for y). dense: see token_logprobs (the memory plan's no-data
    path)."""
    first, S = mb.z_start[:1], mb.tokens.shape[1]
    t = torch.arange(S, device=mb.tokens.device)
    in_z = (t >= mb.z_start[:, None]) & (t < mb.z_end[:, None])                           # (n, S)
    in_y = (t >= mb.z_end[:, None]) & (t < mb.y_end[:, None])
    lp = token_logprobs(model, mb.tokens, first, [S], temperature, dense, mb.positions, mb.mask)   # (1, S)
    logp = (lp * in_z).sum(1)
    if not answer:
        return logp, None
    if temperature != 1.0:
        lp = token_logprobs(model, mb.tokens, first, [S], 1.0, dense, mb.positions, mb.mask)
    return logp, (lp * in_y).sum(1)


# --------------------------------------------------------------------------------------------------------------
# Steps 4-5: penalty, adjusted reward, RLOO advantage (pure tensor functions, tested by hand)

def penalised_reward(reward, stopped, penalty_factor):
    """Non-stop penalty of the official code: R := gamma * mean(R) for rationales that never stopped. The mean is
    over the whole (global) batch."""
    total, count = reward.sum(), torch.tensor(float(reward.numel()), device=reward.device)
    if dist.is_initialized():
        stats = torch.stack([total, count])
        dist.all_reduce(stats)
        total, count = stats[0], stats[1]
    return torch.where(stopped, reward, penalty_factor * total / count)


def adjusted_reward(reward, logp, logp_ref, beta):
    """r = R - beta * (log pi(z|x) - log pi_ref(z|x)): the self-reward minus the one-sample KL estimate."""
    return reward - beta * (logp - logp_ref)


def rloo_advantages(r, k):
    """A_k = r_k - mean of the other K-1 rewards of the same question. r (N,) with each question's K adjacent."""
    # r_k - (sum_j r_j - r_k)/(K-1) = K/(K-1) * (r_k - mean r). Shifting by the group's first reward first keeps
    # equal rewards (e.g. a group of penalised rationales) at an advantage of exactly 0 instead of rounding noise.
    g = r.view(-1, k)                                                           # (questions, K)
    d = g - g[:, :1]
    return ((d - d.mean(1, keepdim=True)) * (k / (k - 1))).view(-1)


@torch.no_grad()
def compute_advantages(policy, reference, ro, cfg, correct=None, progress=None):
    """Steps 3-5 for a sampled Rollout, with no gradient: every term of the objective up to the RLOO advantage.
    correct: (N,) bool, whether each rationale states the gold answer (the caller's answer checker); only
    reward_kind="exact" reads it. progress: optional callable("score", **counts) after each micro-batch. -> Terms."""
    n = ro.tokens.shape[0]
    logp, reward, logp_ref = (torch.zeros(n, device=ro.tokens.device) for _ in range(3))
    batches = list(micro_batches(ro, cfg.micro_batch_size, cfg.num_samples))
    for j, mb in enumerate(batches):
        logp[mb.rows], reward[mb.rows] = span_logprobs(policy, mb, cfg.temperature)  # log pi(z|x), R=log pi(y|x,z)
        logp_ref[mb.rows] = span_logprobs(reference, mb, cfg.temperature, answer=False)[0]  # log pi_ref(z|x)
        if progress is not None:
            progress("score", done=j + 1, total=len(batches), rows_finished=min((j + 1) * cfg.micro_batch_size, n),
                     rows=n, tokens=0)
    if cfg.reward_kind == "exact":                                   # the ablation: R = 1[stated answer == gold]
        reward = torch.as_tensor(correct, device=reward.device).float()
    penalised = reward
    if cfg.nonstop_penalty and cfg.reward_kind == "self":    # non-stop penalty: R := gamma * mean(R) if not stopped
        penalised = penalised_reward(reward, ro.stopped, cfg.penalty_factor)
    r = adjusted_reward(penalised, logp, logp_ref, cfg.beta)                          # r = R - beta * KL
    advantages = rloo_advantages(r, cfg.num_samples)                                  # A_k = r_k - mean_{j!=k} r_j
    return Terms(logp, reward, logp_ref, penalised, r, advantages)


# --------------------------------------------------------------------------------------------------------------
# Step 6: the loss, with gradients, micro-batch by micro-batch

def latro_loss(logp, logp_answer, advantages, answer_weight, n):
    """The two terms of L, as sums over these rows divided by the batch's row count n (so micro-batches add up to
    the batch mean): -A * log pi(z|x) and alpha * -log pi(y|x,z)."""
    pg = -(advantages.detach() * logp).sum() / n          # policy-gradient term (trains the reasoner)
    answer = -logp_answer.sum() / n                       # answer-likelihood term (trains the evaluator)
    return pg + answer_weight * answer, pg.detach(), answer.detach()


def backward_on_rollout(policy, ro, advantages, cfg, before_forward=None, progress=None):
    """Recomputes log pi(z|x) and log pi(y|x,z) with gradients and backpropagates L, averaged over the rollout's
    rows, micro-batch by micro-batch. before_forward(is_last) is called before each micro-batch's forward (the
    trainer turns DDP's gradient all-reduce off until the last micro-batch there: DDP reads its flag in forward).
    progress: optional callable("train", **counts) after each micro-batch. Returns metrics."""
    n = ro.tokens.shape[0]
    sums = torch.zeros(3, device=ro.tokens.device, dtype=torch.float64)  # loss, pg, answer: one host sync at the end
    batches = list(micro_batches(ro, cfg.micro_batch_size, cfg.num_samples))
    for j, mb in enumerate(batches):
        if before_forward is not None:
            before_forward(j == len(batches) - 1)
        sums += torch.stack(backward_micro_batch(policy, mb, advantages[mb.rows], cfg, n))
        if progress is not None:
            progress("train", done=j + 1, total=len(batches), rows_finished=min((j + 1) * cfg.micro_batch_size, n),
                     rows=n, tokens=0)
    loss, pg, answer = sums.tolist()
    return {"loss": loss, "loss_pg": pg, "loss_answer": answer}


def backward_micro_batch(policy, mb, advantages, cfg, n, dense=False):
    """Forward and backward of L on one MicroBatch (of a batch of n rows) -> (loss, pg, answer), detached 0-d
    tensors."""
    logp, logp_answer = span_logprobs(policy, mb, cfg.temperature, dense)
    loss, pg, answer = latro_loss(logp, logp_answer, advantages, cfg.answer_weight, n)
    loss.backward()
    return loss.detach(), pg, answer
