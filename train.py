"""Trains a language model with LaTRO (latro.py), or with the paper's SFT baseline, on GSM8K or ARC-Challenge.

    python train.py                                            # a first run on a laptop CPU: smollm2-135m learns
                                                               # arith; held-out accuracy before and after
    python train.py --model llama-3.1-8b --dataset gsm8k      # the paper's hyperparameters (see PAPER below)
    torchrun --nproc_per_node 8 train.py --model llama-3.1-8b  # data-parallel; FSDP2 when replicas would not fit
    python train.py --resume runs/latro/checkpoint-000002      # continue a run exactly where it stopped
    python train.py --method sft                               # the SFT baseline: same loop, gold rationales
    python train.py --model llama-3.1-8b --plan --nproc 8 --gpu-memory 80   # memory plan, simulated on the CPU

One step: each rank takes its share of the step's questions, samples K rationales per question, scores them (no
grad), then recomputes log-probs with gradients micro-batch by micro-batch and takes one AdamW step. Precision:
fp32 master weights always (at lr 5e-7 a bf16 weight update rounds to nothing); on GPU, compute runs in bf16 through
autocast (DDP) or FSDP2's MixedPrecisionPolicy, and sampling uses a bf16 copy of the policy refreshed after every
step, so a sharded policy is gathered once per step rather than at every decoding step.

How the job spreads over processes and GPUs is in parallel.py; how the run lives on disk (run directory,
checkpoints, resume, metrics.jsonl) is in rundir.py.
"""
import argparse
import functools
import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

import data
import eval as evaluation
import latro
import parallel
import rundir
from model import ALIASES, pad_right, resolve_dtype, token_logprobs

# The paper's recipe (§5.1 and the official training.sh): lr 5e-7, K = 16, L = 500, T = 1, AdamW without warm-up,
# linear decay, 24 questions (384 rollouts) per step; 6 "epochs" of GSM8K rollouts = 117 steps, 12 of ARC = 35.
PAPER = dict(lr=5e-7, num_samples=16, questions_per_step=24, max_rationale_tokens=500, micro_batch_size=4,
             steps={"gsm8k": 117, "arc_challenge": 35}, answer_weight=1.0, eval_every=0, eval_max_new_tokens=500)
# A first run on a laptop CPU (the README's "Does it work?"): SmolLM2-135M on arith, about 26 minutes on 2 cores in
# bf16; its held-out greedy accuracy (200 test questions, 128 new tokens) is printed before the first step, after
# step 30 and after the last. Two seeds of this recipe gained +15.0 and +10.5 points. alpha = 0 (the official
# code's default): with alpha = 1 the same 60 steps over-optimise and fall back to the base model's accuracy.
LAPTOP = dict(lr=2e-5, num_samples=8, questions_per_step=4, max_rationale_tokens=96, micro_batch_size=4,
              steps={"gsm8k": 60, "arc_challenge": 60}, answer_weight=0.0, eval_every=30, eval_max_new_tokens=128)
PAPER_MODELS = ("llama-3.1-8b", "mistral-7b", "phi-3.5-mini")
BETA = {"gsm8k": 0.05, "arc_challenge": 0.25}  # the paper's KL coefficients
MAX_BAD_STEPS = 3  # abort after this many non-finite losses in a row


class TrainingStopped(RuntimeError):
    """The run stopped for a reason that is not a bad flag (non-finite losses, Ctrl-C); main prints the message as
    one line."""
    exit_code = 1


