"""Trains a language model with LaTRO (latro.py), or with the paper's SFT baseline, on GSM8K or ARC-Challenge.

    python train.py                                            # a first run on a laptop CPU: smollm2-135m, gsm8k
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
"""
import argparse
import gc
import json
import math
import os
import re
import resource
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist

import data
import eval as evaluation
import latro
import parallel
from model import ALIASES, build_on_meta, load, read_state, pad_right, save, token_logprobs

# The paper's recipe (§5.1 and the official training.sh): lr 5e-7, K = 16, L = 500, T = 1, AdamW without warm-up,
# linear decay, 24 questions (384 rollouts) per step; 6 "epochs" of GSM8K rollouts = 117 steps, 12 of ARC = 35.
PAPER = dict(lr=5e-7, num_samples=16, questions_per_step=24, max_rationale_tokens=500, micro_batch_size=4,
             steps={"gsm8k": 117, "arc_challenge": 35})
# A first run that finishes in minutes on a laptop CPU.
LAPTOP = dict(lr=5e-6, num_samples=4, questions_per_step=2, max_rationale_tokens=96, micro_batch_size=4,
              steps={"gsm8k": 4, "arc_challenge": 4})
PAPER_MODELS = ("llama-3.1-8b", "mistral-7b", "phi-3.5-mini")
BETA = {"gsm8k": 0.05, "arc_challenge": 0.25}  # the paper's KL coefficients
MAX_BAD_STEPS = 3  # abort after this many non-finite losses in a row
# Flags that decide which questions a step sees and what it optimises (--steps sets the learning-rate decay): a
# resumed run keeps the recorded values, and changing one is an error unless --allow-recipe-change (the change is
# then recorded in trainer_state.json).
RECIPE = ("dataset", "split", "limit", "method", "steps", "questions_per_step", "num_samples", "lr", "warmup_steps",
          "weight_decay", "grad_clip", "beta", "answer_weight", "max_rationale_tokens", "temperature", "top_p",
          "top_k", "no_nonstop_penalty", "penalty_factor", "seed")
# Flags that belong to one invocation, never restored from the checkpoint.
PER_INVOCATION = ("resume", "out", "overwrite", "device", "explicit", "allow_recipe_change", "model", "plan", "nproc",
                  "gpu_memory", "no_plan", "plan_prompt_tokens")


