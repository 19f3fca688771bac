"""Trains a language model with LaTRO (latro.py), or with the paper's SFT baseline.

    python train.py                                            # a laptop CPU: smollm2-135m learns arith
    python train.py --model llama-3.1-8b --dataset gsm8k      # the paper's recipe (PAPER below)
    torchrun --nproc_per_node 8 train.py --model llama-3.1-8b  # data-parallel; FSDP2 when a replica would not fit
    python train.py --resume runs/latro-arith/checkpoint-000020  # continue a run exactly where it stopped
    python train.py --method sft                               # the SFT baseline: same loop, gold rationales
    python train.py --model llama-3.1-8b --plan --nproc 8 --gpu-memory 80   # memory plan, simulated on the CPU

One step (`train_loop`, the whole update on one screen): each rank samples K rationales for its share of the
step's questions, scores them without gradients (policy, reference, self-reward: the advantages), recomputes the
log-probabilities with gradients micro-batch by micro-batch, and takes one AdamW step. Master weights are fp32 (at
lr 5e-7 a bf16 update rounds to nothing); compute is bf16 on GPU, through autocast (DDP) or FSDP2's mixed precision,
and sampling uses a bf16 copy of the policy refreshed after every step.

With --eval-every N the run measures greedy accuracy on the validation split every N steps, keeps the checkpoint
of the best step (best.json names it) and, with --test-limit, reports the test accuracy of that checkpoint against
the base model's once training is over: the checkpoint is chosen without looking at test.
"""
import argparse
import gc
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

import data
import eval as evaluation
import latro
import parallel
import rundir
from model import (ALIASES, build_on_meta, fingerprint, load, merge_lora, pad_right, resolve_dtype, save,
                   token_logprobs)


# --------------------------------------------------------------------------------------------------------------
# The loop

def train_loop(args, run, start):
    """Steps start..args.steps of a set-up run (setup() below): sample, score, backward, step, log, evaluate, save."""
    policy, sampler, reference, tokenizer, optimizer = run.policy, run.sampler, run.reference, run.tokenizer, \
        run.optimizer
    cfg, rank, world = run.cfg, run.rank, run.world
    per_rank = args.questions_per_step // world
    bad_steps = 0
    policy.train()
    for step in range(start, args.steps):
        run.status["step"] = step
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, args.steps, args.warmup_steps)
        ids = step_questions(len(run.examples), step, args.questions_per_step, args.seed)  # the global batch
        ids = ids[rank * per_rank:(rank + 1) * per_rank]                                    # this rank's share
        batch = [run.examples[i] for i in ids]
        prompts = [run.prompt(i) for i in ids]
        progress = rundir.StepProgress(step + 1) if rank == 0 else None
        if args.method == "latro":
            sampler.eval()  # no dropout while sampling and scoring (under LoRA the sampler is the policy)
            ro = latro.sample(sampler, tokenizer, prompts, [e.answer_text for e in batch], cfg,           # z ~ pi
                              seeds=[question_seed(args.seed, step, i) for i in ids], progress=progress)
            t_sample = time.time()
            correct = stated_answer_correct(batch, ro.rationales, cfg.num_samples)  # logged; "exact"'s reward
            terms = latro.compute_advantages(sampler, reference, ro, cfg, correct, progress)  # R, KL, RLOO A
            t_score = time.time()
            policy.train()
            with run.autocast:
                losses = latro.backward_on_rollout(policy, ro, terms.advantages, cfg, run.before_forward, progress)
            m = rollout_metrics(ro, terms, correct) | losses | {
                "time_sample": t_sample - t0, "time_score": t_score - t_sample, "time_backward": time.time() - t_score,
                "sample_tokens_per_s": ro.sampled_tokens * world / max(t_sample - t0, 1e-9)}
            tokens = ro.sampled_tokens
        else:  # the SFT baseline: -log pi(gold rationale + y | x), the same questions and optimizer
            with run.autocast:
                m = sft_backward(policy, tokenizer, batch, prompts, cfg.micro_batch_size, run.before_forward,
                                 run.device, world)
            tokens = m["target_tokens"] / world
        if progress:
            progress.close()
        bad_steps = 0 if parallel.all_ranks(math.isfinite(m["loss"]), world, run.device) else bad_steps + 1
        if bad_steps:
            skip_step(optimizer, m, step, bad_steps, rank, args.out)  # stops the run after MAX_BAD_STEPS in a row
            continue
        if args.grad_clip > 0:
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sampler is not parallel.unwrap(policy):  # a separate sampling copy, else the policy samples itself
            parallel.refresh_sampler(sampler, policy)

        m = parallel.mean_across_ranks(m, world, run.device)
        elapsed = time.time() - t0
        m.update(step=step + 1, lr=optimizer.param_groups[0]["lr"], seconds=elapsed,
                 tokens_per_s=tokens * world / elapsed, peak_memory_gb=parallel.peak_memory(run.device) / 2**30)
        if rank == 0:
            print(rundir.progress_line(m), flush=True)
        evaluated = run.evaluate and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps)
        if evaluated:
            m |= run.evaluate(step + 1)
        if rank == 0:
            run.log(m)
        best = evaluated and new_best(run, m)
        saving = best or step + 1 == args.steps or args.save_every and (step + 1) % args.save_every == 0
        if saving and not args.no_save:
            run.last_saved = rundir.save_checkpoint(args.out, step + 1, policy, sampler, tokenizer, optimizer,
                                                    run.sharded, rank, world, args)
            if best and rank == 0:
                rundir.mark_best(args.out, run.last_saved, m)
            if rank == 0 and args.keep_last:
                rundir.prune_checkpoints(args.out, args.keep_last, run.last_saved)