# --------------------------------------------------------------------------------------------------------------
# Flags: `args` is the argparse namespace throughout; unset ones come from the paper's or the laptop recipe

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=f"local HF directory, hub id, or alias ({', '.join(ALIASES)}); "
                   "default smollm2-135m, or the resumed run's model")
    p.add_argument("--dataset", default="arith",
                   help="arith (generated, data.arith_examples), gsm8k, arc_challenge, or a .jsonl file in either layout")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training questions")
    p.add_argument("--method", choices=("latro", "sft"), default="latro")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (paper: 117 gsm8k, 35 arc)")
    p.add_argument("--questions-per-step", type=int, default=None, help="global batch, in questions (paper: 24)")
    p.add_argument("--num-samples", "-K", type=int, default=None, help="rationales per question (paper: 16)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="sequences per forward/backward")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (paper: 5e-7)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm; 0 = off (as the official code)")
    p.add_argument("--beta", type=float, default=None, help="KL coefficient (paper: 0.05 gsm8k, 0.25 arc)")
    p.add_argument("--reward", choices=("self", "exact"), default="self",
                   help="self: R = log pi(y|x,z), LaTRO; exact: R = 1 if the stated answer is right (the "
                   "verifiable-reward RLOO baseline, same KL and advantages)")
    p.add_argument("--answer-weight", type=float, default=None,
                   help="alpha on -log pi(y|x,z): 1 as the paper's Eq. 4 (the official code used 0); default 1 with "
                   "the paper's recipe, 0 with the laptop recipe (README: Does it work?) and for --reward exact")
    p.add_argument("--max-rationale-tokens", type=int, default=None, help="L (paper: 500)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--no-nonstop-penalty", action="store_true", help="do not penalise rationales that never stop")
    p.add_argument("--penalty-factor", type=float, default=2.0, help="gamma: R := gamma * batch-mean R if not stopped")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (master weights are always fp32); auto = bf16 on GPU and on CPUs with native "
                   "bf16 (AVX512-BF16, AMX), else fp32")
    p.add_argument("--compile", action="store_true",
                   help="sample with the torch.compile'd fixed-shape decoding step (CUDA graphs on GPU)")
    p.add_argument("--fsdp", choices=("auto", "on", "off"), default="auto",
                   help="shard params, grads and optimizer state with FSDP2; auto = when a replica would not fit")
    p.add_argument("--activation-checkpointing", nargs="?", const="on", choices=("auto", "on", "off"), default="auto",
                   help="recompute each block's activations in backward; auto = on when sharded")
    p.add_argument("--plan", action="store_true", help="print the memory plan of this configuration (simulated on "
                   "the CPU: no GPU, weights or data needed) and exit")
    p.add_argument("--nproc", type=int, default=None, help="with --plan: the number of GPUs (default: WORLD_SIZE or 1)")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="GiB per GPU to plan against (default: the GPU's own; 80 with --plan)")
    p.add_argument("--no-plan", action="store_true", help="skip the memory plan in the preflight of a GPU run")
    p.add_argument("--plan-prompt-tokens", type=int, default=None,
                   help="prompt length the plan assumes (default 250, a long GSM8K chat prompt)")
    p.add_argument("--out", default=None, help="run directory (default runs/<method>-<dataset>)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a run directory that has results")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end); 0 = end only")
    p.add_argument("--no-save", action="store_true", help="write no checkpoint at all")
    p.add_argument("--resume", default=None, help="a checkpoint directory written by this script; every flag not "
                   "given again is restored from it")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="on --resume, allow flags that change the data order or the objective (recorded)")
    p.add_argument("--keep-last", type=int, default=0,
                   help="keep only the newest N checkpoints (the newest complete one is never deleted); 0 = all")
    p.add_argument("--eval-every", type=int, default=None, help="held-out greedy accuracy (eval.py) before the first "
                   "step, every N steps and after the last; 0 = off (default: 30 laptop, 0 paper recipe)")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-limit", type=int, default=200, help="held-out questions per evaluation")
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: 128 laptop, 500 paper recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb", default=None, help="wandb project name (only if wandb is installed)")
    p.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    args = p.parse_args(argv)
    for action in p._actions:  # parse again with no defaults: what is left is what the user typed
        action.default = argparse.SUPPRESS
    args.explicit = sorted(vars(p.parse_args(argv)))
    args.recipe_changes = []  # filled on --resume with --allow-recipe-change
    return args


