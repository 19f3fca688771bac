"""Checks that need a real 2-rank process group, run by tests/test_plan.py under torchrun (gloo, CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_checks.py CHECK [MODEL_DIR]

CHECK is one of
  grads      after a micro-batch that is not the last, every parameter already holds its reduce-scattered shard
             of the gradient (train.py's sync rule under FSDP2), i.e. no unsharded gradient is kept for later;
  policy     the FSDP2 policy in bf16 and the bf16 sampling copy give identical log-probs (the policy that is
             trained is the policy that sampled);
  plan       plan.simulate with real tensors on this real process group (the measurement the fake simulation is
             compared with); rank 0 prints the result as json.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import latro  # noqa: E402
import parallel  # noqa: E402
from tools import plan  # noqa: E402
from model import token_logprobs  # noqa: E402

SMALL = dict(model_type="llama", vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048,
             rope_theta=10000.0, tie_word_embeddings=False)


def models(model_dir, dtype):
    return parallel.build_models(model_dir, model_dir, torch.device("cpu"), dist.get_world_size(), dtype,
                                 sharded=True, checkpointing=True)


def batch(vocab, rows=4, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, T), generator=g)
    prompt_end = torch.tensor([3, 4, 5, 6])[:rows]
    rationale_end = torch.tensor([10, 12, 20, 15])[:rows]
    answer_end = torch.tensor([14, 18, 24, 19])[:rows]
    return tokens, prompt_end, rationale_end, answer_end


def check_grads(model_dir):
    policy, *_ = models(model_dir, torch.float32)
    policy.train()
    cfg = latro.LatroConfig(num_samples=2)
    tokens, p, r, a = batch(policy.args.vocab_size)
    rows = zip(tokens.tolist(), p.tolist(), r.tolist(), a.tolist())
    mb = latro.pack([(i, i, t[:pi], t[pi:ri], t[ri:ai]) for i, (t, pi, ri, ai) in enumerate(rows)], None)  # 4 questions
    parallel.grad_sync(policy)(False)  # not the last micro-batch
    latro.backward_micro_batch(policy, mb, torch.randn(4), cfg, 8)
    for name, param in policy.named_parameters():
        assert param.grad is not None, f"{name}: no sharded gradient after a micro-batch (kept unsharded)"
        assert param.grad.to_local().shape == param.to_local().shape, name


@torch.no_grad()
def check_policy(model_dir):
    policy, sampler, reference = models(model_dir, torch.bfloat16)
    tokens, p, r, a = batch(sampler.args.vocab_size)
    for mode in ("eval", "train"):  # train: with activation checkpointing (off under no_grad) and FSDP's hooks
        getattr(policy, mode)()
        lp_policy = token_logprobs(policy, tokens, p, a)
        lp_sampler = token_logprobs(sampler, tokens, p, a)
        lp_reference = token_logprobs(reference, tokens, p, a)
        diff = (lp_policy - lp_sampler).abs().max().item()
        assert diff == 0.0, f"{mode}: policy vs sampler log-probs differ by {diff}"
        assert torch.equal(lp_reference, lp_sampler), f"{mode}: reference vs sampler differ"


def check_plan():
    result = plan.simulate(SMALL, dist.get_world_size(), True, torch.bfloat16, num_samples=4, questions_per_step=4,
                           max_rationale_tokens=48, micro_batch_size=2, checkpointing=True, prompt_tokens=24,
                           answer_tokens=8, fake=False)
    if dist.get_rank() == 0:
        print("PLAN " + json.dumps({k: result[k] for k in ("train", "sample", "score", "step")}))


def main():
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    name = sys.argv[1]
    if name == "plan":
        check_plan()
    else:
        {"grads": check_grads, "policy": check_policy}[name](sys.argv[2])
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"OK {name}")
    dist.destroy_process_group()


if __name__ == "__main__":
    parallel.run_main(main)  # as eval.py and train.py: gloo's threads can abort the interpreter's finalization
