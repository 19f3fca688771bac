"""How a script runs on N processes and GPUs: torchrun's ranks, flag checks, DDP or FSDP2, and the collectives
that keep the ranks in step.

train.py and eval.py run the same code in one process or under `torchrun --nproc_per_node N`; what differs lives
here, so the training loop reads the same either way:
  - every rank drives one device: cuda:LOCAL_RANK under torchrun, --device in a single process;
  - a replica that fits is wrapped in DDP; one that does not is sharded with FSDP2 (`fully_shard` per block, fp32
    master shards, bf16 compute through MixedPrecisionPolicy), as the memory plan (tools/plan.py) decides;
  - a failure on one rank reaches every rank (first_error, on_rank0), so none waits forever in a collective.
"""
import contextlib
import os
import resource
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from model import add_lora, adapters_disabled, build_on_meta, load, load_adapter, read_state

# --------------------------------------------------------------------------------------------------------------
# Processes: one per device, started by torchrun (WORLD_SIZE, RANK, LOCAL_RANK) or a single plain process


def choose_device(flag, world, local_rank, cuda_available):
    """This process's device name. Under torchrun (world > 1) each process takes its own GPU, cuda:LOCAL_RANK; a
    named GPU (cuda:1) would put every process on it, so it is refused there. A pure function of its arguments."""
    flag = flag or ("cuda" if cuda_available else "cpu")
    if not flag.startswith("cuda"):
        return flag
    if world > 1 and flag != "cuda":
        raise ValueError(f"--device {flag}: under torchrun each rank uses cuda:LOCAL_RANK (a named GPU would be "
                         "shared by every process); pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if not cuda_available:
        raise ValueError(f"--device {flag}: no CUDA device is available; use --device cpu")
    return f"cuda:{local_rank}" if world > 1 else flag


def check_flags(args, ranges):
    """Every numeric flag against one table, before anything loads: ranges maps a flag to (test, what is expected);
    a flag left unset (None) is not checked. The first broken one is a ValueError naming it."""
    for flag, (ok, expected) in ranges.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None and not ok(value):
            raise ValueError(f"{flag} {value:g}: expected {expected}")


POSITIVE = (lambda v: v >= 1, "a positive integer")
NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
UNIT = (lambda v: 0 < v <= 1, "a number in (0, 1]")


def setup_distributed(device_flag):
    """-> (device, rank, world). A plain `python train.py` (or eval.py) is rank 0 of 1 and never touches
    torch.distributed. NCCL gets the device up front and a long timeout: ranks wait in barriers while rank 0 writes
    a checkpoint, which for an 8B model takes longer than the default 10 minutes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(choose_device(device_flag, world, local_rank, torch.cuda.is_available()))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    rank = 0
    if world > 1:
        timeout = timedelta(minutes=60)
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        rank = dist.get_rank()
    return device, rank, world


def run_main(main):
    """Runs a script's main() and ends the process with its code (main's return value or its sys.exit code).
    Under torchrun, after a clean run gloo's worker threads can abort the interpreter's finalization ("terminate
    called without an active exception", about 1 run in 6; pytorch/pytorch#179291). Every file is closed and the
    process group destroyed by then, so the process ends without finalizing."""
    try:
        code = main() or 0
    except SystemExit as e:  # argparse's and main's sys.exit(N)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# --------------------------------------------------------------------------------------------------------------
# One run at a time: a lock file that names its process

def process_start(pid):
    """When a process started (clock ticks since boot, /proc/PID/stat), or None: a pid reused after a container
    restart has another start time."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def lock_holder_alive(host, pid, start):
    """Whether the process that wrote a lock of this host still runs (a reused pid does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start is None or process_start(pid) in (None, start)


def take_lock(path, what):
    """An exclusive-create lock file "host pid start-ticks started-at" at `path`, for `what` (a run directory, a
    results file). A lock left by a process of this host that no longer runs (kill -9, a container restart) is taken
    over with a note; a live one, or one from another host, is an error that names it and says how to clear it."""
    me = f"{socket.gethostname()} {os.getpid()} {process_start(os.getpid())} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                text = open(path).read()
                host, pid, *rest = text.split()
                pid, start = int(pid), int(rest[0]) if rest and rest[0].isdigit() else None
            except (OSError, ValueError):
                text, host, pid, start, rest = None, "?", 0, None, []
            if host == socket.gethostname() and pid and not lock_holder_alive(host, pid, start):
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
                    print(f"note: {what}: taking over the lock of pid {pid}, which is no longer running", flush=True)
                os.remove(aside)
                continue
            since = f", started {rest[1]}" if len(rest) > 1 else ""
            raise ValueError(f"{what}: in use by another run (pid {pid} on {host}{since}; lock {path}); wait for it or "
                             f"choose another --out; if no run uses it, delete {path}")
        os.write(fd, me.encode())
        os.close(fd)
        return path
    raise ValueError(f"{what}: could not take the lock {path}; another run may be starting there")


def release_lock(path):
    try:
        if open(path).read().split()[1] == str(os.getpid()):
            os.remove(path)
    except (OSError, IndexError):
        pass


def on_rank0(rank, fn):
    """fn() on rank 0, which owns the files; its result, or the error that stops everyone, goes to every rank so
    that none waits forever."""
    message = [None, None]
    if rank == 0:
        try:
            message = [None, fn()]
        except (ValueError, OSError) as e:
            message = [str(e), None]
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ValueError(message[0])
    return message[1]


def first_error(message, world):
    """Every rank learns whether any rank failed (so none waits forever in a collective); the first message wins."""
    if world == 1:
        return message
    messages = [None] * world
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m), None)


def peer_lost(error):
    """Whether a collective failed because another rank died (kill -9, OOM): the survivor's gloo/NCCL error."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL error"))


def all_ranks(ok, world, device):
    """True when `ok` holds on every rank (a collective: every rank calls it)."""
    if world == 1:
        return ok
    flag = torch.tensor(float(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1


def mean_across_ranks(metrics, world, device):
    if world == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world for k, v in zip(keys, t.tolist())}


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
    everyone_ok = all_ranks(error is None, world, device)  # the others wait here while local rank 0 downloads
    if error is not None:
        raise error
    if not everyone_ok:
        raise FileNotFoundError(f"{dataset} {split}: loading failed on another rank (its error is above)")
    return examples if first else data.load_dataset(dataset, split, limit)


# --------------------------------------------------------------------------------------------------------------
# Replicated (DDP) or sharded (FSDP2): chosen by the memory plan


def device_memory(device):
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def peak_memory(device):
    """Bytes: the most this process's GPU allocated, or on the CPU its peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def checkpointing_on(args, sharded):
    """Activation checkpointing: on when sharded unless --activation-checkpointing off (an 8B model's activations
    are ~18 GiB per 4 x 760-token micro-batch without it)."""
    return args.activation_checkpointing == "on" or (args.activation_checkpointing == "auto" and sharded)


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


def wrap_policy(policy, mesh, compute_dtype, world, device):
    """FSDP2 when `mesh` is given (compute in compute_dtype, gradients reduced in fp32), else DDP when world > 1.
    cast_forward_inputs=False: the blocks take the fp32 RoPE tables as arguments, and casting them to bf16 would
    make the trained policy differ from the bf16 sampler that drew the rationales (which keeps them fp32)."""
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        return shard(policy, mesh, MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                                                        cast_forward_inputs=False))
    if world > 1:
        # gradient_as_bucket_view: gradients live in DDP's communication buckets instead of next to a copy of them
        return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
    return policy


def wrap_reference(reference, mesh):
    """The frozen reference is sharded too when the policy is (it only runs forward: one block gathered at a time)."""
    if mesh is None:
        return reference
    from torch.distributed.fsdp import MixedPrecisionPolicy
    # a forward-only module has no backward to keep the root's gathered embedding and lm_head for
    return shard(reference, mesh, MixedPrecisionPolicy(cast_forward_inputs=False), reshard_root=True)


def load_sharded(source, device, dtype, wrap):
    """A model sharded by `wrap` (FSDP2) without any rank holding all of it: built and sharded on the meta device,
    each rank allocates its own shards, then rank 0 reads the checkpoint on the CPU and broadcasts it one tensor at
    a time, every rank keeping its slice (an 8B policy in fp32 is 30 GiB per GPU if loaded whole)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model, _, directory = build_on_meta(source)
    model = wrap(model.to(dtype))
    model.to_empty(device=device)
    state = read_state(directory, model, "cpu", dtype) if dist.get_rank() == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    model.rope.reset(device)
    return model.eval()


def build_models(policy_source, reference_source, device, world, compute_dtype, sharded, checkpointing, build=None,
                 mesh=None, lora=None, adapter=None):
    """-> (policy, sampler, reference). policy: fp32 master weights, DDP-wrapped when world > 1 or FSDP2-sharded;
    sampler: a compute-dtype copy that generates and scores without grad (the policy itself in fp32 unsharded);
    reference: the frozen pi_ref in the compute dtype, sharded like the policy. build(source, dtype, wrap) makes one
    wrapped model: by default from its checkpoint (each rank loading only its shards when sharded); the memory plan
    passes one that builds fake tensors (and its mesh, built outside fake mode).
    lora = (r, alpha, dropout): one model instead of three. Its frozen base, in the compute dtype, gets rank-r
    adapters with fp32 master weights (or those of `adapter`, a checkpoint); it samples with its adapters on, and
    with them off it is pi_ref, for no second copy of the weights."""
    mesh = mesh or (device_mesh(device.type, world) if sharded else None)
    if build is None:
        def build(source, dtype, wrap):
            return load_sharded(source, device, dtype, wrap) if wrap is not None and sharded else \
                (wrap or (lambda m: m))(load(source, device=device, dtype=dtype)[0])
    if lora:
        model = build(reference_source, compute_dtype, None)
        model = load_adapter(model, adapter) if adapter else add_lora(model, *lora)
        model.checkpoint_layers = checkpointing
        return wrap_policy(model, None, compute_dtype, world, device), model, AdaptersOff(model)
    sampler = None
    if compute_dtype != torch.float32 or sharded:
        sampler = build(policy_source, compute_dtype, None).requires_grad_(False).eval()
    policy = build(policy_source, torch.float32, lambda m: wrap_policy(m, mesh, compute_dtype, world, device))
    reference = build(reference_source, compute_dtype, lambda m: wrap_reference(m, mesh)).requires_grad_(False)
    unwrap(policy).checkpoint_layers = checkpointing
    return policy, sampler if sampler is not None else unwrap(policy), reference.eval()


class AdaptersOff:
    """pi_ref under LoRA: the LoRA model's own forward with its adapters switched off (model.adapters_disabled)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)


def autocast(device, compute_dtype, sharded):
    """The context a replica's forward and backward run in: bf16 autocast over fp32 master weights. FSDP2 casts
    through its MixedPrecisionPolicy instead, and fp32 needs nothing."""
    if sharded or compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------------------------
# Inside a step


def grad_sync(policy):
    """-> before_forward(is_last), called before each micro-batch's forward: whether its backward all-reduces
    (DDP) or reduce-scatters (FSDP2) the gradients. FSDP2 reduce-scatters every micro-batch: skipping it would keep
    every parameter's unsharded fp32 gradient on every rank until the last one (30 GiB for 8B). DDP all-reduces on
    the last micro-batch only: its gradient is a replica anyway, and skipping saves the traffic."""
    if isinstance(policy, DistributedDataParallel):
        def before_forward(is_last):
            policy.require_backward_grad_sync = is_last
    elif hasattr(policy, "set_requires_gradient_sync"):  # FSDP2
        def before_forward(is_last):
            policy.set_requires_gradient_sync(True)
    else:  # one process: nothing to synchronise
        def before_forward(is_last):
            pass
    return before_forward


@torch.no_grad()
def refresh_sampler(sampler, policy):
    """Copies the updated fp32 policy into the sampling copy. Sharded: each shard is cast to the sampler's dtype
    before the all-gather (half the traffic and a bf16, not fp32, gathered tensor)."""
    for s, p in zip(sampler.parameters(), unwrap(policy).parameters()):
        s.copy_(p.to(s.dtype).full_tensor() if hasattr(p, "full_tensor") else p)
