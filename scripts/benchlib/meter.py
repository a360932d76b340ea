"""Peak memory above a baseline for the timed benchmark runs (CUDA allocator or Linux counters)."""

from __future__ import annotations

from proc_memory import peak_anon_bytes, reset_peak, status_kib


class MemoryMeter:
    """Peak memory above a baseline: CUDA allocator statistics, or the kernel's counters on CPU.

    CPU: ``VmHWM`` (peak resident set) is reset to the current RSS at :meth:`start`. It counts
    file-backed pages too, and a method that runs new code (a restart's LAPACK calls) faults in
    pages of ``libtorch_cpu.so`` that are not memory it allocated. So :meth:`peak` subtracts
    ``RssFile`` + ``RssShmem`` at the end: ``(VmHWM - file_end) - anon_start``, the peak of
    anonymous memory above the baseline (a slight under-estimate when code pages are first touched
    after the peak). With glibc's default allocator it includes freed blocks glibc keeps for
    reuse, so it is an upper bound on live memory. ``peak_rss`` keeps the uncorrected figure.
    """

    def __init__(self, device) -> None:
        import torch

        self.device = device
        self.cuda = device.type == "cuda"
        self.torch = torch
        self.base = 0
        self.how = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM - RssFile - RssShmem"

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
            self.base = self.torch.cuda.memory_allocated(self.device)
            return
        reset_peak()
        self.base = status_kib("RssAnon") * 1024
        self.base_rss = status_kib("VmHWM") * 1024

    def peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) - self.base
        return peak_anon_bytes() - self.base

    def peak_rss(self) -> int:
        if self.cuda:
            return self.peak()
        return status_kib("VmHWM") * 1024 - self.base_rss