def paper_model(name):
    """Which of the paper's models `name` is: an alias, its hub id, or a local copy whose config.json has the same
    shape. None for anything else."""
    from tools import plan
    by_repo = {ALIASES[a]: a for a in PAPER_MODELS}
    if name in PAPER_MODELS or name in by_repo:
        return by_repo.get(name, name)
    try:
        with open(os.path.join(name, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):  # not a local copy; load() reports a broken config.json itself
        return None
    return next((a for a in PAPER_MODELS if plan.same_architecture(config, plan.CONFIGS[a])), None)


def fill_defaults(args):
    """Unset flags come from the paper's recipe for the paper's models and from the laptop recipe otherwise."""
    args.model = args.model or "smollm2-135m"
    args.dataset = rundir.dataset_id(args.dataset)
    args.recipe = "paper" if paper_model(args.model) else "laptop"
    preset = PAPER if args.recipe == "paper" else LAPTOP
    name = data.detect_task(args.dataset, args.split)  # from the data's layout, not from the file's name
    for key in ("lr", "num_samples", "questions_per_step", "max_rationale_tokens", "micro_batch_size", "eval_every",
                "eval_max_new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.steps = args.steps if args.steps is not None else preset["steps"][name]
    args.beta = args.beta if args.beta is not None else BETA[name]
    if args.answer_weight is None:  # the verifiable-reward baseline trains on its reward alone, as GRPO/RLOO do
        args.answer_weight = 0.0 if args.reward == "exact" else preset["answer_weight"]
    args.out = args.out or (os.path.dirname(os.path.abspath(args.resume)) if args.resume
                            else os.path.join("runs", f"{args.method}-{os.path.basename(args.dataset).split('.')[0]}"))
    return args


def check_args(args, world):
    """Every flag problem, found before anything is loaded or written."""
    if args.method == "latro" and args.num_samples < 2:
        raise ValueError(f"--num-samples {args.num_samples}: RLOO needs K >= 2 rationales per question")
    if not 0 < args.lr <= 1e-2:
        raise ValueError(f"--lr {args.lr} is out of range (expected 0 < lr <= 1e-2; the paper uses 5e-7)")
    for flag in ("steps", "questions_per_step", "micro_batch_size", "max_rationale_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected a positive integer")
    if args.questions_per_step % world:
        raise ValueError(f"--questions-per-step {args.questions_per_step} is not divisible by the world size {world}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature {args.temperature}: LaTRO samples rationales, expected > 0")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: expected a positive integer")
    if args.fsdp == "on" and world == 1:
        raise ValueError("--fsdp on: sharding needs several ranks (torchrun --nproc_per_node N train.py ...); "
                         "in one process use --fsdp off")
    if args.keep_last < 0:
        raise ValueError(f"--keep-last {args.keep_last}: expected 0 (keep all) or a positive number of checkpoints")


# --------------------------------------------------------------------------------------------------------------
# Data order: a reshuffle per epoch, fixed by the seed, so a resumed run sees exactly the same questions

def step_questions(n_examples, step, per_step, seed):
    """Global question indices for `step` (0-based), walking seeded permutations epoch after epoch."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, j = divmod(i, n_examples)
        out.append(torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))[j].item())
    return out


def lr_factor(step, steps, warmup):
    """Linear warm-up, then linear decay to 0 at the last step (the paper: no warm-up, linear decay)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def question_seed(seed, step, index):
    return (seed * 1_000_003 + step * 100_003 + index) % 2**62


# --------------------------------------------------------------------------------------------------------------
# One step, up to the optimizer step: each step function returns this rank's metrics (with "tokens", the tokens
# it processed, which the loop takes out for its tok/s)

def latro_step(models, cfg, autocast, before_forward, batch, prompts, seeds, progress):
    """Sample K rationales per question, score them (no grad), then backward micro-batch by micro-batch."""
    policy, sampler, reference, tokenizer = models
    t0 = time.time()
    ro = latro.sample(sampler, tokenizer, prompts, [e.answer_text for e in batch], cfg, seeds=seeds,
                      progress=progress)
    t_sampled = time.time()
    K = cfg.num_samples
    # whether each rationale states the gold answer, extracted as eval.py does: logged, and --reward exact's R
    correct = [evaluation.is_correct(batch[i // K], evaluation.extract_answer(batch[i // K], text))
               for i, text in enumerate(ro.rationales)]
    terms = latro.compute_advantages(sampler, reference, ro, cfg, correct=torch.tensor(correct), progress=progress)
    m = rollout_metrics(ro, terms, time_sample=t_sampled - t0, time_score=time.time() - t_sampled)
    m["accuracy"] = sum(correct) / len(correct)
    t1 = time.time()
    with autocast:
        m.update(latro.backward_on_rollout(policy, ro, terms.advantages, cfg, before_forward=before_forward,
                                           progress=progress))
    m["tokens"] = m.pop("sampled_tokens")
    m.update(sample_tokens_per_s=m["tokens"] / max(m["time_sample"], 1e-9), time_rollout=t1 - t0,
             time_backward=time.time() - t1)
    return m


def sft_step(models, cfg, autocast, before_forward, device, world, batch, prompts, seeds, progress):
    """The SFT baseline: -mean log pi(gold rationale + answer | x) per token over the whole step's targets (every
    rank's), micro-batch by micro-batch. Same loop and data as LaTRO; nothing is sampled (seeds, progress unused)."""
    policy, _, _, tokenizer = models
    t0 = time.time()
    targets = [tokenizer.encode((e.rationale.strip() + "\n" if e.rationale.strip() else "") + e.answer_text,
                                add_special_tokens=False) + [tokenizer.eot_id] for e in batch]
    n_tokens = torch.tensor(float(sum(len(y) for y in targets)), device=device)
    if world > 1:
        dist.all_reduce(n_tokens)
    n_tokens = n_tokens.item() / world  # DDP / FSDP2 average the ranks' gradients: this makes it a mean per token
    rows = [x + y for x, y in zip(prompts, targets)]
    spans = [(len(x), len(x) + len(y)) for x, y in zip(prompts, targets)]
    t1 = time.time()
    loss_sum, starts = 0.0, range(0, len(rows), cfg.micro_batch_size)
    with autocast:
        for j, i in enumerate(starts):
            tokens = pad_right(rows[i:i + cfg.micro_batch_size], device)  # (B, T), right-padded
            begin, end = torch.tensor(spans[i:i + cfg.micro_batch_size], device=device).unbind(1)  # (B,), (B,)
            before_forward(j == len(starts) - 1)
            loss = -token_logprobs(policy, tokens, begin, end).sum() / n_tokens
            loss.backward()
            loss_sum += loss.item()
    return {"loss": loss_sum, "target_tokens": n_tokens, "tokens": n_tokens / world, "time_rollout": t1 - t0,
            "time_backward": time.time() - t1}


def rollout_metrics(ro, terms, **times):
    """What metrics.jsonl logs of one rollout (latro.Rollout) and its terms (latro.Terms): means over this rank's
    rows."""
    return {
        "reward": terms.reward.mean().item(),                 # mean log pi(y|x,z), before the penalty
        "reward_penalised": terms.reward_penalised.mean().item(),
        "kl": (terms.logp - terms.logp_ref).mean().item(),    # sequence-level k1 estimate of KL[pi || pi_ref]
        "adjusted_reward": terms.adjusted_reward.mean().item(),
        "advantage_std": terms.advantages.std().item(),
        "rationale_len": (ro.rationale_end - ro.prompt_end).float().mean().item(),
        "stop_rate": ro.stopped.float().mean().item(),
        "answer_tokens": (ro.answer_end - ro.rationale_end).sum().item() / len(ro.rationales),
        "sampled_tokens": ro.sampled_tokens,
        **times,
    }


# --------------------------------------------------------------------------------------------------------------
# The loop

def train(args):
    """Resolves the flags (restoring a resumed run's), takes the run directory, then trains (run). Ctrl-C becomes
    one line saying where the run stopped and how to continue it."""
    device, rank, world = parallel.setup_distributed(args.device)
    resume_state = rundir.read_resume_state(args) if args.resume else None
    if resume_state:
        args.model = resume_state["base_model"]
        rundir.restore_run_args(args, resume_state, world)
    fill_defaults(args)
    check_args(args, world)
    lock, status = None, {"step": resume_state["step"] if resume_state else 0}
    try:
        lock = parallel.on_rank0(rank, lambda: rundir.prepare_run_dir(args, status["step"]))
        run(args, device, rank, world, resume_state, status)
        if world > 1:
            # after run() has returned: gloo aborts at exit now and then (1 in ~10 on 2 CPU ranks) when FSDP
            # modules holding communication buffers outlive the process group
            gc.collect()
            dist.destroy_process_group()
    except KeyboardInterrupt:
        if lock:
            rundir.remove_partials(args.out)
        raise interrupted(args, world, status["step"]) from None
    finally:
        if lock:
            rundir.release_lock(lock)


def run(args, device, rank, world, resume_state, status):
    compute_dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed + rank)
    examples = parallel.load_examples(args.dataset, args.split, args.limit, world, device)
    gpu_memory = args.gpu_memory or (parallel.device_memory(device) / 2**30 if device.type == "cuda" else None)
    sharded, memory = memory_plan(args, rank, world, compute_dtype, gpu_memory)  # before loading
    models = parallel.build_models(args, device, world, compute_dtype, sharded)  # policy, sampler, reference
    policy, sampler, _, tokenizer = models
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=not sharded)
    start = 0
    if resume_state:
        start = rundir.load_training_state(args.resume, resume_state, policy, optimizer, sharded, rank, world)
    cfg = latro.LatroConfig(
        num_samples=args.num_samples, beta=args.beta, answer_weight=args.answer_weight,
        max_rationale_tokens=args.max_rationale_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, nonstop_penalty=not args.no_nonstop_penalty, penalty_factor=args.penalty_factor,
        micro_batch_size=args.micro_batch_size, reward=args.reward, compiled=args.compile)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:
        if resume_state:
            rundir.truncate_metrics(metrics_path, start)
        data.write_json(os.path.join(args.out, "config.json"), {"args": vars(args), "latro": asdict(cfg)})
        print_preflight(args, world, compute_dtype, sharded, memory, models, examples, start)
    wandb_run = start_wandb(args) if args.wandb and rank == 0 else None
    evaluator = None
    if args.eval_every:  # eval.py's own code path, on the held-out split, with the sampling copy of the policy
        eval_examples = parallel.load_examples(args.dataset, args.eval_split, args.eval_limit, world, device)
        evaluator = functools.partial(held_out_accuracy, sampler, tokenizer, eval_examples, args, rank)

    # Built once: the step function, the autocast context (FSDP2 casts through its MixedPrecisionPolicy instead)
    # and the gradient-sync rule that runs before each micro-batch's forward.
    autocast = torch.autocast(device.type, dtype=compute_dtype) if not sharded and compute_dtype != torch.float32 \
        else nullcontext()
    before_forward = parallel.grad_sync(policy)
    if args.method == "latro":
        step_fn = functools.partial(latro_step, models, cfg, autocast, before_forward)
    else:
        step_fn = functools.partial(sft_step, models, cfg, autocast, before_forward, device, world)
    prompt_of = functools.cache(lambda i: data.chat_prompt(tokenizer, examples[i]))  # chat-templated, once each
    per_rank = args.questions_per_step // world
    bad_steps, last_saved, t_run = 0, None, time.time()
    if evaluator and start == 0:  # the held-out accuracy before training, logged as step 0
        before = eval_metrics(evaluator(0))
        if rank == 0:
            rundir.append_metrics(metrics_path, {"step": 0} | before)
    policy.train()
    for step in range(start, args.steps):
        status["step"] = step
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.steps, args.warmup_steps)
        ids = step_questions(len(examples), step, args.questions_per_step, args.seed)  # the global batch
        ids = ids[rank * per_rank:(rank + 1) * per_rank]  # this rank's share
        progress = StepProgress(step + 1) if rank == 0 else None
        m = step_fn([examples[i] for i in ids], [prompt_of(i) for i in ids],
                    [question_seed(args.seed, step, i) for i in ids], progress)
        if progress:
            progress.close()
        bad_steps = 0 if parallel.all_ranks(math.isfinite(m["loss"]), world, device) else bad_steps + 1
        if bad_steps:
            skip_step(optimizer, m, step, bad_steps, rank, args.out)  # stops the run after MAX_BAD_STEPS in a row
            continue
        if args.grad_clip > 0:
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sampler is not parallel.unwrap(policy):  # a separate sampling copy (else it is the policy itself)
            parallel.refresh_sampler(sampler, policy)
        # log: the mean over ranks, plus this step's rates for the whole job
        tokens = m.pop("tokens")  # processed by this rank
        m = parallel.mean_across_ranks(m, world, device)
        if "sample_tokens_per_s" in m:
            m["sample_tokens_per_s"] *= world  # the mean rank's rate -> the whole job's
        elapsed = time.time() - t0
        m.update(step=step + 1, lr=optimizer.param_groups[0]["lr"], seconds=elapsed,
                 tokens_per_s=tokens * world / elapsed, peak_memory_gb=parallel.peak_memory(device) / 2**30)
        if rank == 0:
            print(progress_line(m), flush=True)
        if evaluator and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            m |= eval_metrics(evaluator(step + 1))
        if rank == 0:
            rundir.append_metrics(metrics_path, m)
            if wandb_run:
                wandb_run.log(m, step=step + 1)
        if not args.no_save and ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps):
            last_saved = rundir.save_checkpoint(args.out, step + 1, policy, sampler, tokenizer, optimizer,
                                                    sharded, rank, world, args)
    if rank == 0:
        print_summary(args, start, time.time() - t_run, last_saved, metrics_path)