class TrainingStopped(RuntimeError):
    """The run stopped for a reason that is not a bad flag (non-finite losses, a failed save, Ctrl-C); main prints
    the message as one line."""
    exit_code = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help=f"local HF directory, hub id, or alias ({', '.join(ALIASES)}); "
                   "default smollm2-135m, or the resumed run's model")
    p.add_argument("--dataset", default="gsm8k", help="gsm8k, arc_challenge, or a .jsonl file in either layout")
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
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="alpha on -log pi(y|x,z): 1 as the paper's Eq. 4; the official code used 0")
    p.add_argument("--max-rationale-tokens", type=int, default=None, help="L (paper: 500)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--no-nonstop-penalty", action="store_true", help="do not penalise rationales that never stop")
    p.add_argument("--penalty-factor", type=float, default=2.0, help="gamma: R := gamma * batch-mean R if not stopped")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (master weights are always fp32); auto = bf16 on GPU, fp32 on CPU")
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
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps with eval.py; 0 = off")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--eval-limit", type=int, default=50)
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="default: --max-rationale-tokens")
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
    import plan
    if name in PAPER_MODELS:
        return name
    by_repo = {ALIASES[a]: a for a in PAPER_MODELS}
    if name in by_repo:
        return by_repo[name]
    path = os.path.join(name, "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None  # load() reports a broken config.json with its own message
        return next((a for a in PAPER_MODELS if plan.same_architecture(cfg, plan.CONFIGS[a])), None)
    return None


def fill_defaults(args):
    """Unset flags come from the paper's recipe for the paper's models and from the laptop recipe otherwise."""
    args.model = args.model or "smollm2-135m"
    args.dataset = dataset_id(args.dataset)
    args.recipe = "paper" if paper_model(args.model) else "laptop"
    preset = PAPER if args.recipe == "paper" else LAPTOP
    name = data.detect_task(args.dataset, args.split)  # from the data's layout, not from the file's name
    for key in ("lr", "num_samples", "questions_per_step", "max_rationale_tokens", "micro_batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.steps = args.steps if args.steps is not None else preset["steps"][name]
    args.beta = args.beta if args.beta is not None else BETA[name]
    args.eval_max_new_tokens = args.eval_max_new_tokens or args.max_rationale_tokens
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


def dataset_id(name):
    """A named dataset as is; a local path made absolute, so a resumed run finds the same file from anywhere."""
    return name if name in data.SPLITS or not os.path.exists(name) else os.path.abspath(name)


# --------------------------------------------------------------------------------------------------------------
# The run directory: one run at a time (a lock), nothing deleted (an --overwrite moves the old run aside), no
# partial checkpoint left from an interrupted save

LOCK = ".lock"
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def checkpoints(run_dir):
    """Complete checkpoints of a run directory (those with trainer_state.json, written last), oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(int(m.group(1)), os.path.join(run_dir, name)) for name in os.listdir(run_dir)
             if (m := CHECKPOINT.match(name)) and os.path.isfile(os.path.join(run_dir, name, "trainer_state.json"))]
    return [path for _, path in sorted(found)]


def checkpoint_list(run_dir):
    found = checkpoints(run_dir)
    return ", ".join(found) if found else f"none in {run_dir}"


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_lock(out):
    """An exclusive-create lock file holding host and pid. A lock left by a dead process of this host (kill -9) is
    taken over with a note; a live one, or one from another host, is an error."""
    path = os.path.join(out, LOCK)
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = open(path).read()
                host, pid = text.split()
                pid = int(pid)
            except (OSError, ValueError):
                text, host, pid = None, "?", 0
            if host == socket.gethostname() and pid and not pid_alive(pid):
                # Move the stale lock aside (only one process can move a given file), then check that what moved is
                # the stale lock and not the fresh one of a process that took it over a moment ago.
                aside = f"{path}.stale-{os.getpid()}"
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                if open(aside).read() != text:
                    try:
                        os.link(aside, path)  # put the fresh lock back
                    except FileExistsError:
                        pass
                else:
                    print(f"note: {out}: taking over the lock of pid {pid}, which is no longer running", flush=True)
                os.remove(aside)
                continue
            advice = "wait for it to finish or choose another --out" + (
                "" if host == socket.gethostname() else f"; if no run uses it, delete {path}")
            raise ValueError(f"--out {out}: in use by another run (pid {pid} on {host}, lock {path}); {advice}")
        os.write(fd, me.encode())
        os.close(fd)
        return path
    raise ValueError(f"--out {out}: could not take the lock {path}; another run may be starting there")


def release_lock(path):
    try:
        if open(path).read().split()[-1] == str(os.getpid()):
            os.remove(path)
    except (OSError, IndexError):
        pass


def remove_partials(out):
    """Leftovers of a save that was killed or ran out of disk: checkpoint-*.partial* directories are removed; a
    checkpoint-*.old (the previous copy, moved aside just before the rename) is put back if the rename never came."""
    removed = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith("checkpoint-") and ".partial" in name:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
        elif name.startswith("checkpoint-") and name.endswith(".old"):
            final = path[:-len(".old")]
            if os.path.isdir(final):
                shutil.rmtree(path)
            else:
                os.replace(path, final)
    if removed:
        print(f"note: {out}: removed {len(removed)} partial checkpoint(s) of an interrupted save: "
              f"{', '.join(removed)}", flush=True)


def holds_run(out):
    return os.path.isfile(os.path.join(out, "metrics.jsonl")) or any(
        CHECKPOINT.match(n.split(".")[0]) for n in os.listdir(out))


def move_run_aside(out):
    """--overwrite: the whole old run (metrics, config, every checkpoint) moves to the first free {out}.bak[N]."""
    backup, n = out.rstrip("/") + ".bak", 1
    while os.path.exists(backup):
        backup, n = f"{out.rstrip('/')}.bak{n}", n + 1
    os.makedirs(backup)
    for name in os.listdir(out):
        if name != LOCK:
            os.replace(os.path.join(out, name), os.path.join(backup, name))
    print(f"--overwrite: moved the previous run in {out} to {backup}", flush=True)


def prepare_run_dir(args, start):
    """Before any model is loaded: --out must be a directory we can create and write; take its lock; then decide
    what may happen to what it holds. Returns the lock path."""
    out = args.out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the run directory ({e.strerror}: {e.filename}); "
                         "expected a directory path") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: not writable")
    lock = take_lock(out)
    try:
        remove_partials(out)
        own = args.resume and os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) == os.path.realpath(out)
        if not own and holds_run(out):
            what = "another run" if args.resume else "a run"
            if not args.overwrite:
                hint = (f"resume writes into the checkpoint's own run {os.path.dirname(os.path.abspath(args.resume))}"
                        "; drop --out, choose an empty one, or " if args.resume else
                        "pass --resume CHECKPOINT (checkpoints: " + checkpoint_list(out) + "), another --out, or ")
                raise ValueError(f"--out {out}: already holds {what} (metrics.jsonl / checkpoints); {hint}"
                                 "--overwrite to move it aside to a .bak directory")
            move_run_aside(out)
        if args.resume and not own:  # a branch of the checkpoint's run: its metrics up to the checkpoint come along
            src = os.path.join(os.path.dirname(os.path.abspath(args.resume)), "metrics.jsonl")
            if os.path.isfile(src):
                write_metrics(os.path.join(out, "metrics.jsonl"), read_metrics(src, start))
    except BaseException:
        release_lock(lock)
        raise
    return lock


def prune_checkpoints(out, keep, newest):
    """--keep-last: delete the oldest complete checkpoints up to `newest` (the one just written, never deleted)
    until `keep` remain; checkpoints of later steps (left by a run this one resumed from an earlier step) stay."""
    step = int(CHECKPOINT.search(newest).group(1))
    older = [c for c in checkpoints(out) if int(CHECKPOINT.search(c).group(1)) < step]
    for path in older[:max(0, len(older) - (keep - 1))]:
        os.replace(path, path + ".partial")  # a kill mid-delete leaves a .partial, removed at the next start
        shutil.rmtree(path + ".partial")


def first_error(message, world):
    """Every rank learns whether any rank failed (so none waits forever in a collective); the first message wins."""
    if world == 1:
        return message
    messages = [None] * world
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


# --------------------------------------------------------------------------------------------------------------
# Distributed setup and models

def setup_distributed(device_flag):
    """-> (device, rank, world). Under torchrun every rank drives the GPU of its LOCAL_RANK; a single process honours
    --device cuda:N. NCCL gets the device up front and a long timeout: ranks wait in barriers while rank 0 writes
    a checkpoint, which for an 8B model takes longer than the default 10 minutes."""
    from datetime import timedelta
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device_flag is None else device_flag.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        flagged = torch.device(device_flag) if device_flag else torch.device("cuda")
        if world > 1 and flagged.index is not None:
            raise ValueError(f"--device {device_flag}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device "
                             "cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
        device = torch.device("cuda", local if world > 1 else (flagged.index or 0))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    rank = 0
    if world > 1:
        timeout = timedelta(minutes=60)
        if use_cuda:
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        rank = dist.get_rank()
    return device, rank, world


def device_memory(device):
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def device_mesh(device_type, world):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world,))


def shard(model, mesh, mp_policy, reshard_root=None):
    """FSDP2: each block is one all-gather / reduce-scatter unit; the root holds the embedding, norm and lm_head.
    reshard_root: free the root's gathered parameters after forward (default: kept for the backward)."""
    from torch.distributed.fsdp import fully_shard
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    return fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_root)


def wrap_policy(policy, mesh, compute_dtype, world, device, ddp=True):
    """FSDP2 when `mesh` is given (compute in compute_dtype, gradients reduced in fp32), else DDP when world > 1.
    cast_forward_inputs=False: the blocks take the fp32 RoPE tables as arguments, and casting them to bf16 would
    make the trained policy differ from the bf16 sampler that drew the rationales (which keeps them fp32).
    ddp=False leaves a replicated policy unwrapped (the memory plan: DDP cannot run on fake tensors)."""
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        return shard(policy, mesh, MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                        cast_forward_inputs=False))
    if world > 1 and ddp:
        # gradient_as_bucket_view: gradients live in DDP's communication buckets instead of next to a copy of them
        return torch.nn.parallel.DistributedDataParallel(
            policy, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return policy


def wrap_reference(reference, mesh):
    """The frozen reference is sharded too when the policy is (it only runs forward: one block gathered at a time)."""
    if mesh is None:
        return reference
    from torch.distributed.fsdp import MixedPrecisionPolicy
    # a forward-only module has no backward to keep the root's gathered embedding and lm_head for
    return shard(reference, mesh, MixedPrecisionPolicy(cast_forward_inputs=False), reshard_root=True)


def checkpointing_on(args, sharded):
    """Activation checkpointing: on when sharded unless --activation-checkpointing off (an 8B model's activations
    are ~18 GiB per 4 x 760-token micro-batch without it)."""
    return args.activation_checkpointing == "on" or (args.activation_checkpointing == "auto" and sharded)


def plan_run(args, world, compute_dtype, sharded):
    """The memory plan of this run's configuration (plan.py), simulated on the CPU: fake tensors, fake process
    group, no weights."""
    import plan
    cfg, _ = plan.model_config(args.model)
    return plan.simulate(cfg, world, sharded, compute_dtype, args.num_samples, args.questions_per_step,
                         args.max_rationale_tokens, args.micro_batch_size,
                         checkpointing=checkpointing_on(args, sharded), temperature=args.temperature,
                         prompt_tokens=args.plan_prompt_tokens or plan.PROMPT_TOKENS)


def choose_sharding(args, world, gpu_memory_gib, compute_dtype):
    """--fsdp auto: FSDP2 when a replica would not fit, by the memory plan of the replicated run (only with a memory
    limit to plan against: a GPU, or --gpu-memory). -> (sharded, the plan of the replicated run or None)"""
    if world == 1 or args.fsdp != "auto":
        return world > 1 and args.fsdp == "on", None
    if gpu_memory_gib is None or args.no_plan:
        return False, None
    import plan
    cfg, _ = plan.model_config(args.model)
    if plan.replica_lower_bound(cfg, compute_dtype) > plan.FIT_FRACTION * gpu_memory_gib * plan.GiB:
        return True, None  # weights, gradients and moments alone do not fit: no need to simulate the replica
    replicated = plan_run(args, world, compute_dtype, sharded=False)
    return not plan.fits(replicated, gpu_memory_gib), replicated


def load_examples(dataset, split, limit, world, device):
    """data.load_dataset on every rank, but local rank 0 first: it downloads into the cache (if needed) while the
    other ranks of its machine wait, then they read the cached file. A failure on any rank stops all of them."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    examples, error = None, None
    if first:
        try:
            examples = data.load_dataset(dataset, split, limit)
        except (ValueError, FileNotFoundError) as e:
            error = e
    if world > 1:
        ok = torch.tensor(float(error is None), device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # the others wait here while local rank 0 downloads
        if error is None and ok.item() < 1:
            raise FileNotFoundError(f"{dataset} {split}: loading failed on another rank (its error is above)")
    if error is not None:
        raise error
    return examples if first else data.load_dataset(dataset, split, limit)


def build_models(args, device, world, compute_dtype, sharded):
    """policy (fp32 master weights, maybe DDP/FSDP-wrapped), sampler (the module that generates and scores without
    grad), reference (frozen; sharded like the policy), tokenizer."""
    source = args.resume or args.model
    sampler = None
    if compute_dtype != torch.float32 or sharded:
        sampler, _ = load(source, device=device, dtype=compute_dtype)
        sampler.requires_grad_(False)
    if sharded:
        mesh = device_mesh(device.type, world)
        policy, tokenizer = load_sharded(source, device, torch.float32,
                                         lambda m: wrap_policy(m, mesh, compute_dtype, world, device))
        reference, _ = load_sharded(args.model, device, compute_dtype, lambda m: wrap_reference(m, mesh))
    else:
        policy, tokenizer = load(source, device=device, dtype=torch.float32)
        reference, _ = load(args.model, device=device, dtype=compute_dtype)
        policy = wrap_policy(policy, None, compute_dtype, world, device)
    reference.requires_grad_(False)
    unwrap(policy).checkpoint_layers = checkpointing_on(args, sharded)
    return policy, sampler if sampler is not None else unwrap(policy), reference, tokenizer


def load_sharded(source, device, dtype, wrap):
    """A model sharded by `wrap` (FSDP2) without any rank holding all of it: built and sharded on the meta device,
    each rank allocates its own shards, then rank 0 reads the checkpoint on the CPU and broadcasts it one tensor at
    a time, every rank keeping its slice (an 8B policy in fp32 is 30 GiB per GPU if loaded whole)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model, tokenizer, directory = build_on_meta(source)
    model = wrap(model.to(dtype))
    model.to_empty(device=device)
    state = read_state(directory, model, "cpu", dtype) if dist.get_rank() == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.rope.reset(device)
    return model.eval(), tokenizer


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def refresh_sampler(sampler, policy):
    """Copies the updated fp32 policy into the sampling copy. Sharded: each shard is cast to the sampler's dtype
    before the all-gather (half the traffic and a bf16, not fp32, gathered tensor)."""
    for s, p in zip(sampler.parameters(), unwrap(policy).parameters()):
        s.copy_(p.to(s.dtype).full_tensor() if hasattr(p, "full_tensor") else p)


def sync_this_micro_batch(policy, is_last):
    """FSDP2 reduce-scatters every micro-batch: skipping it would keep every parameter's unsharded fp32 gradient
    on every rank until the last one (30 GiB for 8B). DDP all-reduces on the last micro-batch only: its gradient
    is a replica anyway, and skipping saves the traffic."""
    return is_last or not isinstance(policy, torch.nn.parallel.DistributedDataParallel)


def set_grad_sync(policy, enabled):
    """Turn the gradient all-reduce (DDP) / reduce-scatter (FSDP2) of the next backward on or off."""
    if isinstance(policy, torch.nn.parallel.DistributedDataParallel):
        policy.require_backward_grad_sync = enabled
    elif hasattr(policy, "set_requires_gradient_sync"):
        policy.set_requires_gradient_sync(enabled)


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
# The SFT baseline: -mean log pi(gold rationale + answer | x) per token, same loop and data

def sft_backward(policy, tokenizer, examples, prompts, micro_batch, n_tokens_total, device, before_forward):
    rows, spans = [], []
    for ex, x in zip(examples, prompts):
        target = (ex.rationale.strip() + "\n" if ex.rationale.strip() else "") + ex.answer_text
        y = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eot_id]
        rows.append(x + y)
        spans.append((len(x), len(x) + len(y)))
    loss_sum, batches = 0.0, range(0, len(rows), micro_batch)
    for j, i in enumerate(batches):
        chunk, sp = rows[i:i + micro_batch], spans[i:i + micro_batch]
        tokens = pad_right(chunk, device)
        starts, ends = torch.tensor(sp, device=device).unbind(1)
        before_forward(j == len(batches) - 1)
        loss = -token_logprobs(policy, tokens, starts, ends).sum() / n_tokens_total
        loss.backward()
        loss_sum += loss.item()
    return {"loss": loss_sum, "target_tokens": n_tokens_total}


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: HF layout (loads in transformers/vLLM) + optimizer moments, step and RNG; written atomically

