"""Energy of a window of work, in joules per domain, read from the hardware's own counters.

    python energy.py                           # which counters this machine has, or why it has none
    python energy.py --device cuda --idle 5    # NVML (GPU) + RAPL (CPU, DRAM), and idle power over 5 s
    python -c "import energy; print(energy.EnergyMeter.detect('cpu').status_line())"

The counters (docs/energy.md has the method, what each domain includes, and how to enable each):
- CPU package and DRAM: RAPL through the Linux kernel's powercap files (`intel-rapl:N/energy_uj`,
  microjoules, wrapping at `max_energy_range_uj`); AMD Zen packages appear there too.
- NVIDIA GPU: NVML's total-energy counter (nvidia-ml-py; millijoules since the driver loaded, Volta
  and newer GPUs).
- Apple silicon: IOReport's energy model through zeus-apple-silicon (millijoules; Apple's own
  estimates, and labelled so).

No counter, no number: without a readable counter the meter says `energy: not measured — <why, and
the fix>` and every reading is None; nothing is estimated from a TDP. A script wraps each phase:

    meter = energy.EnergyMeter.detect(device)
    meter.measure_idle(3.0)              # once, before the first phase
    with meter.window() as w:
        run_phase()
    w.reading                            # EnergyReading, or None when there is no counter
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
DEFAULT_IDLE_SECONDS = 3.0
# While a window is open the wrapping (RAPL) counters are also read by a background thread, often
# enough that none can wrap twice between two reads even at MAX_ZONE_WATTS:
# poll period (s) = max_energy_range (J) / MAX_ZONE_WATTS (W) / 2, kept within [MIN, MAX]_POLL_SECONDS.
MAX_ZONE_WATTS = 1000.0
MIN_POLL_SECONDS = 0.05
MAX_POLL_SECONDS = 60.0
NOT_MEASURED = "not measured"


# ----------------------------------------------------------------------------------------------
# What a window measured
# ----------------------------------------------------------------------------------------------

@dataclass
class EnergyReading:
    """Energy of one window: joules per domain ("cpu_package", "dram", "gpu"; on Apple silicon
    "cpu", "gpu", "dram", "ane") over `seconds`, and the idle power measured before the first phase."""

    seconds: float
    joules: dict[str, float]
    idle_watts: dict[str, float] | None
    counter: str  # e.g. "RAPL powercap (intel-rapl:0 package-0, intel-rapl:0:0 dram)"
    resolution_j: float | None  # the coarsest step of the counters' interfaces (µJ for RAPL, mJ for NVML)

    @property
    def total_j(self) -> float:
        return sum(self.joules.values())

    @property
    def above_idle_joules(self) -> dict[str, float] | None:
        """Per domain: joules − idle W × seconds (None without an idle baseline for every domain).
        Noise can make a domain slightly negative when the phase barely used it."""
        if self.idle_watts is None or not set(self.joules) <= set(self.idle_watts):
            return None
        return {d: j - self.idle_watts[d] * self.seconds for d, j in self.joules.items()}

    @property
    def above_idle_j(self) -> float | None:
        above = self.above_idle_joules
        return None if above is None else sum(above.values())

    @property
    def avg_watts(self) -> float | None:
        return self.total_j / self.seconds if self.seconds > 0 else None

    def per_unit(self, units: float, unit: str = "token") -> dict:
        """J per unit and units per J, total and above idle (None where undefined: no baseline, or
        no energy to divide by in a window shorter than the counter's update)."""
        if units <= 0:
            raise ValueError(f"per_unit needs a positive count of {unit}s, got {units}")
        total, above = self.total_j, self.above_idle_j
        return {
            "unit": unit, "units": units,
            "j_per_unit": total / units,
            "units_per_j": units / total if total > 0 else None,
            "above_idle_j_per_unit": None if above is None else above / units,
            "units_per_j_above_idle": units / above if above is not None and above > 0 else None,
        }

    def as_dict(self) -> dict:
        return {**asdict(self), "total_j": self.total_j, "above_idle_j": self.above_idle_j,
                "above_idle_joules": self.above_idle_joules, "avg_watts": self.avg_watts}

    @classmethod
    def combine(cls, readings: list["EnergyReading | None"]) -> "EnergyReading | None":
        """Several windows of the same kind of work (a phase's repetitions) as one: joules and seconds
        add up; None when any window has no reading (no counter)."""
        if not readings or any(r is None for r in readings):
            return None
        joules: dict[str, float] = {}
        for r in readings:
            for domain, j in r.joules.items():
                joules[domain] = joules.get(domain, 0.0) + j
        first = readings[0]
        return cls(sum(r.seconds for r in readings), joules, first.idle_watts, first.counter, first.resolution_j)

    def summary(self, units: float, unit: str = "token") -> dict:
        """What a result records: the reading and its per-unit figures."""
        return {**self.as_dict(), "per_unit": self.per_unit(units, unit)}


def per_unit_text(reading: EnergyReading | None, units: float, unit: str = "tok") -> str:
    """'0.412 J/tok' ('0.412 J/tok (0.118 above idle)' once idle is known) for a footer; '' without
    a reading (no counter), without units, or when the counters did not move (a window shorter than
    their update interval: 0 J/tok would claim the work was free)."""
    if reading is None or units <= 0 or reading.total_j <= 0:
        return ""
    figures = reading.per_unit(units, unit)
    text = f"{figures['j_per_unit']:.3g} J/{unit}"
    if figures["above_idle_j_per_unit"] is not None:
        text += f" ({figures['above_idle_j_per_unit']:.3g} above idle)"
    return text


@dataclass
class Window:
    """What `EnergyMeter.window()` yields; `reading` is filled when the window closes."""

    reading: EnergyReading | None = None


# ----------------------------------------------------------------------------------------------
# Counter sources: each reads cumulative joules per domain that only grow (wrap-around undone)
# ----------------------------------------------------------------------------------------------

class Source(Protocol):
    label: str  # long, for records: "NVML total energy (GPU 0: NVIDIA H200)"
    short: str  # for the status line: "NVML GPU 0"
    resolution_j: float
    poll_seconds: float | None  # how often it must be read while a window is open (None: never wraps)

    def read(self) -> dict[str, float]: ...


def read_int(path: Path) -> int:
    return int(path.read_text().strip())


class RaplZone:
    """One powercap zone (intel-rapl:0 'package-0', intel-rapl:0:0 'dram'): a microjoule counter that
    wraps to 0 after `max_energy_range_uj`; `read_uj` returns the running total with wraps undone."""

    def __init__(self, path: Path, domain: str, name: str):
        self.path, self.domain, self.name = path, domain, name
        self.range_uj = read_int(path / "max_energy_range_uj")
        self.last_uj = read_int(path / "energy_uj")  # PermissionError here: root-only (CVE-2020-8694)
        self.total_uj = 0

    def read_uj(self) -> int:
        now = read_int(self.path / "energy_uj")
        step = now - self.last_uj
        if step < 0:  # wrapped once: the poller reads often enough that it cannot wrap twice
            step += self.range_uj
        self.last_uj = now
        self.total_uj += step
        return self.total_uj


class RaplSource:
    """CPU packages and their DRAM subzones. `core`/`uncore` subzones lie inside the package figure
    and `psys` (the whole platform, on laptops) contains it, so neither is added."""

    resolution_j = 1e-6  # sysfs speaks µJ; the hardware's own unit (MSR_RAPL_POWER_UNIT) is coarser

    def __init__(self, zones: list[RaplZone]):
        self.zones = zones
        self.label = "RAPL powercap (" + ", ".join(f"{z.path.name} {z.name}" for z in zones) + ")"
        packages = sum(z.domain == "cpu_package" for z in zones)
        self.short = "RAPL " + ("package" if packages == 1 else f"{packages} packages") + \
            ("+dram" if any(z.domain == "dram" for z in zones) else "")
        range_j = min(z.range_uj for z in zones) / 1e6
        self.poll_seconds = min(max(range_j / MAX_ZONE_WATTS / 2, MIN_POLL_SECONDS), MAX_POLL_SECONDS)

    def read(self) -> dict[str, float]:
        joules: dict[str, float] = {}
        for zone in self.zones:
            joules[zone.domain] = joules.get(zone.domain, 0.0) + zone.read_uj() / 1e6
        return joules


class NvmlSource:
    """One NVIDIA GPU's board energy from NVML (mJ since the driver loaded; 64-bit, never wraps)."""

    resolution_j = 1e-3
    poll_seconds = None

    def __init__(self, pynvml, handle, index: int, name: str):
        self.pynvml, self.handle = pynvml, handle
        self.label = f"NVML total energy (GPU {index}: {name})"
        self.short = f"NVML GPU {index}"

    def read(self) -> dict[str, float]:
        return {"gpu": self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3}


class AppleSource:
    """Apple silicon SoC domains from IOReport's energy model (mJ, cumulative) via zeus-apple-silicon."""

    FIELDS = {"cpu": "cpu_total_mj", "gpu": "gpu_mj", "dram": "dram_mj", "ane": "ane_mj"}
    resolution_j = 1e-3
    poll_seconds = None

    def __init__(self, monitor):
        self.monitor = monitor
        first = monitor.get_cumulative_energy()  # a chip without a domain reports None for it
        self.fields = {d: f for d, f in self.FIELDS.items() if getattr(first, f, None) is not None}
        domains = "+".join(self.fields)
        self.label = f"Apple IOReport energy model via zeus-apple-silicon ({domains}; Apple's estimates)"
        self.short = f"Apple IOReport {domains} (estimates)"

    def read(self) -> dict[str, float]:
        metrics = self.monitor.get_cumulative_energy()
        return {d: getattr(metrics, f) / 1e3 for d, f in self.fields.items()}


# ----------------------------------------------------------------------------------------------
# Finding a counter, or the one-line reason there is none
# ----------------------------------------------------------------------------------------------

def zone_index(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in path.name.split(":")[1:])


def find_rapl(root: Path) -> tuple[RaplSource | None, str]:
    """RAPL zones under a powercap root (the real /sys/class/powercap, or a test's fake tree)."""
    if not root.is_dir():
        return None, (f"no {root}: this kernel exposes no RAPL counters (virtual machines and most "
                      "containers hide them; on bare-metal Linux load the driver: `sudo modprobe intel_rapl_msr`)")
    packages = sorted((p for p in root.glob("intel-rapl:*") if len(zone_index(p)) == 1), key=zone_index)
    zones: list[RaplZone] = []
    try:
        for package in packages:
            name = package.joinpath("name").read_text().strip()
            if name.startswith("package"):
                zones.append(RaplZone(package, "cpu_package", name))
            for sub in sorted(package.glob(f"{package.name}:*"), key=zone_index):
                if sub.joinpath("name").read_text().strip() == "dram":
                    zones.append(RaplZone(sub, "dram", "dram"))
    except PermissionError as err:
        return None, (f"RAPL counters are readable only by root since CVE-2020-8694 ({err.filename}): "
                      f"`sudo chmod o+r {root}/intel-rapl:*/energy_uj` (until reboot), or the udev rule "
                      "in docs/energy.md")
    except (OSError, ValueError) as err:
        return None, f"cannot read the RAPL counters under {root} ({err})"
    if not any(z.domain == "cpu_package" for z in zones):
        return None, (f"no RAPL package zone under {root} (a CPU without RAPL, or the driver is not "
                      "loaded: `sudo modprobe intel_rapl_msr`)")
    return RaplSource(zones), ""


def nvml_handle(pynvml, cuda_index: int):
    """The NVML handle of torch's cuda:N. NVML numbers GPUs by PCI order and ignores
    CUDA_VISIBLE_DEVICES, so when torch is loaded the GPU is found by its UUID instead."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


def find_nvml(cuda_index: int) -> tuple[NvmlSource | None, str]:
    try:
        import pynvml  # nvidia-ml-py, NVIDIA's own bindings
    except ImportError:
        return None, "nvidia-ml-py is not installed: `pip install nvidia-ml-py`"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return None, f"NVML did not start ({err}): install the NVIDIA driver (`nvidia-smi` must work)"
    try:
        handle = nvml_handle(pynvml, cuda_index)
        name = pynvml.nvmlDeviceGetName(handle)
    except pynvml.NVMLError as err:
        return None, f"NVML cannot open GPU {cuda_index} ({err})"
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except pynvml.NVMLError_NotSupported:
        return None, (f"GPU {cuda_index} ({name}) has no NVML total-energy counter (Volta or newer has one); "
                      "power samples are not integrated in its place")
    except pynvml.NVMLError as err:
        return None, f"NVML cannot read GPU {cuda_index}'s energy counter ({err})"
    return NvmlSource(pynvml, handle, cuda_index, name), ""


def find_apple() -> tuple[AppleSource | None, str]:
    if platform.machine() != "arm64":
        return None, "an Intel Mac has no energy counter this meter can read"
    try:
        helper = importlib.import_module("zeus_apple_silicon")
    except ImportError:
        return None, "Apple silicon's counters need the helper: `pip install zeus-apple-silicon`"
    try:
        return AppleSource(helper.AppleEnergyMonitor()), ""
    except RuntimeError as err:
        return None, f"zeus-apple-silicon could not open IOReport ({err})"


def find_host(powercap_root: str | Path) -> tuple[Source | None, str]:
    """The CPU-side counter of this operating system: RAPL on Linux, IOReport on macOS."""
    if sys.platform == "darwin":
        return find_apple()
    if sys.platform.startswith("linux"):
        return find_rapl(Path(powercap_root))
    return None, f"no energy counter this meter can read on {sys.platform} (Linux RAPL, NVML, Apple silicon)"


# ----------------------------------------------------------------------------------------------
# The meter
# ----------------------------------------------------------------------------------------------

class EnergyMeter:
    """Joules per domain over windows of work (nestable, reusable, thread-safe), plus an idle
    baseline. Build it with `detect`; without a counter `available` is False and `reason` says why."""

    def __init__(self, sources: list[Source], reason: str = "", missing: dict[str, str] | None = None,
                 device: str = "cpu", sync: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep):
        self.sources = sources
        self.available = bool(sources)
        self.reason = "" if self.available else f"{NOT_MEASURED} — {reason}"
        self.missing = missing or {}  # domain group -> why it is not in the figures (e.g. "cpu" on a GPU run)
        self.device = device
        self.idle_watts: dict[str, float] | None = None
        self.idle_seconds: float | None = None
        self._sync = sync or (lambda: None)
        self._clock, self._sleep = clock, sleep
        self._lock = threading.Lock()
        self._open_windows = 0
        self._stop_polling: threading.Event | None = None
        polls = [s.poll_seconds for s in sources if s.poll_seconds]
        self._poll_seconds = min(polls) if polls else None

    @classmethod
    def detect(cls, device="cpu", powercap_root: str | Path = DEFAULT_POWERCAP_ROOT, **kwargs) -> "EnergyMeter":
        """The counters for a run on `device` ("cpu", "cuda", "cuda:N", "mps", or a torch.device):
        a GPU run needs NVML and adds RAPL where readable; a CPU or MPS run needs the host counter.
        `powercap_root` points RAPL at another tree (tests); kwargs go to the constructor (clock, sleep)."""
        device = str(device)
        kind, _, index = device.partition(":")
        host, host_why = find_host(powercap_root)
        if kind == "cuda":
            gpu, gpu_why = find_nvml(int(index or 0))
            if gpu is None:
                return cls([], reason=f"GPU: {gpu_why}", device=device, **kwargs)
            torch = sys.modules.get("torch")
            sync = (lambda: torch.cuda.synchronize(device)) if torch is not None and torch.cuda.is_available() else None
            return cls([gpu] + ([host] if host else []), missing={} if host else {"cpu": host_why},
                       device=device, sync=sync, **kwargs)
        if kind not in ("cpu", "mps"):
            return cls([], reason=f"no energy counter for device {device!r}", device=device, **kwargs)
        return cls([host] if host else [], reason=host_why, device=device, **kwargs)

    # -- reading -----------------------------------------------------------------------------

    def _snapshot(self) -> tuple[float, dict[str, float]]:
        """(clock seconds, cumulative joules per domain); the caller holds the lock."""
        now = self._clock()
        joules: dict[str, float] = {}
        for source in self.sources:
            for domain, j in source.read().items():
                joules[domain] = joules.get(domain, 0.0) + j
        return now, joules

    def _poll(self, stop: threading.Event) -> None:
        while not stop.wait(self._poll_seconds):
            with self._lock:
                self._snapshot()

    def _open(self) -> tuple[float, dict[str, float]]:
        with self._lock:
            self._open_windows += 1
            if self._poll_seconds and self._stop_polling is None:
                self._stop_polling = threading.Event()
                threading.Thread(target=self._poll, args=(self._stop_polling,), daemon=True,
                                 name="energy-poll").start()
            return self._snapshot()

    def _close(self) -> tuple[float, dict[str, float]]:
        with self._lock:
            try:
                return self._snapshot()
            finally:  # even when a counter fails (a lost GPU), the window is closed
                self._open_windows -= 1
                if self._open_windows == 0 and self._stop_polling is not None:
                    self._stop_polling.set()  # the thread wakes and ends at once; no join keeps close cheap
                    self._stop_polling = None

    @contextlib.contextmanager
    def window(self) -> Iterator[Window]:
        """Measure the enclosed work: `with meter.window() as w: ...` then `w.reading` (None without a
        counter). The device is synchronised at both ends so queued GPU work lands in its window."""
        handle = Window()
        if not self.available:
            yield handle
            return
        self._sync()
        start_t, start_j = self._open()
        try:
            yield handle
        finally:
            self._sync()
            end_t, end_j = self._close()
            handle.reading = EnergyReading(
                seconds=end_t - start_t, joules={d: end_j[d] - start_j[d] for d in start_j},
                idle_watts=dict(self.idle_watts) if self.idle_watts is not None else None,
                counter=self.counter, resolution_j=self.resolution_j)

    def measure_idle(self, seconds: float = DEFAULT_IDLE_SECONDS) -> dict[str, float]:
        """Idle power per domain (W) over `seconds` of sleep, kept for every later reading's
        above-idle figures; run it before the first phase, with the model loaded and nothing running.
        Returns {} at once without a counter."""
        if not seconds > 0:
            raise ValueError(f"idle baseline needs a positive duration, got {seconds} s")
        if not self.available:
            return {}
        with self.window() as w:
            self._sleep(seconds)
        self.idle_seconds = w.reading.seconds
        self.idle_watts = {d: j / w.reading.seconds for d, j in w.reading.joules.items()}
        return dict(self.idle_watts)

    # -- describing ----------------------------------------------------------------------------

    @property
    def counter(self) -> str:
        return "; ".join(s.label for s in self.sources)

    @property
    def resolution_j(self) -> float | None:
        return max((s.resolution_j for s in self.sources), default=None)

    def status_line(self) -> str:
        """'energy: RAPL package+dram, idle 12.3 W' or 'energy: not measured — <why and the fix>'."""
        if not self.available:
            return f"energy: {self.reason}"
        line = "energy: " + " + ".join(s.short for s in self.sources)
        line += f", idle {sum(self.idle_watts.values()):.1f} W" if self.idle_watts else ", idle not measured"
        for group, why in self.missing.items():
            line += f" ({group} {NOT_MEASURED} — {why})"
        return line

    def describe(self) -> dict:
        """For a result's environment block."""
        return {"available": self.available, "device": self.device, "counter": self.counter or None,
                "resolution_j": self.resolution_j, "idle_watts": self.idle_watts,
                "idle_seconds": self.idle_seconds, "reason": self.reason or None, "missing": self.missing}


# ----------------------------------------------------------------------------------------------
# A check a person runs: which counter, and the idle power
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Which energy counters this machine has (or why none), "
                                                 "and its idle power.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                        help="also measure idle power over this many seconds (default: 0, skip)")
    parser.add_argument("--powercap-root", default=DEFAULT_POWERCAP_ROOT,
                        help=f"where the RAPL zones are (default: {DEFAULT_POWERCAP_ROOT})")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.idle < 0 or math.isnan(args.idle):
        parser.error(f"--idle must be 0 or more seconds, got {args.idle}")
    meter = EnergyMeter.detect(args.device, args.powercap_root)
    if args.idle > 0:
        meter.measure_idle(args.idle)
    print(meter.status_line())
    if meter.available:
        print(json.dumps(meter.describe(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
