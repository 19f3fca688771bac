"""How a training run lives on disk and on the console: its run directory, checkpoints, resume state, metrics, and
the lines it prints.

A run directory (--out) holds config.json, metrics.jsonl (one line per step, plus a step-0 line with the base
model's validation accuracy), curves.png, eval/step-NNNNNN.jsonl (the evaluated rationales), best.json (the
checkpoint of the best validation step), test.json and checkpoint-NNNNNN/ directories. A checkpoint is the model in
Hugging Face layout (it loads in transformers and vLLM) plus what an exact resume needs: the AdamW moments (one
file, or one per rank when sharded), every rank's random-number state and trainer_state.json (the step and every
flag). What it guarantees:
  - one run per directory at a time (a lock file naming host, pid and the process's start time);
  - nothing is deleted by accident: --overwrite moves the whole old run aside to a .bak directory in one rename,
    and a resume that would overwrite later checkpoints is refused;
  - a save is atomic: built in checkpoint-N.partial and renamed into place, so a kill or a full disk leaves no
    half checkpoint and never damages an earlier one;
  - a resume continues the same run: every flag not given again is restored; a flag or a training file that would
    change the data order or the objective is refused unless --allow-recipe-change (recorded), and the base model
    (the KL reference) must be the one the run started from, by a fingerprint of its weights.
"""
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

import data
import parallel
from model import ALIASES, replace_dir, save, save_adapter
from parallel import first_error, unwrap

LOCK = ".lock"
MOVING = ".moving"  # an --overwrite in progress
RUN_FILES = ("metrics.jsonl", "config.json", "best.json", "test.json", "curves.png", "eval", MOVING)  # + checkpoints
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_config.json", "trainer_state.json",
               "tokenizer.json")  # a model or a checkpoint: never a run's --out
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
# Flags that decide which questions a step sees and what it optimises (--steps sets the learning-rate decay): a
# resumed run keeps the recorded values, and changing one is an error unless --allow-recipe-change (the change is
# then recorded in trainer_state.json).
RECIPE = ("dataset", "split", "limit", "method", "steps", "questions_per_step", "num_samples", "lr", "warmup_steps",
          "weight_decay", "grad_clip", "beta", "answer_weight", "max_rationale_tokens", "temperature", "top_p",
          "top_k", "no_nonstop_penalty", "penalty_factor", "seed", "reward", "lora", "lora_alpha", "lora_dropout")
# Flags that belong to one invocation, never restored from the checkpoint.
PER_INVOCATION = ("resume", "out", "overwrite", "device", "explicit", "allow_recipe_change", "model", "plan", "nproc",
                  "gpu_memory", "no_plan", "plan_prompt_tokens", "pins", "recipe_changes")


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, on any rank); its partial files are removed."""


def one_line(e):
    """An error as one line: an OSError as 'file: reason' (a full disk, a read-only directory), else its message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename or 'the output'}: could not write ({e.strerror})"
    return (str(e).splitlines() or [type(e).__name__])[0]


def dataset_id(name):
    """A named dataset as is; a local path resolved, so a resumed run finds the same file from anywhere."""
    return name if name in data.SPLITS or not os.path.exists(name) else os.path.realpath(name)


# --------------------------------------------------------------------------------------------------------------
# The run directory: one run at a time (a lock), nothing deleted (an --overwrite moves the old run aside), no
# partial checkpoint left from an interrupted save


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


def take_lock(out):
    """The run directory's lock (parallel.take_lock): one run per directory at a time."""
    return parallel.take_lock(os.path.join(out, LOCK), f"--out {out}")


def remove_partials(out):
    """Leftovers of a save that was killed or ran out of disk: checkpoint-*.partial* directories are removed; a
    checkpoint-*.old (the previous copy, moved aside just before the rename) is put back if the rename never came."""
    removed = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith("checkpoint-") and ".partial" in name:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
        elif name.endswith(".tmp") and run_entry(name):  # an atomic write of a run file that was killed
            os.remove(path)
        elif name.startswith("checkpoint-") and name.endswith(".old"):
            final = path[:-len(".old")]
            if os.path.isdir(final):
                shutil.rmtree(path)
            else:
                os.replace(path, final)
    if removed:
        print(f"note: {out}: removed {len(removed)} partial checkpoint(s) of an interrupted save: "
              f"{', '.join(removed)}", flush=True)


def run_entry(name):
    """Whether an entry of a run directory is the run's own: what --overwrite moves aside."""
    return name in RUN_FILES or bool(CHECKPOINT.match(name.split(".")[0])) or \
        name.endswith(".tmp") and any(name.startswith(f + ".") for f in RUN_FILES)


