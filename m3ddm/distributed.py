"""torchrun ranks and devices from the environment, the process group, and per-device settings.

PyTorch's own stack only: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; each rank takes the GPU
cuda:LOCAL_RANK and joins one process group (NCCL on GPUs, gloo on CPUs) with a long timeout, because
rank 0 may spend many minutes writing a full-size checkpoint (about 26 GB with EMA and optimizer state)
or evaluating it while the others wait in a barrier (NCCL's default timeout is 10 minutes).

    world = distributed.setup(args.device)        # World(rank, local_rank, size, device)
    ...
    distributed.cleanup()
"""
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import UserError

PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment(env=None) -> tuple:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) for a plain process."""
    env = os.environ if env is None else env
    try:
        values = tuple(int(env.get(k, default)) for k, default in
                       (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK or WORLD_SIZE is not a whole number; start the job with torchrun "
                        "or unset them.") from None
    return values


def choose_device(arg: str, local_rank: int, world_size: int, cuda_available: bool, cuda_count: int) -> torch.device:
    """The device of this process, from --device (auto, cpu, cuda, cuda:N).

    Under torchrun (world_size > 1) every CUDA rank takes cuda:LOCAL_RANK: `auto` and `cuda` map to it, and
    an explicit `cuda:N` is refused, since it would put every rank on GPU N."""
    arg = "auto" if arg is None else str(arg)
    if arg == "auto":
        arg = "cuda" if cuda_available else "cpu"
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise UserError(f"--device {arg!r} is not a device name; use auto, cpu, cuda or cuda:N.") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {arg!r} is not supported; use auto, cpu, cuda or cuda:N.")
    if device.type == "cpu":
        return device
    if not cuda_available:
        raise UserError(f"--device {arg} asks for CUDA, which is not available here; use --device cpu.")
    if world_size > 1:
        if device.index is not None:
            raise UserError(f"--device {arg} under torchrun would put all {world_size} ranks on GPU {device.index}; "
                            "pass --device cuda (rank r takes cuda:LOCAL_RANK) and pick GPUs with CUDA_VISIBLE_DEVICES.")
        if local_rank >= cuda_count:
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU (this node sees {cuda_count}); start at most "
                            f"{cuda_count} processes per node (torchrun --nproc_per_node).")
        return torch.device("cuda", local_rank)
    if device.index is not None and device.index >= cuda_count:
        raise UserError(f"--device {arg}: this machine sees {cuda_count} GPU(s); use cuda:0 to cuda:{cuda_count - 1}.")
    return device


def setup(device_arg="auto", timeout: timedelta = PROCESS_GROUP_TIMEOUT, env=None) -> World:
    """This process's World; under torchrun also sets the CUDA device and joins the process group."""
    rank, local_rank, size = environment(env)
    available = torch.cuda.is_available()
    device = choose_device(device_arg, local_rank, size, available, torch.cuda.device_count() if available else 0)
    if size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(rank, local_rank, size, device)


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_cached_memory(device: torch.device):
    """Give the CUDA caching allocator's unused blocks back to the driver (before a subprocess uses the GPU)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def set_tf32(enabled: bool):
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and later): about 8x the fp32 tensor throughput
    for a 10-bit mantissa in the products. Off: exact fp32 (IEEE)."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


# ----------------------------------------------------------------------------------------------------
# Sharding a list of videos (sample.py, evaluate.py): who does which video, and results to rank 0

SHARDING_TIMEOUT = timedelta(days=7)


def setup_sharding(device_arg="auto", timeout: timedelta = SHARDING_TIMEOUT, env=None) -> World:
    """This process's World for sharded sampling or evaluation: the device as in `setup`, but the process
    group is gloo on every device. The ranks exchange only small Python objects (probe results at the start,
    per-video results at the end), so no NCCL communicator (GPU memory, a watchdog) is needed, and gloo
    notices at once when a peer process dies. The long timeout is for the end, where a rank that finished
    early waits for the slowest one (up to about the longest video's time)."""
    rank, local_rank, size = environment(env)
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    device = choose_device(device_arg, local_rank, size, available, count)
    if size > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("gloo", timeout=timeout)
    return World(rank, local_rank, size, device)


def shard_by_cost(costs, size: int) -> list:
    """Split items with the given costs over `size` ranks as evenly as the costs allow; returns, per rank, its
    item indices in input order.

    The LPT rule: items in decreasing cost (ties: the earlier item first) each go to the rank with the least
    total so far (ties: the lower rank); the busiest rank ends within 4/3 of the best possible split. The
    split depends only on the costs, so every rank computes the same one."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    loads, shards = [0] * size, [[] for _ in range(size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (loads[r], r))
        shards[rank].append(i)
        loads[rank] += costs[i]
    return [sorted(s) for s in shards]


def map_over_ranks(world: World, fn, items) -> list:
    """[fn(item) for item in items] with the work split round robin over the ranks; every rank gets the
    whole list (fn's results must be picklable)."""
    mine = {i: fn(items[i]) for i in range(world.rank, len(items), world.size)}
    if world.size == 1:
        return [mine[i] for i in range(len(items))]
    parts = [None] * world.size
    dist.all_gather_object(parts, mine)
    merged = {i: value for part in parts for i, value in part.items()}
    return [merged[i] for i in range(len(items))]


def gather_to_main(world: World, obj):
    """Rank 0: [obj of rank 0, obj of rank 1, ...]; other ranks: None. A plain process: [obj]."""
    if world.size == 1:
        return [obj]
    parts = [None] * world.size if world.is_main else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def broadcast_from_main(world: World, obj):
    """Rank 0's obj, on every rank."""
    if world.size == 1:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World):
    if world.size > 1:
        dist.barrier()