def memory_plan(args, rank, world, compute_dtype, gpu_memory):
    """-> (sharded, the preflight's summary of the plan). Sharding: --fsdp on/off as given; auto asks the memory plan
    (tools/plan.py) whether a replica fits, when there are several ranks and a GPU's memory to plan against."""
    if gpu_memory is None:  # a CPU run: nothing to plan against
        return world > 1 and args.fsdp == "on", "no memory plan (CPU)"
    from tools import plan  # a tool: imported only on a GPU run
    sharded, _ = plan.choose_sharding(args, world, gpu_memory, compute_dtype)
    return sharded, plan.preflight_plan(args, rank, world, compute_dtype, sharded, gpu_memory)


def held_out_accuracy(sampler, tokenizer, examples, args, rank, step):
    """Greedy accuracy on the held-out split with eval.py's code and the sampling copy of the policy (which holds
    the current weights), printed as one line; its rationales go to <out>/eval/step-NNNNNN.jsonl in eval.py's
    record layout, to read what changed. -> eval.py's summary."""
    records, summary = evaluation.evaluate(sampler, tokenizer, examples, args.eval_max_new_tokens,
                                           compiled=args.compile)
    if rank == 0:
        data.write_atomic(Path(args.out) / "eval" / f"step-{step:06d}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        greedy = summary["metrics"]["greedy"]
        print(f"eval | step {step} | held-out greedy accuracy {greedy['accuracy']:.1%} ({greedy['correct']}/"
              f"{greedy['n']}, 95% CI {greedy['ci95'][0]:.1%}-{greedy['ci95'][1]:.1%}) | {summary['seconds']:.0f}s",
              flush=True)
    return summary


def eval_metrics(summary):
    """What metrics.jsonl logs of a held-out evaluation: accuracy, the mean greedy rationale length, questions."""
    return {"eval_accuracy": summary["accuracy"], "eval_tokens": summary["generated_tokens"] / summary["n"],
            "eval_questions": summary["n"]}


def skip_step(optimizer, m, step, bad_steps, rank, out):
    """A non-finite loss on any rank: the step's gradients are dropped (every rank skips it alike); MAX_BAD_STEPS
    in a row stop the run."""
    optimizer.zero_grad(set_to_none=True)
    if rank == 0:
        print(f"warning: step {step + 1}: non-finite loss ({m['loss']}); step skipped "
              f"({bad_steps}/{MAX_BAD_STEPS} in a row)", flush=True)
    if bad_steps >= MAX_BAD_STEPS:
        bad = ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, float) and not math.isfinite(v))
        raise TrainingStopped(f"steps {step + 2 - MAX_BAD_STEPS}-{step + 1}: {MAX_BAD_STEPS} non-finite "
                              f"losses in a row ({bad}); stopped, nothing saved for them; last good "
                              f"checkpoint: {(rundir.checkpoints(out) or ['none'])[-1]}")