def optimizer_tensors(optimizer, policy):
    """This rank's AdamW state as {"<param name>.<exp_avg|exp_avg_sq|step>": tensor}, named as the model's
    parameters (torch.distributed.checkpoint's names: the same under DDP and FSDP2). Under FSDP2 the tensors are this
    rank's dim-0 shards; concatenated in rank order they give the full tensors (read_optimizer_tensors)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    out = {}
    for name, state in get_optimizer_state_dict(policy, optimizer)["state"].items():
        for key, t in state.items():
            if torch.is_tensor(t):
                t = t.to_local() if hasattr(t, "to_local") else t
                out[f"{name}.{key}"] = t.detach().cpu().contiguous()
    return out


def read_safetensors(path, what):
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing ({what}); the checkpoint is incomplete")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: not a readable safetensors file ({msg}); the {what} is damaged, resume from "
                         f"another checkpoint ({checkpoint_list(os.path.dirname(os.path.dirname(path)))})") from None


def read_optimizer_tensors(checkpoint, state, names_shapes):
    """The full (unsharded) AdamW state of a checkpoint, whatever sharding and world size wrote it: a single
    optimizer.safetensors, or per-rank FSDP2 shards concatenated along dim 0. Checked against the model's shapes."""
    single = os.path.join(checkpoint, "optimizer.safetensors")
    paths = [single] if os.path.isfile(single) or not state.get("sharded") else \
        [os.path.join(checkpoint, f"optimizer-rank{r}.safetensors") for r in range(state["world_size"])]
    parts = [read_safetensors(p, "optimizer state") for p in paths]
    full = {}
    for name, shape in names_shapes:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            k = f"{name}.{key}"
            missing = [p for p, part in zip(paths, parts) if k not in part]
            if missing:
                raise ValueError(f"{missing[0]}: no tensor {k!r}; expected AdamW state for every parameter")
            t = parts[0][k] if key == "step" else torch.cat([part[k] for part in parts])
            if key != "step" and tuple(t.shape) != tuple(shape):
                raise ValueError(f"{paths[0]}: {k} has shape {tuple(t.shape)}, the model's parameter {tuple(shape)}")
            full[k] = t
    return full


