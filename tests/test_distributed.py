"""m3ddm.distributed: which device each torchrun rank takes, without a GPU (the mapping is a pure function)."""
from datetime import timedelta

import pytest
import torch

from m3ddm import distributed as D
from m3ddm.errors import UserError


@pytest.mark.parametrize("arg,local,world,cuda,count,want", [
    ("auto", 0, 1, False, 0, "cpu"),
    ("cpu", 3, 4, True, 4, "cpu"),                   # CPU ranks under torchrun (gloo)
    ("auto", 0, 1, True, 2, "cuda"),
    ("cuda", 0, 1, True, 2, "cuda"),
    ("cuda:1", 0, 1, True, 2, "cuda:1"),             # one process: the GPU asked for
    ("auto", 3, 4, True, 4, "cuda:3"),               # torchrun: cuda:LOCAL_RANK
    ("cuda", 1, 2, True, 2, "cuda:1"),               # was an index-less device (ValueError in set_device)
    ("cuda", 1, 4, True, 2, "cuda:1"),               # two nodes of 2 GPUs: LOCAL_RANK, not RANK
])
def test_each_rank_takes_its_local_gpu(arg, local, world, cuda, count, want):
    assert D.choose_device(arg, local, world, cuda, count) == torch.device(want)


@pytest.mark.parametrize("arg,local,world,cuda,count,match", [
    ("cuda:1", 0, 2, True, 2, "all 2 ranks on GPU 1"),   # every rank on one GPU: refused
    ("cuda", 0, 1, False, 0, "not available"),
    ("cuda", 2, 3, True, 2, "LOCAL_RANK 2 has no GPU"),
    ("cuda:2", 0, 1, True, 2, "sees 2 GPU"),
    ("tpu", 0, 1, False, 0, "not a device name|not supported"),
])
def test_bad_device_choices_are_one_clear_error(arg, local, world, cuda, count, match):
    with pytest.raises(UserError, match=match) as e:
        D.choose_device(arg, local, world, cuda, count)
    assert "\n" not in str(e.value)


def test_environment_and_single_process_setup():
    assert D.environment({}) == (0, 0, 1)
    assert D.environment({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == (5, 1, 8)
    with pytest.raises(UserError, match="whole number"):
        D.environment({"RANK": "x"})
    world = D.setup("cpu", env={})
    assert (world.rank, world.size, world.device, world.is_main) == (0, 1, torch.device("cpu"), True)
    assert not torch.distributed.is_initialized()


def test_long_process_group_timeout_reaches_the_group(monkeypatch):
    """Rank 1 of a 2-process torchrun world (init_process_group recorded, not run): gloo on CPU, and the
    long PROCESS_GROUP_TIMEOUT instead of NCCL's 10-minute default."""
    seen = {}
    monkeypatch.setattr(D.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    world = D.setup("cpu", env={"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert world.rank == 1 and world.size == 2 and not world.is_main
    assert seen["backend"] == "gloo" and seen["timeout"] == D.PROCESS_GROUP_TIMEOUT >= timedelta(hours=1)


def test_tf32_switch_sets_both_matmul_and_convolution():
    before = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    try:
        D.set_tf32(True)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("tf32",) * 2
        D.set_tf32(False)
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == ("ieee",) * 2
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before