def interrupted(args, world, step):
    """Ctrl-C during `step` (0-based): where the run stopped and how to continue it, as one line."""
    last = (rundir.checkpoints(args.out) or [None])[-1]
    launcher = f"torchrun --nproc_per_node {world} train.py" if world > 1 else "python train.py"
    stopped = TrainingStopped(
        f"interrupted during step {step + 1} ({step} of {args.steps} done); " +
        (f"last checkpoint: {last}; continue with: {launcher} --resume {last}" if last else
         "no checkpoint written yet (--save-every N writes some); start again" +
         (" with --overwrite" if os.path.isdir(args.out) and rundir.holds_run(args.out) else "")))
    stopped.exit_code = 130
    return stopped


# --------------------------------------------------------------------------------------------------------------
# What a run prints: the preflight line (with the memory plan above it), a line per step, a final summary

def print_preflight(args, world, compute_dtype, sharded, memory, models, examples, start):
    n_params = sum(p.numel() for p in parallel.unwrap(models.policy).parameters())
    print(f"preflight | model {args.model} | {n_params / 1e6:.1f}M params | world {world} | "
          f"{'FSDP2' if sharded else 'DDP' if world > 1 else 'single'} | compute {str(compute_dtype)[6:]} | "
          f"activation checkpointing {'on' if parallel.checkpointing_on(args, sharded) else 'off'} | "
          f"{args.recipe} recipe | {memory} | {len(examples)} questions | "
          f"{args.questions_per_step} questions x K={args.num_samples} per step | {os.path.basename(args.dataset)} "
          f"({examples[0].task} prompts), beta {args.beta} | steps {start}->{args.steps}", flush=True)