def load_optimizer_tensors(optimizer, policy, tensors, sharded):
    """Puts full AdamW state into the optimizer through torch.distributed.checkpoint, which shards it for FSDP2
    (uneven dimensions included) from rank 0's copy; `tensors` may be empty on other ranks. optimizer.load_state_dict
    then puts `step` where this optimizer keeps it (on the device for fused AdamW, on the CPU otherwise)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = [n for n, _ in unwrap(policy).named_parameters()]
    state = {n: {k: tensors[f"{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")} for n in names} if tensors else {}
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    osd = {"state": state, "param_groups": [{**group, "params": names}]}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) if sharded else None
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=osd, options=options)


def full_state_dict(policy, sharded):
    if not sharded:
        return {k: v.detach() for k, v in unwrap(policy).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out_dir, step, policy, sampler, tokenizer, optimizer, sharded, rank, world, args):
    """checkpoint-{step}/: the model in HF layout, optimizer.safetensors (per rank when sharded), rng and
    trainer_state.json. Built in checkpoint-{step}.partial (other ranks write their files beside it, in parallel
    with rank 0, which moves them in) and renamed into place, so a kill leaves no half checkpoint and never damages
    an earlier one. A failed write (disk full) on any rank removes the partial files and stops the run."""
    from safetensors.torch import save_file
    final = os.path.join(out_dir, f"checkpoint-{step:06d}")
    tmp = final + ".partial"
    mine = tmp if rank == 0 else f"{tmp}.rank{rank}"
    state = full_state_dict(policy, sharded)  # collective under FSDP: every rank calls it
    opt = optimizer_tensors(optimizer, policy) if sharded or rank == 0 else None  # DDP replicas are identical
    opt_name = f"optimizer-rank{rank}.safetensors" if sharded else "optimizer.safetensors"
    error = None
    try:
        if rank == 0:
            # save() reads config and args off a module: under FSDP the policy is sharded, the sampler copy is whole
            save(sampler if sharded else unwrap(policy), tokenizer, tmp, state_dict=state)
        else:
            os.makedirs(mine, exist_ok=True)
        if sharded or rank == 0:
            save_file(opt, os.path.join(mine, opt_name))
        save_file({"cpu": torch.get_rng_state()}, os.path.join(mine, f"rng-rank{rank}.safetensors"))
    except Exception as e:
        error = f"rank {rank}: {(str(e).splitlines() or [type(e).__name__])[0]}"
    del state, opt
    error = first_error(error, world)
    if error is None and rank == 0:
        try:
            for r in range(1, world):
                for name in os.listdir(f"{tmp}.rank{r}"):
                    os.replace(os.path.join(f"{tmp}.rank{r}", name), os.path.join(tmp, name))
                os.rmdir(f"{tmp}.rank{r}")
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "base_model": args.model, "method": args.method, "world_size": world,
                           "sharded": sharded, "args": vars(args)}, f, indent=2)
            old = final + ".old"
            if os.path.exists(final):
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            error = f"rank 0: {e.strerror or e} ({e.filename})"
    error = first_error(error, world)
    if error:
        for path in [mine] + ([p for p in os.listdir(out_dir) if p.startswith(os.path.basename(tmp))] if rank == 0
                              else []):
            path = os.path.join(out_dir, path)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
        raise TrainingStopped(f"{final}: could not be written ({error}); its partial files were removed; last "
                              f"complete checkpoint: {(checkpoints(out_dir) or ['none'])[-1]}")
    if rank == 0 and args.keep_last:
        prune_checkpoints(out_dir, args.keep_last, final)
    return final


def read_resume_state(args):
    """trainer_state.json of --resume, or an error that says what was expected and lists the checkpoints there."""
    path = os.path.join(args.resume, "trainer_state.json")
    if not os.path.isfile(path):
        run_dir = args.resume if os.path.isdir(args.resume) else os.path.dirname(os.path.abspath(args.resume))
        if os.path.isdir(args.resume) and checkpoints(args.resume):
            raise ValueError(f"--resume {args.resume}: this is a run directory; expected one of its checkpoints: "
                             f"{checkpoint_list(args.resume)}")
        raise FileNotFoundError(f"--resume {args.resume}: no trainer_state.json (expected a checkpoint directory "
                                f"written by train.py); checkpoints: {checkpoint_list(run_dir)}")
    try:
        with open(path) as f:
            state = json.load(f)
        state["step"], state["base_model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a trainer state written by train.py ({e})") from None
    if args.model is not None and args.model != state["base_model"]:
        raise ValueError(f"{args.resume}: checkpoint was trained from --model {state['base_model']!r}, "
                         f"not {args.model!r}")
    return state


def restore_run_args(args, state, world):
    """--resume continues the same run: every flag not given now takes the value recorded in the checkpoint. A
    given flag that changes the data order or the objective (RECIPE) is an error unless --allow-recipe-change;
    allowed changes are recorded, with the step they started at, in args.recipe_changes."""
    saved = state.get("args") or {}
    steps = args.steps if "steps" in args.explicit else saved.get("steps")
    if steps is not None and steps <= state["step"]:
        raise ValueError(f"--steps {steps}: {args.resume} is already at step {state['step']}; to train further, "
                         f"pass --steps N > {state['step']} with --allow-recipe-change (a longer run has another "
                         "learning-rate decay)")
    changes = []
    for key, value in saved.items():
        if key in PER_INVOCATION or key == "recipe_changes" or not hasattr(args, key):
            continue
        if key not in args.explicit:
            setattr(args, key, value)
        elif key in RECIPE and (dataset_id(getattr(args, key)) if key == "dataset" else getattr(args, key)) != value:
            changes.append((key, value, getattr(args, key)))
    if changes and not args.allow_recipe_change:
        differ = ", ".join(f"--{k.replace('_', '-')} {new} (the run has {old})" for k, old, new in changes)
        raise ValueError(f"--resume {args.resume}: {differ} would change the data order or the objective of the "
                         "run; drop the flag to continue it as it was, or pass --allow-recipe-change")
    args.recipe_changes = saved.get("recipe_changes", []) + [
        {"step": state["step"], "flag": k, "from": old, "to": new} for k, old, new in changes]
    if world == 1 and args.fsdp == "on" and "fsdp" not in args.explicit:
        args.fsdp = "off"  # a sharded run resumed in one process: its optimizer state is gathered (a mode change)


# --------------------------------------------------------------------------------------------------------------
# Logging

def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def mean_across_ranks(metrics, world, device):
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


def progress_line(m):
    if "reward" in m:
        return (f"step {m['step']:>4} | loss {m['loss']:+.4f} | reward {m['reward']:8.3f} | kl {m['kl']:+.4f} | "
                f"len {m['rationale_len']:5.1f} | stop {m['stop_rate']:.2f} | acc {m.get('accuracy', float('nan')):.2f} "
                f"| sample {m['sample_tokens_per_s']:.0f} tok/s | step {m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e}")
    return f"step {m['step']:>4} | sft loss {m['loss']:.4f} | {m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e}"


def append_metrics(path, m):
    with open(path, "a") as f:
        f.write(json.dumps(m) + "\n")


def read_metrics(path, last_step=None):
    """The lines of metrics.jsonl (up to last_step), read as eval.py reads its results: a torn last line (the run
    was killed mid-write) is dropped, a bad line elsewhere is an error naming it."""
    return [json.dumps(row) + "\n" for _, row in evaluation.read_jsonl_rows(path, "metrics record")
            if last_step is None or row.get("step", 0) <= last_step]


def write_metrics(path, lines):
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def truncate_metrics(path, last_step):
    """On resume, drop lines of steps after the checkpoint (written before the run stopped), atomically."""
    if os.path.isfile(path):
        write_metrics(path, read_metrics(path, last_step))


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


def plot_curves(path_jsonl, path_png):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(path_jsonl) if line.strip()]
    keys = [k for k in ("reward", "kl", "rationale_len", "stop_rate") if k in rows[0]] or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path_png)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# The loop

def train(args):
    """Resolves the flags (restoring a resumed run's), takes the run directory, then trains (run). Ctrl-C becomes
    one line saying where the run stopped and how to continue it."""
    device, rank, world = setup_distributed(args.device)
    resume_state = read_resume_state(args) if args.resume else None
    if resume_state:
        args.model = resume_state["base_model"]
        restore_run_args(args, resume_state, world)
    fill_defaults(args)
    check_args(args, world)
    lock, status = None, {"step": resume_state["step"] if resume_state else 0}
    try:
        lock = parallel.on_rank0(rank, lambda: prepare_run_dir(args, status["step"]))
        run(args, device, rank, world, resume_state, status)
        if world > 1:
            # after run() has returned: gloo aborts at exit now and then (1 in ~10 on 2 CPU ranks) when FSDP
            # modules holding communication buffers outlive the process group
            gc.collect()
            dist.destroy_process_group()
    except KeyboardInterrupt:
        if lock:
            remove_partials(args.out)
        last = (checkpoints(args.out) or [None])[-1]
        launcher = f"torchrun --nproc_per_node {world} train.py" if world > 1 else "python train.py"
        stopped = TrainingStopped(
            f"interrupted during step {status['step'] + 1} ({status['step']} of {args.steps} done); " +
            (f"last checkpoint: {last}; continue with: {launcher} --resume {last}" if last else
             "no checkpoint written yet (--save-every N writes some); start again" +
             (" with --overwrite" if os.path.isdir(args.out) and holds_run(args.out) else "")))
        stopped.exit_code = 130
        raise stopped from None
    finally:
        if lock:
            release_lock(lock)


def run(args, device, rank, world, resume_state, status):
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed + rank)

    examples = load_examples(args.dataset, args.split, args.limit, world, device)
    gpu_memory = args.gpu_memory or (device_memory(device) / 2**30 if device.type == "cuda" else None)
    sharded, _ = choose_sharding(args, world, gpu_memory, compute_dtype)
    memory = "no memory plan (CPU)" if gpu_memory is None else "memory plan skipped (--no-plan)"
    if gpu_memory is not None and not args.no_plan and rank == 0:
        memory = preflight_plan(args, world, compute_dtype, sharded, gpu_memory)
    policy, sampler, reference, tokenizer = build_models(args, device, world, compute_dtype, sharded)
    n_params = sum(p.numel() for p in unwrap(policy).parameters())
    prompts = {}  # chat-templated prompt tokens, computed once per question

    def prompt_of(i):
        if i not in prompts:
            prompts[i] = data.chat_prompt(tokenizer, examples[i])
        return prompts[i]

    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay, fused=device.type == "cuda" and not sharded)
    start = 0
    if resume_state:  # any sharding mode and world size: the full state is assembled, then sharded as this run is
        start = resume_state["step"]
        tensors, error = {}, None
        if rank == 0 or not sharded:
            try:
                shapes = [(n, p.shape) for n, p in unwrap(policy).named_parameters()]
                tensors = read_optimizer_tensors(args.resume, resume_state, shapes)
            except (ValueError, FileNotFoundError) as e:
                error = str(e)
        error = first_error(error, world)
        if error:
            raise ValueError(error)
        load_optimizer_tensors(optimizer, policy, tensors, sharded)
        rng_path = os.path.join(args.resume, f"rng-rank{rank}.safetensors")
        if os.path.isfile(rng_path):
            torch.set_rng_state(read_safetensors(rng_path, "random-number state")["cpu"])
    cfg = latro.LatroConfig(
        num_samples=args.num_samples, beta=args.beta, answer_weight=args.answer_weight,
        max_rationale_tokens=args.max_rationale_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, nonstop_penalty=not args.no_nonstop_penalty, penalty_factor=args.penalty_factor,
        micro_batch_size=args.micro_batch_size)

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0:
        if resume_state:
            truncate_metrics(metrics_path, start)
        config_path = os.path.join(args.out, "config.json")
        with open(config_path + ".tmp", "w") as f:
            json.dump({"args": vars(args), "latro": asdict(cfg)}, f, indent=2)
        os.replace(config_path + ".tmp", config_path)
        print(f"preflight | model {args.model} | {n_params / 1e6:.1f}M params | world {world} | "
              f"{'FSDP2' if sharded else 'DDP' if world > 1 else 'single'} | compute {str(compute_dtype)[6:]} | "
              f"activation checkpointing {'on' if checkpointing_on(args, sharded) else 'off'} | {args.recipe} recipe | "
              f"{memory} | {len(examples)} questions | "
              f"{args.questions_per_step} questions x K={args.num_samples} per step | task "
              f"{data.task_name(examples[0].task)}, beta {args.beta} | steps {start}->{args.steps}",
              flush=True)
    wandb_run = None
    if args.wandb and rank == 0:
        try:
            import wandb
            wandb_run = wandb.init(project=args.wandb, config=vars(args))
        except ImportError:
            print("warning: --wandb given but wandb is not installed; logging to metrics.jsonl only", flush=True)

    evaluator = None
    if args.eval_every:  # eval.py's own code path, on the held-out split, with the sampling copy of the policy
        eval_examples = load_examples(args.dataset, args.eval_split, args.eval_limit, world, device)
        evaluator = lambda: evaluation.evaluate(sampler, tokenizer, eval_examples, args.eval_max_new_tokens)[1]

    per_rank = args.questions_per_step // world
    bad_steps, last_saved, t_run = 0, None, time.time()
    policy.train()
    for step in range(start, args.steps):
        status["step"] = step
        t0 = time.time()
        progress = StepProgress(step + 1) if rank == 0 else None
        for g in optimizer.param_groups:
            g["lr"] = args.lr * lr_factor(step, args.steps, args.warmup_steps)
        ids = step_questions(len(examples), step, args.questions_per_step, args.seed)[rank * per_rank:(rank + 1) * per_rank]
        batch = [examples[i] for i in ids]
        x = [prompt_of(i) for i in ids]
        autocast = torch.autocast("cuda", dtype=compute_dtype) if device.type == "cuda" and not sharded \
            and compute_dtype != torch.float32 else nullcontext()
        sync = lambda last: set_grad_sync(policy, sync_this_micro_batch(policy, last))
        if args.method == "latro":
            ro = latro.sample(sampler, tokenizer, x, [e.answer_text for e in batch], cfg,
                              seeds=[question_seed(args.seed, step, i) for i in ids], progress=progress)
            t_sampled = time.time()
            terms = latro.compute_advantages(sampler, reference, ro, cfg, progress=progress)
            m = rollout_metrics(ro, terms, time_sample=t_sampled - t0, time_score=time.time() - t_sampled)
            K = args.num_samples
            # accuracy of the answer each rationale itself states, extracted as eval.py does
            m["accuracy"] = sum(evaluation.is_correct(batch[i // K], evaluation.extract_answer(batch[i // K], text))
                                for i, text in enumerate(ro.rationales)) / len(ro.rationales)
            t1 = time.time()
            with autocast:
                m.update(latro.backward_on_rollout(policy, ro, terms.advantages, cfg, before_forward=sync,
                                                   progress=progress))
            sampled = m.pop("sampled_tokens")
            m["sample_tokens_per_s"] = sampled / max(m["time_sample"], 1e-9)
        else:
            n_tok = torch.tensor(float(sum(len(tokenizer.encode((e.rationale.strip() + "\n" if e.rationale.strip()
                                 else "") + e.answer_text, add_special_tokens=False)) + 1 for e in batch)), device=device)
            if world > 1:
                dist.all_reduce(n_tok)
            t1 = time.time()
            with autocast:
                m = sft_backward(policy, tokenizer, batch, x, args.micro_batch_size, n_tok.item() / world, device, sync)
            sampled = m["target_tokens"] / world
        t2 = time.time()
        if progress:
            progress.close()
        loss_ok = torch.tensor(float(math.isfinite(m["loss"])), device=device)
        if world > 1:
            dist.all_reduce(loss_ok, op=dist.ReduceOp.MIN)
        if loss_ok.item() < 1:
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            if rank == 0:
                print(f"warning: step {step + 1}: non-finite loss ({m['loss']}); step skipped "
                      f"({bad_steps}/{MAX_BAD_STEPS} in a row)", flush=True)
            if bad_steps >= MAX_BAD_STEPS:
                bad = ", ".join(f"{k} {v}" for k, v in m.items() if isinstance(v, float) and not math.isfinite(v))
                raise TrainingStopped(f"steps {step + 2 - MAX_BAD_STEPS}-{step + 1}: {MAX_BAD_STEPS} non-finite "
                                      f"losses in a row ({bad}); stopped, nothing saved for them; last good "
                                      f"checkpoint: {(checkpoints(args.out) or ['none'])[-1]}")
            continue
        bad_steps = 0
        if args.grad_clip > 0:
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sampler is not unwrap(policy):  # a separate sampling copy (else it is the policy itself)
            refresh_sampler(sampler, policy)
        m = mean_across_ranks(m, world, device)
        if "sample_tokens_per_s" in m:
            m["sample_tokens_per_s"] *= world  # the mean rank's rate -> the whole job's
        elapsed = time.time() - t0
        m.update(step=step + 1, lr=optimizer.param_groups[0]["lr"], seconds=elapsed,
                 time_rollout=t1 - t0, time_backward=t2 - t1, tokens_per_s=sampled * world / elapsed,
                 peak_memory_gb=peak_memory_bytes(device) / 2**30)
        if evaluator and (step + 1) % args.eval_every == 0:
            summary = evaluator()
            m["eval_accuracy"] = summary["accuracy"]
        if rank == 0:
            append_metrics(metrics_path, m)
            print(progress_line(m), flush=True)
            if wandb_run:
                wandb_run.log(m, step=step + 1)
        if not args.no_save and ((args.save_every and (step + 1) % args.save_every == 0) or step + 1 == args.steps):
            last_saved = save_checkpoint(args.out, step + 1, policy, sampler, tokenizer, optimizer, sharded, rank,
                                         world, args)
    if rank == 0:
        if os.path.isfile(metrics_path):
            plot_curves(metrics_path, os.path.join(args.out, "curves.png"))
        rows = [json.loads(line) for line in open(metrics_path)] if os.path.isfile(metrics_path) else []
        last = rows[-1] if rows else {}
        print(f"done | {args.method} {args.model} on {args.dataset} | steps {start}->{args.steps} in "
              f"{time.time() - t_run:.0f}s | final reward {last.get('reward', float('nan')):.3f} kl "
              f"{last.get('kl', float('nan')):.4f} loss {last.get('loss', float('nan')):.4f} | "
              f"checkpoint {last_saved or 'none'} | metrics {metrics_path}", flush=True)
    return policy


def preflight_plan(args, world, compute_dtype, sharded, gpu_memory):
    """The memory plan of this run, printed in full; simulated in a subprocess (its fake process group must not
    meet this process's real one). -> a short summary for the preflight line."""
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), "--plan", "--model", args.model, "--nproc", str(world),
           "--gpu-memory", str(gpu_memory), "--fsdp", "on" if sharded else "off",
           "--activation-checkpointing", "on" if checkpointing_on(args, sharded) else "off",
           "--dtype", str(compute_dtype)[6:], "--num-samples", str(args.num_samples),
           "--questions-per-step", str(args.questions_per_step), "--micro-batch-size", str(args.micro_batch_size),
           "--max-rationale-tokens", str(args.max_rationale_tokens), "--temperature", str(args.temperature)] + \
        (["--plan-prompt-tokens", str(args.plan_prompt_tokens)] if args.plan_prompt_tokens else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return f"memory plan failed ({(p.stderr.strip().splitlines() or ['?'])[-1]})"
    print(p.stdout.rstrip(), flush=True)
    return p.stdout.strip().splitlines()[-1].strip().split(" (")[0]


def print_plan(args):
    """--plan: the memory plan of the run these flags describe, on --nproc GPUs of --gpu-memory GiB."""
    import plan
    fill_defaults(args)
    world = args.nproc or int(os.environ.get("WORLD_SIZE", "1"))
    args.overwrite = True  # the plan writes nothing, so an existing run directory is no obstacle
    check_args(args, world)
    compute_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16  # planned for GPUs: bf16 by default
    gpu_memory = args.gpu_memory or 80.0
    sharded, replicated = choose_sharding(args, world, gpu_memory, compute_dtype)
    result = replicated if replicated is not None and not sharded else plan_run(args, world, compute_dtype, sharded)
    cfg, alias = plan.model_config(args.model)
    title = (f"memory plan | {args.model}{f' ({alias})' if alias and alias != args.model else ''} | {args.recipe} "
             f"recipe: K={args.num_samples}, L={args.max_rationale_tokens}, {args.questions_per_step} questions/step, "
             f"micro-batch {args.micro_batch_size} | {world} x {gpu_memory:g} GiB | "
             f"{'FSDP2' if sharded else 'DDP' if world > 1 else 'single'} | {str(compute_dtype)[6:]} | "
             f"activation checkpointing {'on' if checkpointing_on(args, sharded) else 'off'} | rank 0 of {world}")
    print(plan.format_plan(result, title, gpu_memory), flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.plan:
            print_plan(args)
            return
        train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    parallel.run_main(main)