# --------------------------------------------------------------------------------------------------------------
# The pieces of a step

def stated_answer_correct(batch, rationales, k):
    """(N,) bool: whether each rationale states its question's gold answer (extracted as eval.py extracts it)."""
    return torch.tensor([evaluation.is_correct(batch[i // k], evaluation.extract_answer(batch[i // k], text))
                         for i, text in enumerate(rationales)])


def rollout_metrics(ro, terms, correct):
    """What metrics.jsonl logs of a rollout and its terms, as means over this rank's rows. With group-centred
    advantages the loss says little: watch the reward, KL, rationale length and stop rate."""
    return {
        "reward": terms.reward.mean().item(),                 # mean log pi(y|x,z), before the penalty
        "reward_penalised": terms.reward_penalised.mean().item(),
        "kl": (terms.logp - terms.logp_ref).mean().item(),    # sequence-level k1 estimate of KL[pi || pi_ref]
        "adjusted_reward": terms.adjusted_reward.mean().item(),
        "advantage_std": terms.advantages.std().item(),
        "rationale_len": (ro.rationale_end - ro.prompt_end).float().mean().item(),
        "stop_rate": ro.stopped.float().mean().item(),
        "accuracy": correct.float().mean().item(),           # of the answers the rationales state
    }


def sft_backward(policy, tokenizer, batch, prompts, micro_batch_size, before_forward, device, world):
    """The SFT baseline's backward: -mean log pi(gold rationale + answer | x) per target token of the whole step
    (every rank's), micro-batch by micro-batch."""
    targets = [tokenizer.encode((e.rationale.strip() + "\n" if e.rationale.strip() else "") + e.answer_text,
                                add_special_tokens=False) + [tokenizer.eot_id] for e in batch]
    n_tokens = torch.tensor(float(sum(len(y) for y in targets)), device=device)
    if world > 1:
        dist.all_reduce(n_tokens)
    n_tokens = n_tokens.item() / world  # DDP / FSDP2 average the ranks' gradients: this makes it a mean per token
    rows = [x + y for x, y in zip(prompts, targets)]
    spans = [(len(x), len(x) + len(y)) for x, y in zip(prompts, targets)]
    loss_sum, starts = 0.0, range(0, len(rows), micro_batch_size)
    for j, i in enumerate(starts):
        tokens = pad_right(rows[i:i + micro_batch_size], device)                               # (B, T)
        begin, end = torch.tensor(spans[i:i + micro_batch_size], device=device).unbind(1)      # (B,), (B,)
        before_forward(j == len(starts) - 1)
        loss = -token_logprobs(policy, tokens, begin, end).sum() / n_tokens
        loss.backward()
        loss_sum += loss.item()
    return {"loss": loss_sum, "target_tokens": n_tokens * world}


def step_questions(n_examples, step, per_step, seed):
    """Global question indices of `step` (0-based): seeded permutations, epoch after epoch, so a resumed run sees
    exactly the questions a straight run would."""
    out = []
    for i in range(step * per_step, (step + 1) * per_step):
        epoch, j = divmod(i, n_examples)
        out.append(torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))[j].item())
    return out


def question_seed(seed, step, index):
    """A question's sampling seed: its samples depend on it alone, not on the batch layout or the world size."""
    return (seed * 1_000_003 + step * 100_003 + index) % 2**62