def holds_run(out):
    return any(n in ("metrics.jsonl", MOVING) or CHECKPOINT.match(n.split(".")[0]) for n in os.listdir(out))


def move_run_aside(out):
    """--overwrite: the whole old run moves to the first free {out}.bak[N] in one rename, by way of {out}/.moving (a
    kill part-way leaves it there, and the next start finishes the move), so the old run is never split."""
    moving = os.path.join(out, MOVING)
    os.makedirs(moving, exist_ok=True)
    for name in os.listdir(out):
        if run_entry(name) and name != MOVING:  # the run's own files only: other files stay where they are
            os.replace(os.path.join(out, name), os.path.join(moving, name))
    base = os.path.abspath(out)
    backup, n = base + ".bak", 1
    while os.path.exists(backup):
        backup, n = f"{base}.bak{n}", n + 1
    os.replace(moving, backup)
    print(f"--overwrite: moved the previous run in {out} to {backup}", flush=True)


def run_of(checkpoint):
    """The run directory a checkpoint belongs to (through symbolic links: a `latest` link elsewhere is not a run)."""
    return os.path.dirname(os.path.realpath(checkpoint))


def check_out(out):
    """Before anything loads, with nothing created yet: --out must be a directory path that can be written."""
    parent = next(p for p in [os.path.abspath(out), *Path(out).absolute().parents] if os.path.exists(p))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: cannot create the run directory ({parent} is a file); expected a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: not writable")


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
        model = [n for n in MODEL_FILES if os.path.exists(os.path.join(out, n))]
        if model:  # its config.json is not ours to write
            raise ValueError(f"--out {out}: holds a model or a checkpoint ({model[0]}); a run needs a directory of "
                             "its own")
        remove_partials(out)
        if os.path.isdir(os.path.join(out, MOVING)):  # an --overwrite was killed part-way: finish it first
            move_run_aside(out)
        own = args.resume and run_of(args.resume) == os.path.realpath(out)
        later = [c for c in checkpoints(out) if step_of(c) > start] if own else []
        if later:
            raise ValueError(f"--resume {args.resume}: the run has later checkpoints ({', '.join(later)}), which "
                             "continuing here would overwrite; to branch from this step, pass --out NEW_DIR")
        if not own and holds_run(out):
            what = "another run" if args.resume else "a run"
            inside = [f"--{k.replace('_', '-')} {v}" for k in ("model", "resume", "dataset", "eval_dataset")
                      if (v := getattr(args, k)) and os.path.exists(v) and
                      os.path.realpath(v).startswith(os.path.realpath(out) + os.sep)]
            if args.overwrite and inside:
                raise ValueError(f"--overwrite: {inside[0]} is inside --out {out}, which --overwrite would move "
                                 "aside; copy it elsewhere first, or choose another --out")
            if not args.overwrite:
                hint = (f"resume writes into the checkpoint's own run {run_of(args.resume)}"
                        "; drop --out, choose an empty one, or " if args.resume else
                        "pass --resume CHECKPOINT (checkpoints: " + checkpoint_list(out) + "), another --out, or ")
                raise ValueError(f"--out {out}: already holds {what} (metrics.jsonl / checkpoints); {hint}"
                                 "--overwrite to move it aside to a .bak directory")
            move_run_aside(out)
        if args.resume and not own:  # a branch of the checkpoint's run: its metrics up to the checkpoint come along
            src = os.path.join(run_of(args.resume), "metrics.jsonl")
            if os.path.isfile(src):
                write_metrics(os.path.join(out, "metrics.jsonl"), read_metrics(src, start))
    except BaseException:
        parallel.release_lock(lock)
        raise
    return lock


def prune_checkpoints(out, keep, newest):
    """--keep-last: delete the oldest complete checkpoints up to `newest` (the one just written, never deleted)
    until `keep` remain; the best one (best.json) and checkpoints of later steps stay."""
    best = read_best(out)
    older = [c for c in checkpoints(out) if step_of(c) < step_of(newest) and
             not (best and os.path.samefile(c, best["checkpoint"]))]
    for path in older[:max(0, len(older) - (keep - 1))]:
        os.replace(path, path + ".partial")  # a kill mid-delete leaves a .partial, removed at the next start
        shutil.rmtree(path + ".partial")


def step_of(checkpoint):
    return int(CHECKPOINT.search(checkpoint.rstrip("/")).group(1))


