"""bf16 requests on a device without native bf16 run fp32 and say so; with native bf16 (or forced) they stay bf16."""
from __future__ import annotations

import logging

import torch

from conftest import TEXTS, tiny_loaded
from effir_export.models import precision
from effir_export.models.encoder import Encoder


def test_bf16_without_native_support_falls_back_to_fp32_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.delenv("EFFIR_BF16", raising=False)
    precision._warn_once.cache_clear()
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="effir_export.models.precision"):
        assert precision.effective_dtype(torch.bfloat16, cpu) is torch.float32
        loaded = tiny_loaded("llama")
        encoder = Encoder(loaded.model, loaded.tokenizer, dtype=torch.bfloat16)
    assert encoder.dtype is torch.float32 and next(loaded.model.parameters()).dtype is torch.float32
    assert sum("no native bf16" in r.message for r in caplog.records) == 1  # stated, once
    assert encoder.encode(TEXTS).dtype.name == "float32"
    assert precision.effective_dtype(torch.float16, cpu) is torch.float16  # only bf16 is rewritten
    assert precision.effective_dtype(None, cpu) is None


def test_bf16_is_kept_where_native_or_forced(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.effective_dtype(torch.bfloat16, cpu) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setenv("EFFIR_BF16", "force")
    assert precision.effective_dtype(torch.bfloat16, cpu) is torch.bfloat16


def test_cpu_flags_are_read_from_cpuinfo():
    flags = open("/proc/cpuinfo").read()
    assert precision.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
