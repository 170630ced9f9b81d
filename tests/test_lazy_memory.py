"""The host KV pool (engines/torch/lazy_memory.py): it reads as zeros, costs no resident memory until written,
and a write makes only the touched pages resident. Resident size is read with mincore(2) on the tensor's own
pages, so other allocations of the test process cannot blur it (mincore also counts pages mapped to the shared
zero page by a read, so each residency check comes before any read of the tensor)."""

from __future__ import annotations

import ctypes
import mmap

import torch

from engines.torch import lazy_memory
from engines.torch.model_runner import KVCache

PAGE = mmap.PAGESIZE


def resident_pages(t: torch.Tensor) -> int:
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(t.data_ptr(), nbytes, vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


def test_untouched_pool_is_zero_and_not_resident():
    t = lazy_memory.zeros((64, 1024, 1024), torch.bfloat16)  # 128 MiB
    assert t.shape == (64, 1024, 1024) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % PAGE == 0
    assert resident_pages(t) == 0
    t[3, 5, :4] = 1.5
    assert resident_pages(t) == 1
    assert t[3, 5, :4].tolist() == [1.5] * 4 and t.sum().item() == 6.0  # everything else reads as zero


def test_views_keep_the_mapping_alive():
    layers = list(lazy_memory.zeros((2, 4, PAGE), torch.int8).unbind(0))
    layers[1][3, -1] = 7
    assert layers[1][3, -1].item() == 7 and layers[0].sum().item() == 0


def test_host_kv_cache_is_lazy_for_every_storage_dtype():
    for kind, scales in (("model", None), ("int8", torch.ones(30, 2, 3)), ("fp8", None)):
        cache = KVCache(30, 512, 16, 3, 64, torch.bfloat16, "cpu", kind, scales)
        assert resident_pages(cache.data) == 0, kind
        assert not cache.data.view(torch.int8).any(), kind
