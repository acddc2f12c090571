"""Host settings of engine/runtime.py: freed memory is reused instead of page-faulted back in."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from passion.config import load_config

PROBE = r"""
import json, resource, sys
import torch
from passion.engine import runtime

runtime.configure_host(1, reuse_freed_memory=sys.argv[1] == "on")
x = torch.ones(16 * 2 ** 20, requires_grad=True)  # 64 MB: above glibc's largest mmap threshold
faults = []
for _ in range(8):  # a forward/backward loop that frees and re-allocates large blocks
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    (x * 2).exp().mul(x).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the heap settles within 2-3 iterations (measured: 7, 6, 2, 0, 0, ... units of 64 MB with reuse,
# 7 every iteration without); count iterations 4-8 only
print(json.dumps({"faults": sum(faults[3:]), "threads": torch.get_num_threads(),
                  "reusing": runtime.reuse_freed_memory_in_process() if sys.argv[1] == "on" else False}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_reused_memory_is_not_page_faulted_in_again():
    on = _probe("on")
    if not on["reusing"]:
        pytest.skip("this C library has no glibc mallopt; the setting is a no-op here")
    off = _probe("off")
    pages = 64 * 2 ** 20 // 4096
    assert off["faults"] >= 5 * pages, off  # every iteration gets (and zeroes) fresh pages again
    assert on["faults"] < off["faults"] / 4, (on, off)
    assert on["threads"] == off["threads"] == 1


def test_reuse_freed_memory_is_a_config_switch():
    cfg = load_config(None, ["train.reuse_freed_memory=false"])
    assert cfg.train.reuse_freed_memory is False
    assert load_config(None, []).train.reuse_freed_memory is True


def test_bf16_note_only_where_bf16_is_emulated(monkeypatch, capsys):
    import torch

    from passion.engine import runtime

    cpu = torch.device("cpu")
    assert runtime.warn_if_slow_precision(cpu, "fp32") is None
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    note = runtime.warn_if_slow_precision(cpu, "bf16")
    assert note and "fp32" in note and note in capsys.readouterr().err
    monkeypatch.setattr(runtime, "native_bf16", lambda device: True)
    assert runtime.warn_if_slow_precision(cpu, "bf16") is None
    assert runtime.native_bf16(torch.device("cuda")) is True