def start_wandb(args):
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed; logging to metrics.jsonl only", flush=True)
        return None
    return wandb.init(project=args.wandb, config=vars(args))


def progress_line(m):
    if "reward" in m:
        return (f"step {m['step']:>4} | loss {m['loss']:+.4f} | reward {m['reward']:8.3f} | kl {m['kl']:+.4f} | "
                f"len {m['rationale_len']:5.1f} | stop {m['stop_rate']:.2f} | acc {m.get('accuracy', float('nan')):.2f} "
                f"| sample {m['sample_tokens_per_s']:.0f} tok/s | step {m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e}")
    return f"step {m['step']:>4} | sft loss {m['loss']:.4f} | {m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e}"


def print_summary(args, start, seconds, last_saved, metrics_path):
    rows = []
    if os.path.isfile(metrics_path):
        rundir.plot_curves(metrics_path, os.path.join(args.out, "curves.png"))
        rows = rundir.read_metrics(metrics_path)
    last = next((row for row in reversed(rows) if "loss" in row), {})
    evals = {row["step"]: row for row in rows if "eval_accuracy" in row}
    print(f"done | {args.method} {args.model} on {args.dataset} | steps {start}->{args.steps} in {seconds:.0f}s | "
          f"final reward {last.get('reward', float('nan')):.3f} kl {last.get('kl', float('nan')):.4f} loss "
          f"{last.get('loss', float('nan')):.4f} | checkpoint {last_saved or 'none'} | metrics {metrics_path}",
          flush=True)
    if 0 in evals and args.steps in evals and args.steps > 0:  # also after a resume: both are in metrics.jsonl
        before, after = evals[0], evals[args.steps]
        print(f"held-out accuracy | {before['eval_accuracy']:.1%} before training -> {after['eval_accuracy']:.1%} "
              f"after {args.steps} steps ({after['eval_questions']} {os.path.basename(args.dataset)} "
              f"{args.eval_split} questions, greedy)", flush=True)


