"""GPU telemetry through NVML (nvidia-ml-py): memory, power and utilization sampled in the background.

Where there is no GPU, no driver or no ``pynvml``, the sampler says "no GPU telemetry" and why, and
everything else goes on.
"""

from __future__ import annotations

import threading
import time


class GpuSampler:
    """Samples one GPU every ``interval_s`` seconds between :meth:`start` and :meth:`stop`.

    Args:
        index: the NVML device index (a rank's local GPU).
        interval_s: sampling period.
    """

    def __init__(self, index: int = 0, interval_s: float = 0.05):
        self.index, self.interval_s = index, interval_s
        self.reason = None
        self._handle = None
        self._samples: list[tuple[float, int, float | None, int | None]] = []  # (t, used, W, util %)
        self._stop = threading.Event()
        self._thread = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_InvalidArgument, ...
            self.reason = f"no GPU telemetry: {type(e).__name__}: {e}".strip(": ")

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _sample(self) -> None:
        nv, h = self._nvml, self._handle
        used = nv.nvmlDeviceGetMemoryInfo(h).used
        try:
            watts = nv.nvmlDeviceGetPowerUsage(h) / 1e3
        except nv.NVMLError:
            watts = None
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h).gpu
        except nv.NVMLError:
            util = None
        self._samples.append((time.perf_counter(), used, watts, util))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> GpuSampler:
        """Forgets earlier samples and starts sampling (a no-op without telemetry)."""
        self._samples.clear()
        if self.available:
            self._stop.clear()
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="gpu-telemetry", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict:
        """Stops sampling; returns a summary (or ``{"gpu": None, "note": reason}``)."""
        if not self.available:
            return {"gpu": None, "note": self.reason}
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        s = self._samples
        watts = [w for _, _, w, _ in s if w is not None]
        util = [u for _, _, _, u in s if u is not None]
        return {
            "gpu": self.name,
            "index": self.index,
            "samples": len(s),
            "seconds": round(s[-1][0] - s[0][0], 3),
            "memory_used_max_bytes": max(u for _, u, _, _ in s),
            "power_w_mean": round(sum(watts) / len(watts), 1) if watts else None,
            "power_w_max": round(max(watts), 1) if watts else None,
            "util_mean_pct": round(sum(util) / len(util), 1) if util else None,
        }