def lr_factor(step, steps, warmup):
    """Linear warm-up, then linear decay to 0 at the last step (the paper: no warm-up, linear decay)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def skip_step(optimizer, m, step, bad_steps, rank, out):
    """A non-finite loss on any rank: every rank drops the step's gradients; MAX_BAD_STEPS in a row stop the run."""
    optimizer.zero_grad(set_to_none=True)
    if rank == 0:
        print(f"warning: step {step + 1}: non-finite loss ({m['loss']}); step skipped "
              f"({bad_steps}/{MAX_BAD_STEPS} in a row)", flush=True)
    if bad_steps >= MAX_BAD_STEPS:
        bad = ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, float) and not math.isfinite(v))
        raise TrainingStopped(f"steps {step + 2 - MAX_BAD_STEPS}-{step + 1}: {MAX_BAD_STEPS} non-finite "
                              f"losses in a row ({bad}); stopped, nothing saved for them; last good "
                              f"checkpoint: {(rundir.checkpoints(out) or ['none'])[-1]}")


# --------------------------------------------------------------------------------------------------------------
# Setting a run up: processes, run directory, data, models; and what happens around the loop

class Run(argparse.Namespace):
    """Everything the loop uses: models, optimizer, data, the objective's config and the run's bookkeeping."""


def train(args):
    """Resolves the flags (a resumed run's come from its checkpoint), checks every input before any weight loads,
    takes the run directory, trains, then reports. Ctrl-C and SIGTERM stop with one line saying how to resume."""
    device, rank, world = parallel.setup_distributed(args.device)
    resume_state = rundir.read_resume_state(args) if args.resume else None
    if resume_state:
        rundir.restore_run_args(args, resume_state, world)
    fill_defaults(args)
    check_args(args, world)
    run = Run(device=device, rank=rank, world=world, status={"step": resume_state["step"] if resume_state else 0},
              last_saved=None, lock=None)
    rundir.check_out(args.out)
    inputs = check_inputs(args, run, resume_state)              # data, context length, pins: before any weights
    signal.signal(signal.SIGTERM, terminated)  # a scheduler's preemption stops the run as Ctrl-C does
    t_run = time.time()
    try:
        run.lock = parallel.on_rank0(rank, lambda: rundir.prepare_run_dir(args, run.status["step"]))
        setup(args, run, inputs, resume_state)
        train_loop(args, run, run.status["step"])
        if args.test_limit and run.evaluate:
            report_test(args, run)
        if world > 1:  # gloo may abort at exit when FSDP modules holding buffers outlive the process group
            gc.collect()
            dist.destroy_process_group()
    except KeyboardInterrupt as e:
        raise stopped(args, run, "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):  # a missing input: a clear error of its own
            raise
        raise stopped(args, run, rundir.one_line(e)) from None  # e.g. a full disk while logging
    except RuntimeError as e:
        if world > 1 and parallel.peer_lost(e):  # a collective failed because another rank died
            raise stopped(args, run, "a peer process was lost") from None
        raise
    finally:
        if run.lock:
            parallel.release_lock(run.lock)
    if rank == 0:
        rundir.print_summary(args, run, time.time() - t_run)


def check_inputs(args, run, resume_state):
    """Every input that can be checked without the weights: the training and evaluation questions (disjoint), the
    prompts against the model's context, and, on a resume, that the base model and the data are the run's own."""
    examples = parallel.load_examples(args.dataset, args.split, args.limit, run.world, run.device)
    eval_examples = None
    if args.eval_every:
        eval_examples = parallel.load_examples(args.eval_dataset or args.dataset, args.eval_split, args.eval_limit,
                                               run.world, run.device)
        shared = {e.prompt_text for e in eval_examples} & {e.prompt_text for e in examples}
        if shared:
            raise ValueError(f"--eval-every: {len(shared)} of the {len(eval_examples)} evaluation questions are also "
                             f"training questions (e.g. {next(iter(shared))[:60]!r}); held-out accuracy needs "
                             "disjoint data: pass --eval-dataset FILE or another --eval-split")
    meta, tokenizer, directory = build_on_meta(args.model)
    if args.lora and meta.args.model_type == "phi3":
        raise ValueError("--lora: phi3 is not supported (its checkpoint fuses q/k/v and gate/up, where PEFT's "
                         "adapters sit); train it in full")
    context = meta.args.max_seq_len
    for what, questions, length in (("--max-rationale-tokens", examples, args.max_rationale_tokens),
                                    ("--eval-max-new-tokens", eval_examples or [], args.eval_max_new_tokens)):
        for e in questions:  # a training row is [x | z | y], y the answer template and its end-of-turn token
            n = len(data.chat_prompt(tokenizer, e))
            new = length + (len(tokenizer.encode(e.answer_text, add_special_tokens=False)) + 1 if questions is
                            examples else 0)
            if n + new > context:
                raise ValueError(f"{what}: question {e.id} has a {n}-token prompt, which with {new} more tokens "
                                 f"exceeds the model's context of {context} (max_position_embeddings)" +
                                 ("; the prompt alone does not fit" if n >= context else ""))
    pins = {"base_model_path": os.path.abspath(directory), "base_fingerprint": fingerprint(directory),
            "dataset_sha256": data.content_hash(examples)}
    if resume_state:
        rundir.check_pins(args, resume_state, pins)
    args.pins = pins
    return examples, eval_examples, tokenizer


def setup(args, run, inputs, resume_state):
    """Models (replicated or sharded), optimizer and resumed state, the objective's config, and the evaluator."""
    run.examples, eval_examples, _ = inputs
    compute_dtype = resolve_dtype(args.dtype, run.device)
    torch.manual_seed(args.seed + run.rank)
    gpu_memory = args.gpu_memory or (parallel.device_memory(run.device) / 2**30 if run.device.type == "cuda" else None)
    run.sharded, memory = memory_plan(args, run.rank, run.world, compute_dtype, gpu_memory)   # before loading
    run.policy, run.sampler, run.reference = parallel.build_models(
        args.resume or args.model, args.model, run.device, run.world, compute_dtype, run.sharded,
        parallel.checkpointing_on(args, run.sharded), lora=args.lora and (args.lora, args.lora_alpha,
                                                                          args.lora_dropout),
        adapter=args.lora and args.resume)
    run.tokenizer = inputs[2]
    run.optimizer = torch.optim.AdamW([p for _, p in rundir.trainable(run.policy)], lr=args.lr, betas=(0.9, 0.999),
                                      eps=1e-8, weight_decay=args.weight_decay, fused=not run.sharded)
    if resume_state:
        rundir.load_training_state(args.resume, resume_state, run.policy, run.optimizer, run.sharded, run.rank,
                                   run.world)
    run.cfg = latro.LatroConfig(
        num_samples=args.num_samples, beta=args.beta, answer_weight=args.answer_weight,
        max_rationale_tokens=args.max_rationale_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, nonstop_penalty=not args.no_nonstop_penalty, penalty_factor=args.penalty_factor,
        micro_batch_size=args.micro_batch_size, reward_kind=args.reward, compiled=args.compile,
        sample_questions=args.sample_questions)
    run.autocast = parallel.autocast(run.device, compute_dtype, run.sharded)
    run.before_forward = parallel.grad_sync(run.policy)
    prompts = {}
    run.prompt = lambda i: prompts.get(i) or prompts.setdefault(i, data.chat_prompt(run.tokenizer, run.examples[i]))
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    wandb_run = rundir.start_wandb(args) if args.wandb and run.rank == 0 else None
    run.log = lambda m: (rundir.append_metrics(metrics_path, m), wandb_run and wandb_run.log(m, step=m["step"]))
    if run.rank == 0:
        if resume_state:
            rundir.truncate_metrics(metrics_path, run.status["step"])
        data.write_json(os.path.join(args.out, "config.json"), {"args": vars(args), "latro": asdict(run.cfg)})
        rundir.print_preflight(args, run, compute_dtype, memory)
    run.evaluate, run.best = None, parallel.on_rank0(run.rank, lambda: rundir.best_so_far(args.out))
    if args.eval_every:
        run.evaluate = lambda step: evaluate_split(args, run, eval_examples, step)
        if run.status["step"] == 0:  # the base model's accuracy, logged as step 0
            before = run.evaluate(0)
            if run.rank == 0:
                run.log({"step": 0} | before)


def memory_plan(args, rank, world, compute_dtype, gpu_memory):
    """-> (sharded, the preflight's summary of the plan). --fsdp on/off as given; auto asks the memory plan
    (tools/plan.py) whether a replica fits, when there is a GPU's memory to plan against."""
    if gpu_memory is None:  # a CPU run: nothing to plan against
        return world > 1 and args.fsdp == "on" and not args.lora, "no memory plan (CPU)"
    from tools import plan  # a tool, imported only for a GPU run
    sharded, _ = plan.choose_sharding(args, world, gpu_memory, compute_dtype)
    return sharded, plan.preflight_plan(args, rank, world, compute_dtype, sharded, gpu_memory)


def new_best(run, m):
    """Whether this evaluation is the best so far (the earliest step wins a tie); the same answer on every rank."""
    if run.best is not None and m["eval_accuracy"] <= run.best[1]:
        return False
    run.best = (m["step"], m["eval_accuracy"])
    return True


def evaluate_split(args, run, examples, step):
    """Greedy accuracy of the current weights (the sampling copy) on the evaluation split, with eval.py's code; one
    printed line, the rationales in <out>/eval/step-NNNNNN.jsonl. -> what metrics.jsonl logs of it."""
    records, summary = evaluation.evaluate(run.sampler, run.tokenizer, examples, args.eval_max_new_tokens,
                                           compiled=args.compile)
    if run.rank == 0:
        data.write_atomic(os.path.join(args.out, "eval", f"step-{step:06d}.jsonl"),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
        print(f"eval | step {step} | {rundir.accuracy_text(summary, rundir.split_label(args))} | "
              f"{summary['seconds']:.0f}s", flush=True)
    return {"eval_accuracy": summary["accuracy"], "eval_tokens": summary["generated_tokens"] / summary["n"],
            "eval_questions": summary["n"], "eval_split": rundir.split_label(args)}


def report_test(args, run):
    """--test-limit: the test accuracy of the base model and of the checkpoint chosen on validation, once, after
    training (nothing is chosen on it): <out>/test.json, and the run's printed before -> after."""
    best = parallel.on_rank0(run.rank, lambda: rundir.read_best(args.out))
    if best is None:
        return
    examples = parallel.load_examples(args.dataset, "test", args.test_limit, run.world, run.device)
    results = {}
    for name, source in (("base", args.model), ("best", best["checkpoint"])):
        model, tokenizer = load(source, device=run.device, dtype=resolve_dtype(args.dtype, run.device))
        _, results[name] = evaluation.evaluate(model, tokenizer, examples, args.eval_max_new_tokens,
                                               compiled=args.compile)
        del model
    if run.rank == 0:
        data.write_json(os.path.join(args.out, "test.json"), {"split": "test", "best_step": best["step"],
                                                               "checkpoint": best["checkpoint"], **results})
        run.test = (results["base"], results["best"], best)


class Terminated(KeyboardInterrupt):
    """SIGTERM, which a cluster scheduler sends on preemption."""


def terminated(signum, frame):
    raise Terminated


class TrainingStopped(RuntimeError):
    """The run stopped for a reason that is not a bad flag (non-finite losses, Ctrl-C, a lost peer): one line."""
    exit_code = 1


def stopped(args, run, why):
    """Where the run stopped and how to continue it, as one line (printed by rank 0 only)."""
    if run.lock and run.rank == 0:
        rundir.remove_partials(args.out)
    step = run.status["step"]
    last = (rundir.checkpoints(args.out) or [None])[-1]
    launcher = f"torchrun --nproc_per_node {run.world} train.py" if run.world > 1 else "python train.py"
    e = TrainingStopped(
        (f"rank {run.rank}: " if why == "a peer process was lost" else "") +
        f"{why} during step {step + 1} ({step} of {args.steps} done); " +
        (f"last checkpoint: {last}; continue with: {launcher} --resume {last}" if last else
         "no checkpoint written yet (--save-every N writes some); start again" +
         (" with --overwrite" if os.path.isdir(args.out) and rundir.holds_run(args.out) else "")))
    e.exit_code = {"interrupted": 130, "terminated (SIGTERM)": 143}.get(why, 1)
    e.quiet = run.rank != 0 and why != "a peer process was lost"  # one line from rank 0, not one per rank
    return e


# --------------------------------------------------------------------------------------------------------------
# Recipes and flags. Unset flags come from the paper's recipe for the paper's models, else from the laptop one.

# The paper (§5.1 and the official training.sh): lr 5e-7, K = 16, L = 500, T = 1, AdamW without warm-up, linear
# decay, 24 questions (384 rollouts) per step; 6 "epochs" of GSM8K rollouts = 117 steps, 12 of ARC = 35.
PAPER = dict(lr=5e-7, num_samples=16, questions_per_step=24, max_rationale_tokens=500, micro_batch_size=4,
             steps={"gsm8k": 117, "arc_challenge": 35}, answer_weight=1.0, eval_every=0, eval_max_new_tokens=500,
             test_limit=0)
# A laptop CPU (README, "Does it work?"): SmolLM2-135M on arith, chosen on the validation split.
LAPTOP = dict(lr=2e-5, num_samples=8, questions_per_step=4, max_rationale_tokens=96, micro_batch_size=4,
              steps={"gsm8k": 60, "arc_challenge": 60}, answer_weight=0.0, eval_every=10, eval_max_new_tokens=128,
              test_limit=200)
PAPER_MODELS = ("llama-3.1-8b", "mistral-7b", "phi-3.5-mini")
BETA = {"gsm8k": 0.05, "arc_challenge": 0.25}  # the paper's KL coefficients
MAX_BAD_STEPS = 3  # abort after this many non-finite losses in a row
P, N, U = parallel.POSITIVE, parallel.NON_NEGATIVE, parallel.UNIT
RANGES = {"--steps": P, "--questions-per-step": P, "--num-samples": (lambda v: v >= 2, "K >= 2 (RLOO)"),
          "--micro-batch-size": P, "--max-rationale-tokens": P, "--limit": P, "--eval-limit": P, "--test-limit": N,
          "--eval-max-new-tokens": P, "--lr": (lambda v: 0 < v <= 1e-2, "0 < lr <= 1e-2 (the paper: 5e-7)"),
          "--warmup-steps": N, "--weight-decay": N, "--grad-clip": N, "--beta": N, "--answer-weight": N,
          "--temperature": (lambda v: v > 0, "> 0 (rationales are sampled)"), "--top-p": U, "--top-k": N,
          "--penalty-factor": N, "--save-every": N, "--keep-last": N, "--eval-every": N, "--seed": N,
          "--nproc": P, "--gpu-memory": (lambda v: v > 0, "GiB > 0"), "--plan-prompt-tokens": P, "--lora": N,
          "--lora-alpha": (lambda v: v > 0, "> 0"), "--lora-dropout": (lambda v: 0 <= v < 1, "0 <= p < 1"),
          "--sample-questions": N}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--model", default=None, help=f"local HF directory, hub id, or alias ({', '.join(ALIASES)}); default "
        "smollm2-135m, or the resumed run's model")
    add("--dataset", default="arith", help="arith (generated), gsm8k, arc_challenge, or a .jsonl file in either layout")
    add("--split", default="train")
    add("--limit", type=int, default=None, help="use only the first N training questions")
    add("--method", choices=("latro", "sft"), default="latro")
    add("--steps", type=int, default=None, help="optimizer steps (paper: 117 gsm8k, 35 arc)")
    add("--questions-per-step", type=int, default=None, help="global batch, in questions (paper: 24)")
    add("--num-samples", "-K", type=int, default=None, help="rationales per question (paper: 16)")
    add("--micro-batch-size", type=int, default=None, help="rollout rows per forward/backward")
    add("--lr", type=float, default=None, help="peak learning rate (paper: 5e-7)")
    add("--warmup-steps", type=int, default=0)
    add("--weight-decay", type=float, default=0.0)
    add("--grad-clip", type=float, default=0.0, help="max gradient norm; 0 = off (as the official code)")
    add("--beta", type=float, default=None, help="KL coefficient (paper: 0.05 gsm8k, 0.25 arc)")
    add("--reward", choices=("self", "exact"), default="self", help="self: R = log pi(y|x,z), LaTRO; exact: R = 1 "
        "if the stated answer is right (the verifiable-reward RLOO baseline, same KL and advantages)")
    add("--answer-weight", type=float, default=None, help="alpha on -log pi(y|x,z): 1 in the paper's Eq. 4 (the "
        "official code: 0); default 1 for the paper's recipe, 0 for the laptop recipe and --reward exact")
    add("--max-rationale-tokens", type=int, default=None, help="L (paper: 500)")
    add("--temperature", type=float, default=1.0)
    add("--top-p", type=float, default=1.0)
    add("--top-k", type=int, default=0)
    add("--no-nonstop-penalty", action="store_true", help="do not penalise rationales that never stop")
    add("--penalty-factor", type=float, default=2.0, help="gamma: R := gamma * batch-mean R if not stopped")
    add("--lora", type=int, default=0, help="rank of LoRA adapters on every attention and MLP projection (the "
        "frozen base is pi_ref, in the compute dtype); 0 = full fine-tuning, the paper's recipe")
    add("--lora-alpha", type=float, default=None, help="LoRA scaling alpha / r (PEFT's lora_alpha; default 2r)")
    add("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (PEFT's lora_dropout)")
    add("--merge-lora", nargs=2, metavar=("ADAPTER", "OUT"), help="write an adapter checkpoint merged into its base "
        "model, in the Hugging Face layout, and exit")
    add("--sample-questions", type=int, default=0, help="questions per sampling call (0 = all of a rank's): bounds "
        "the KV cache; the samples are the same")
    add("--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="compute dtype (master weights are "
        "always fp32); auto = bf16 on GPU and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32")
    add("--compile", action="store_true", help="sample with the torch.compile'd decoding step (CUDA graphs on GPU)")
    add("--fsdp", choices=("auto", "on", "off"), default="auto",
        help="shard params, grads and optimizer state with FSDP2; auto = when a replica would not fit")
    add("--activation-checkpointing", nargs="?", const="on", choices=("auto", "on", "off"), default="auto",
        help="recompute each block's activations in backward; auto = on when sharded")
    add("--plan", action="store_true", help="print the memory plan of this configuration (simulated on the CPU: "
        "no GPU, weights or data needed) and exit")
    add("--nproc", type=int, default=None, help="with --plan: the number of GPUs (default: WORLD_SIZE or 1)")
    add("--gpu-memory", type=float, default=None, help="GiB per GPU to plan against (the GPU's own; 80 for --plan)")
    add("--no-plan", action="store_true", help="skip the memory plan in the preflight of a GPU run")
    add("--plan-prompt-tokens", type=int, default=None, help="prompt length the plan assumes (default 250)")
    add("--out", default=None, help="run directory (default runs/<method>-<dataset>)")
    add("--overwrite", action="store_true", help="move a run already in --out aside (to <out>.bak) and start anew")
    add("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end); 0 = end only")
    add("--no-save", action="store_true", help="write no checkpoint at all")
    add("--resume", default=None, help="a checkpoint written by this script; every flag not given is restored")
    add("--allow-recipe-change", action="store_true",
        help="on --resume, allow flags (or data) that change the data order or the objective (recorded)")
    add("--keep-last", type=int, default=0, help="keep only the newest N checkpoints (and the best); 0 = all")
    add("--eval-every", type=int, default=None, help="validation accuracy (greedy, eval.py) before the first step, "
        "every N steps and after the last; the best step's checkpoint is kept (default: 10 laptop, 0 paper)")
    add("--eval-split", default="validation", help="the split --eval-every reads (test only when given explicitly)")
    add("--eval-dataset", default=None, help="held-out questions for --eval-every when --dataset is a file")
    add("--eval-limit", type=int, default=200, help="questions per evaluation")
    add("--eval-max-new-tokens", type=int, default=None, help="default: 128 laptop, 500 paper recipe")
    add("--test-limit", type=int, default=None, help="after training, the test accuracy of the base model and of "
        "the best checkpoint on the first N test questions; 0 = off (default: 200 laptop, 0 paper)")
    add("--seed", type=int, default=0)
    add("--wandb", default=None, help="wandb project name (only if wandb is installed)")
    add("--device", default=None, help="cuda or cpu; default cuda when available")
    args = p.parse_args(argv)
    for action in p._actions:  # parse again with no defaults: what is left is what the user typed
        action.default = argparse.SUPPRESS
    args.explicit = sorted(vars(p.parse_args(argv)))
    args.recipe_changes = []  # filled on --resume with --allow-recipe-change
    return args


def paper_model(name):
    """Which of the paper's models `name` is: an alias, its hub id, or a local copy of the same shape; else None."""
    from tools import plan
    by_repo = {ALIASES[a]: a for a in PAPER_MODELS}
    if name in PAPER_MODELS or name in by_repo:
        return by_repo.get(name, name)
    try:
        with open(os.path.join(name, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):  # not a local copy; loading reports a broken config.json itself
        return None
    return next((a for a in PAPER_MODELS if plan.same_architecture(config, plan.CONFIGS[a])), None)


def fill_defaults(args):
    """Unset flags from the recipe; the task (and so beta) from the data's layout, not from the file's name."""
    args.model = args.model or "smollm2-135m"
    args.dataset = rundir.dataset_id(args.dataset)
    if args.eval_dataset:
        args.eval_dataset = rundir.dataset_id(args.eval_dataset)
    args.recipe = "paper" if paper_model(args.model) else "laptop"
    preset = PAPER if args.recipe == "paper" else LAPTOP
    task = data.detect_task(args.dataset, args.split)
    for key in ("lr", "num_samples", "questions_per_step", "max_rationale_tokens", "micro_batch_size", "eval_every",
                "eval_max_new_tokens", "test_limit"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if "eval_every" not in args.explicit and not args.eval_dataset and args.dataset not in data.SPLITS and \
            not os.path.isdir(args.dataset):
        args.eval_every = 0  # one training file has no held-out split to evaluate on (--eval-dataset gives one)
    if "test_limit" not in args.explicit and (not args.eval_every or args.dataset not in data.SPLITS):
        args.test_limit = 0  # the recipe's test report needs a chosen checkpoint and a named test split
    args.steps = args.steps if args.steps is not None else preset["steps"][task]
    args.beta = args.beta if args.beta is not None else BETA[task]
    if args.lora and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora
    if args.answer_weight is None:  # the verifiable-reward baseline trains on its reward alone, as GRPO/RLOO do
        args.answer_weight = 0.0 if args.reward == "exact" else preset["answer_weight"]
    args.out = args.out or (rundir.run_of(args.resume) if args.resume
                            else os.path.join("runs", f"{args.method}-{os.path.basename(args.dataset).split('.')[0]}"))
    return args


def check_args(args, world):
    """Every flag problem, found before anything is loaded or written."""
    parallel.check_flags(args, RANGES if args.method == "latro" else {**RANGES, "--num-samples": N})
    if args.questions_per_step % world:
        raise ValueError(f"--questions-per-step {args.questions_per_step} is not divisible by the world size {world}")
    if not args.lora and {"lora_alpha", "lora_dropout"} & set(args.explicit):
        raise ValueError("--lora-alpha / --lora-dropout: they shape LoRA adapters; pass --lora R too (or drop them)")
    if args.lora and args.fsdp == "on":
        raise ValueError("--lora with --fsdp on: LoRA runs replicated (DDP); its frozen base needs no sharded master "
                         "weights, gradients or optimizer state (python train.py --plan --lora R shows the memory)")
    if args.fsdp == "on" and world == 1:
        raise ValueError("--fsdp on: sharding needs several ranks (torchrun --nproc_per_node N train.py ...); "
                         "in one process use --fsdp off")
    if args.eval_every:
        named = args.eval_dataset or args.dataset
        if named in data.SPLITS and args.eval_split not in data.SPLITS[named]:
            raise ValueError(f"--eval-split {args.eval_split}: {named} has the splits {', '.join(data.SPLITS[named])}")
        if args.eval_split == "test" and "eval_split" not in args.explicit:
            raise ValueError("--eval-split test: the evaluation during training reads test only when asked "
                             "(--eval-split test); checkpoints are chosen on validation")
        if not args.eval_dataset and args.dataset not in data.SPLITS and not os.path.isdir(args.dataset):
            raise ValueError(f"--eval-every {args.eval_every}: --dataset {args.dataset} is one file, with no "
                             "held-out split; pass --eval-dataset FILE (questions not in it), or --eval-every 0")
        if args.test_limit and args.dataset not in data.SPLITS:
            raise ValueError(f"--test-limit {args.test_limit}: --dataset {args.dataset} has no test split here; "
                             "pass --test-limit 0 and run eval.py on your test file")


def merge_adapter(adapter, out, dtype="auto"):
    """--merge-lora: an adapter checkpoint folded into its base model (model.merge_lora), saved in the Hugging Face
    layout (fp32 math; bf16 weights with --dtype bfloat16)."""
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise ValueError(f"--merge-lora {adapter}: not a LoRA adapter checkpoint (no adapter_config.json)")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--merge-lora {adapter} {out}: {out} exists; expected a new directory for the merged model")
    model, tokenizer = load(adapter, device="cpu", dtype=torch.float32)
    merged = merge_lora(model)
    save(merged.to(torch.bfloat16) if dtype == "bfloat16" else merged, tokenizer, out)
    print(f"merged {adapter} into its base model: {out}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.merge_lora:
            merge_adapter(*args.merge_lora, dtype=args.dtype)
        elif args.plan:  # the memory plan of the run these flags describe, simulated on the CPU
            from tools import plan  # a tool, imported only when asked for
            if args.resume:
                rundir.restore_run_args(args, rundir.read_resume_state(args), args.nproc or 1, planning=True)
            fill_defaults(args)
            world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
            check_args(args, world)
            plan.print_plan(args, world)
        else:
            train(args)
    except (ValueError, FileNotFoundError) as e:  # a bad flag or input: nothing was trained
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingStopped, rundir.SaveFailed, OSError) as e:  # non-finite losses, Ctrl-C, a full disk
        if not getattr(e, "quiet", False):
            print(f"error: {rundir.one_line(e)}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))


if __name__ == "__main__":
    parallel.run_main(main)