class StepProgress:
    """Progress inside a step, fed by latro.sample, compute_advantages and backward_on_rollout: on a terminal one
    tqdm-style line rewritten in place; into a file a plain line at most every `every` seconds (the first after
    `every` seconds, so short steps add nothing to a log)."""

    UNITS = {"sample": "decoding steps", "score": "micro-batches", "train": "micro-batches"}

    def __init__(self, step, stream=None, every=30.0):
        self.step, self.stream = step, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = 0.5 if self.tty else every
        self.phase, self.width = None, 0
        self.phase_start = self.last = time.time()

    def __call__(self, phase, done, total, rows_finished, rows, tokens):
        now = time.time()
        if phase != self.phase:
            self.phase, self.phase_start = phase, now
        if now - self.last < self.every and not (self.tty and done == total):
            return
        self.last = now
        elapsed = now - self.phase_start
        eta = elapsed / done * (total - done)
        text = f"step {self.step} | {phase} {done}/{total} {self.UNITS[phase]} | {rows_finished}/{rows} rows done"
        if phase == "sample":  # rows may stop early, so the decoding-step ETA is an upper bound
            text += f" | {tokens} tokens, {tokens / max(elapsed, 1e-9):.0f} tok/s | ETA <= {eta:.0f}s"
        else:
            text += f" | ETA {eta:.0f}s"
        if self.tty:
            self.stream.write("\r" + text.ljust(self.width))
            self.width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


# --------------------------------------------------------------------------------------------------------------
# The command line

def main(argv=None):
    args = parse_args(argv)
    try:
        if args.plan:  # the memory plan of the run these flags describe, simulated on the CPU
            fill_defaults(args)
            world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
            check_args(args, world)
            from tools import plan  # a tool: imported only when asked for
            plan.print_plan(args, world)
        else:
            train(args)
    except (ValueError, FileNotFoundError) as e:  # a bad flag or input: nothing was trained
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingStopped, rundir.SaveFailed) as e:  # non-finite losses, a failed save, Ctrl-C
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))


if __name__ == "__main__":
    parallel.run_main(main)