def mark_best(out, checkpoint, m):
    """best.json names the checkpoint of the best evaluation so far (written atomically; --keep-last keeps it)."""
    data.write_json(os.path.join(out, "best.json"), {"checkpoint": os.path.basename(checkpoint), "step": m["step"],
                                                     "eval_accuracy": m["eval_accuracy"], "split": m["eval_split"],
                                                     "questions": m["eval_questions"]})


def read_best(out):
    """best.json as a dict, its checkpoint's path resolved in `out` (the run may have moved), or None when there is
    none (or its checkpoint is gone)."""
    try:
        best = json.load(open(os.path.join(out, "best.json")))
        best["checkpoint"] = os.path.join(out, os.path.basename(best["checkpoint"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return best if os.path.isfile(os.path.join(best["checkpoint"], "trainer_state.json")) else None


def best_so_far(out):
    """(step, accuracy) of the best evaluation up to where this run starts, from its (truncated) metrics.jsonl, among
    steps whose checkpoint exists: how a resumed run goes on choosing. None if there is none."""
    path = os.path.join(out, "metrics.jsonl")
    rows = read_metrics(path) if os.path.isfile(path) else []
    found = [(r["step"], r["eval_accuracy"]) for r in rows if r.get("step", 0) >= 1 and "eval_accuracy" in r and
             os.path.isdir(os.path.join(out, f"checkpoint-{r['step']:06d}"))]
    return max(found, key=lambda f: (f[1], -f[0])) if found else None


# --------------------------------------------------------------------------------------------------------------
# Saving: HF layout (loads in transformers/vLLM) + optimizer moments, step and RNG; written atomically


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


def base_model_name(args):
    """How an adapter names its base model: a local directory resolved, a named model by its hub id."""
    return args.pins["base_model_path"] if os.path.isdir(args.model) else ALIASES.get(args.model, args.model)


def trainable(policy):
    """(name, parameter) of what the optimizer holds: every parameter, or under LoRA the adapters alone."""
    return [(n, p) for n, p in unwrap(policy).named_parameters() if p.requires_grad]


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
        if rank == 0 and args.lora:  # the adapters in PEFT's layout, which PEFT and vLLM load on the base model
            save_adapter(unwrap(policy), tmp, base_model_name(args), state_dict=state)
        elif rank == 0:
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
            data.write_json(os.path.join(tmp, "trainer_state.json"),
                            {"step": step, "base_model": args.model, "method": args.method, "world_size": world,
                             "sharded": sharded, "args": vars(args)})
            replace_dir(tmp, final, old=final + ".old")  # remove_partials puts a lone .old back
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
        raise SaveFailed(f"{final}: could not be written ({error}); its partial files were removed; last complete "
                         f"checkpoint: {(checkpoints(out_dir) or ['none'])[-1]}")
    if rank == 0 and args.keep_last:
        prune_checkpoints(out_dir, args.keep_last, final)
    return final


# --------------------------------------------------------------------------------------------------------------
# Resuming: the flags, then (once the models exist) the optimizer state and the random-number state


def check_pins(args, state, pins):
    """A resume must train the same base model (the KL reference) on the same data: the base model's fingerprint
    must match the run's (wherever it now lives), and a changed training set is refused unless
    --allow-recipe-change (then recorded)."""
    saved = (state.get("args") or {}).get("pins") or {}
    if saved.get("base_fingerprint") and saved["base_fingerprint"] != pins["base_fingerprint"]:
        raise ValueError(f"--model {args.model}: its weights are not the run's base model (fingerprint "
                         f"{pins['base_fingerprint']}, the run's {saved['base_fingerprint']}, from "
                         f"{saved.get('base_model_path')}); the KL reference must be the model the run started from")
    if saved.get("dataset_sha256") and saved["dataset_sha256"] != pins["dataset_sha256"]:
        if not args.allow_recipe_change:
            raise ValueError(f"--dataset {args.dataset}: its questions changed since the run started (content hash "
                             f"{pins['dataset_sha256']}, the run's {saved['dataset_sha256']}), so later steps would "
                             "see other questions; restore the file, or pass --allow-recipe-change")
        args.recipe_changes.append({"step": state["step"], "flag": "dataset content", "from": saved["dataset_sha256"],
                                    "to": pins["dataset_sha256"]})


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
    if args.model is None:  # the run's base model: where it was resolved to, if it is still there, else as named
        path = ((state.get("args") or {}).get("pins") or {}).get("base_model_path")
        args.model = path if path and os.path.isdir(path) else state["base_model"]
    return state


def restore_run_args(args, state, world, planning=False):
    """--resume continues the same run: every flag not given now takes the value recorded in the checkpoint. A
    given flag that changes the data order or the objective (RECIPE) is an error unless --allow-recipe-change;
    allowed changes are recorded, with the step they started at, in args.recipe_changes."""
    saved = state.get("args") or {}
    steps = args.steps if "steps" in args.explicit else saved.get("steps")
    if steps is not None and steps <= state["step"] and not planning:
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
    fixed = [(k, saved.get(k, d), getattr(args, k)) for k, d in (("lora", 0), ("lora_alpha", None),
                                                                 ("lora_dropout", 0.0))
             if k in args.explicit and getattr(args, k) != saved.get(k, d)]
    if fixed:
        raise ValueError(f"--resume {args.resume}: --{fixed[0][0].replace('_', '-')} {fixed[0][2]}: the run trains "
                         f"{'full weights' if not saved.get('lora') else 'LoRA r=' + str(saved['lora'])}; LoRA's "
                         "rank, alpha and dropout are fixed for a run (start a new one with another --out)")
    if changes and not args.allow_recipe_change:
        differ = ", ".join(f"--{k.replace('_', '-')} {new} (the run has {old})" for k, old, new in changes)
        raise ValueError(f"--resume {args.resume}: {differ} would change the data order or the objective of the "
                         "run; drop the flag to continue it as it was, or pass --allow-recipe-change")
    args.recipe_changes = saved.get("recipe_changes", []) + [
        {"step": state["step"], "flag": k, "from": old, "to": new} for k, old, new in changes]
    if world == 1 and args.fsdp == "on" and "fsdp" not in args.explicit:
        args.fsdp = "off"  # a sharded run resumed in one process: its optimizer state is gathered (a mode change)


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
    names = [n for n, _ in trainable(policy)]
    state = {n: {k: tensors[f"{n}.{k}"] for k in ("step", "exp_avg", "exp_avg_sq")} for n in names} if tensors else {}
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    osd = {"state": state, "param_groups": [{**group, "params": names}]}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True) if sharded else None
    set_optimizer_state_dict(policy, optimizer, optim_state_dict=osd, options=options)


def load_training_state(checkpoint, state, policy, optimizer, sharded, rank, world):
    """The optimizer state and this rank's random-number state of `checkpoint`, in any sharding mode and world size:
    the full state is assembled (on rank 0 when sharded), then sharded as this run is. -> the step to start at."""
    tensors, error = {}, None
    if rank == 0 or not sharded:
        try:
            shapes = [(n, p.shape) for n, p in trainable(policy)]
            tensors = read_optimizer_tensors(checkpoint, state, shapes)
        except (ValueError, FileNotFoundError) as e:
            error = str(e)
    error = first_error(error, world)
    if error:
        raise ValueError(error)
    load_optimizer_tensors(optimizer, policy, tensors, sharded)
    rng_path = os.path.join(checkpoint, f"rng-rank{rank}.safetensors")
    if rank < state.get("world_size", 1) or os.path.isfile(rng_path):  # a rank the saving run lacked: its seed
        torch.set_rng_state(read_safetensors(rng_path, "random-number state")["cpu"])
    return state["step"]


# --------------------------------------------------------------------------------------------------------------
# metrics.jsonl (one line per step, appended) and curves.png


def append_metrics(path, m):
    data.append_lines(path, [json.dumps(m)])


def read_metrics(path, last_step=None):
    """The rows of metrics.jsonl (up to last_step), read as eval.py reads its results: a torn last line (the run
    was killed mid-write) is dropped, a bad line elsewhere is an error naming it."""
    return [row for _, row in data.read_jsonl_rows(path, "metrics record")
            if last_step is None or row.get("step", 0) <= last_step]


def write_metrics(path, rows):
    data.write_atomic(Path(path), "".join(json.dumps(row) + "\n" for row in rows).encode())


def truncate_metrics(path, last_step):
    """On resume, drop lines of steps after the checkpoint (written before the run stopped), atomically."""
    if os.path.isfile(path):
        write_metrics(path, read_metrics(path, last_step))


def plot_curves(runs, path_png, keys=("eval_accuracy", "reward", "kl", "rationale_len", "stop_rate")):
    """curves.png (if matplotlib is installed): one panel per logged quantity against the step. runs: a
    metrics.jsonl path, or {label: path} to overlay several runs (the arms of an ablation). eval_accuracy, the
    held-out accuracy, exists only at --eval-every steps."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    runs = runs if isinstance(runs, dict) else {None: runs}
    logs = {label: read_metrics(path) for label, path in runs.items()}
    keys = [k for k in keys if any(k in row for rows in logs.values() for row in rows)] or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for label, rows in logs.items():
            points = [(row["step"], row[k]) for row in rows if k in row]
            if points:
                ax.plot(*zip(*points), marker="o" if k == "eval_accuracy" else None, label=label)
        ax.set_title(k)
        ax.set_xlabel("step")
    if len(logs) > 1:  # one legend above the panels, so that it hides no curve
        handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels())}
        fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles))
    fig.tight_layout(rect=(0, 0, 1, 0.86 if len(logs) > 1 else 1))
    fig.savefig(path_png)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# What a run prints: the preflight line (after the memory plan on a GPU), a line per step, a summary

def split_label(args):
    name = os.path.basename(args.eval_dataset or args.dataset).removesuffix(".jsonl")
    return f"{name} {args.eval_split}" if not args.eval_dataset else name


def accuracy_text(summary, label):
    g = summary["metrics"]["greedy"]
    return (f"{label} accuracy {g['accuracy']:.1%} ({g['correct']}/{g['n']}, 95% CI {g['ci95'][0]:.1%}-"
            f"{g['ci95'][1]:.1%}, greedy)")


def print_preflight(args, run, compute_dtype, memory):
    n_params = sum(p.numel() for p in parallel.unwrap(run.policy).parameters())
    lora = f"LoRA r={args.lora}, {sum(p.numel() for _, p in trainable(run.policy)) / 1e6:.2f}M trained | " \
        if args.lora else ""
    print(f"preflight | model {args.model} | {n_params / 1e6:.1f}M params | {lora}world {run.world} | "
          f"{'FSDP2' if run.sharded else 'DDP' if run.world > 1 else 'single'} | compute {str(compute_dtype)[6:]} | "
          f"activation checkpointing {'on' if parallel.checkpointing_on(args, run.sharded) else 'off'} | "
          f"{args.recipe} recipe | {memory} | {len(run.examples)} questions | "
          f"{args.questions_per_step} questions x K={args.num_samples} per step | {os.path.basename(args.dataset)} "
          f"({run.examples[0].task} prompts), beta {args.beta} | steps {run.status['step']}->{args.steps}", flush=True)


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
                f"len {m['rationale_len']:5.1f} | stop {m['stop_rate']:.2f} | acc {m['accuracy']:.2f} | "
                f"sample {m['sample_tokens_per_s']:.0f} tok/s | step {m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e}")
    return f"step {m['step']:>4} | sft loss {m['loss']:.4f} | {m['tokens_per_s']:.0f} tok/s | lr {m['lr']:.2e}"


def print_summary(args, run, seconds):
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    rows = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
    plot_curves(metrics_path, os.path.join(args.out, "curves.png"))
    last = next((row for row in reversed(rows) if "loss" in row), {})
    best = read_best(args.out)
    final = f"reward {last['reward']:.3f} kl {last['kl']:.4f}" if "reward" in last else \
        f"loss {last.get('loss', float('nan')):.4f}"
    print(f"done | {args.method} {args.model} on {args.dataset} | steps ->{args.steps} in {seconds:.0f}s | final "
          f"{final} | checkpoint "
          f"{run.last_saved or 'none'} | best {best['checkpoint'] if best else 'none'} (step "
          f"{best['step'] if best else '-'}, {split_label(args)} accuracy "
          f"{best['eval_accuracy'] if best else float('nan'):.1%}) | metrics {metrics_path}", flush=True)
    if getattr(run, "test", None):
        base, after, best = run.test
        print(f"test accuracy | {base['accuracy']:.1%} base model -> {after['accuracy']:.1%} at step {best['step']} "
              f"(chosen on {split_label(args)}) | {after['n']} {os.path.basename(args.dataset)} test questions, "
              f"greedy | whole run {seconds / 60:.0f} min", flush=True)


class StepProgress:
    """Progress inside a step, fed by latro.sample, compute_advantages and backward_on_rollout: on a terminal one
    line rewritten in place; into a file a plain line at most every `every` seconds."""

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
        self.last, elapsed = now, now - self.phase_start
        eta = elapsed / done * (total - done)
        text = f"step {self.step} | {phase} {done}/{total} {self.UNITS[phase]} | {rows_finished}/{rows} rows done"
        if phase == "sample":  # rows may stop early, so the decoding-step ETA is an upper bound
            text += f" | {tokens} tokens, {tokens / max(elapsed, 1e-9):.0f} tok/s | ETA <= {eta:.0f}s"
        else:
            text += f" | ETA {eta:.0f}s"
        self.stream.write("\r" + text.ljust(self.width) if self.tty else text + "\n")
        self.width = len(text)
        self.stream.flush()

    def close(self):
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
