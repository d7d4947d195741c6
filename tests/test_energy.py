"""energy.py: joules per domain from RAPL (a fake powercap tree), NVML (a fake pynvml) and Apple's
IOReport (a fake zeus_apple_silicon), the idle baseline, per-token arithmetic, and the "not measured"
line on machines without a readable counter (this one among them)."""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import pytest

import energy

RANGE_UJ = 262_143_328_850  # a package-sized range; the wrap test starts 1 J below it


class FakeClock:
    """clock() and sleep() for the meter: sleeping advances the clock and runs `on_sleep(seconds)`,
    which a test uses to advance the counters as if the machine drew power meanwhile."""

    def __init__(self):
        self.now = 100.0
        self.on_sleep = lambda seconds: None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep(seconds)


def make_zone(path: Path, name: str, energy_uj: int, range_uj: int = RANGE_UJ) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(f"{name}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return path


def make_powercap(root: Path, packages: int = 1, sub: str | None = "dram", range_uj: int = RANGE_UJ) -> Path:
    """The kernel's layout: intel-rapl:N ('package-N') with subzones intel-rapl:N:M inside it."""
    for n in range(packages):
        package = make_zone(root / f"intel-rapl:{n}", f"package-{n}", 1_000_000 * (n + 1), range_uj)
        if sub:
            make_zone(package / f"intel-rapl:{n}:0", sub, 500_000, range_uj)
    return root


def add_uj(zone: Path, microjoules: int) -> None:
    """Advance a zone's counter, wrapping at its max_energy_range_uj as the hardware does."""
    limit = int((zone / "max_energy_range_uj").read_text())
    now = int((zone / "energy_uj").read_text())
    (zone / "energy_uj").write_text(f"{(now + microjoules) % limit}\n")


@pytest.fixture
def fake_clock():
    return FakeClock()


@pytest.fixture
def rapl(tmp_path):
    return make_powercap(tmp_path / "powercap")


def rapl_meter(root: Path, clock: FakeClock, device: str = "cpu") -> energy.EnergyMeter:
    return energy.EnergyMeter.detect(device, powercap_root=root, clock=clock.clock, sleep=clock.sleep)


# ----------------------------------------------------------------------------------------------
# RAPL
# ----------------------------------------------------------------------------------------------

def test_window_reads_package_and_dram_joules(rapl, fake_clock):
    meter = rapl_meter(rapl, fake_clock)
    assert meter.available and meter.reason == ""
    with meter.window() as w:
        assert w.reading is None  # filled on exit
        add_uj(rapl / "intel-rapl:0", 5_000_000)
        add_uj(rapl / "intel-rapl:0" / "intel-rapl:0:0", 1_250_000)
        fake_clock.now += 2.0
    r = w.reading
    assert r.seconds == 2.0
    assert r.joules == pytest.approx({"cpu_package": 5.0, "dram": 1.25})
    assert r.total_j == pytest.approx(6.25) and r.avg_watts == pytest.approx(3.125)
    assert r.counter == "RAPL powercap (intel-rapl:0 package-0, intel-rapl:0:0 dram)"
    assert r.resolution_j == 1e-6
    assert r.idle_watts is None and r.above_idle_j is None
    assert meter.status_line() == "energy: RAPL package+dram, idle not measured"


def test_core_subzone_lies_inside_the_package_and_is_not_added(tmp_path, fake_clock):
    root = make_powercap(tmp_path / "powercap", sub="core")
    meter = rapl_meter(root, fake_clock)
    with meter.window() as w:
        add_uj(root / "intel-rapl:0", 3_000_000)
        add_uj(root / "intel-rapl:0" / "intel-rapl:0:0", 2_000_000)  # core: part of the 3 J above
        fake_clock.now += 1.0
    assert w.reading.joules == pytest.approx({"cpu_package": 3.0})
    assert meter.status_line().startswith("energy: RAPL package,")


def test_two_packages_add_up_per_domain(tmp_path, fake_clock):
    root = make_powercap(tmp_path / "powercap", packages=2)
    meter = rapl_meter(root, fake_clock)
    with meter.window() as w:
        add_uj(root / "intel-rapl:0", 4_000_000)
        add_uj(root / "intel-rapl:1", 6_000_000)
        add_uj(root / "intel-rapl:1" / "intel-rapl:1:0", 1_000_000)
        fake_clock.now += 1.0
    assert w.reading.joules == pytest.approx({"cpu_package": 10.0, "dram": 1.0})
    assert "intel-rapl:1 package-1" in w.reading.counter
    assert meter.status_line().startswith("energy: RAPL 2 packages+dram")


def test_counter_wrapping_past_max_energy_range_is_undone(tmp_path, fake_clock):
    root = make_powercap(tmp_path / "powercap")
    package = root / "intel-rapl:0"
    (package / "energy_uj").write_text(f"{RANGE_UJ - 1_000_000}\n")  # 1 J before the wrap
    meter = rapl_meter(root, fake_clock)
    with meter.window() as w:
        add_uj(package, 3_000_000)  # wraps: the file now reads 2 J
        fake_clock.now += 1.0
    assert int((package / "energy_uj").read_text()) == 2_000_000
    assert w.reading.joules["cpu_package"] == pytest.approx(3.0)


def test_poller_catches_a_wrap_that_a_start_and_stop_read_alone_would_miss(tmp_path):
    # 10 J range: the meter polls every MIN_POLL_SECONDS; 1.5 ranges in one window is two wraps
    root = make_powercap(tmp_path / "powercap", sub=None, range_uj=10_000_000)
    package = root / "intel-rapl:0"
    meter = energy.EnergyMeter.detect("cpu", powercap_root=root)
    zone = meter.sources[0].zones[0]
    with meter.window() as w:
        add_uj(package, 7_500_000)
        seen = int((package / "energy_uj").read_text())
        deadline = time.monotonic() + 10
        while zone.last_uj != seen and time.monotonic() < deadline:  # the background read
            time.sleep(0.01)
        assert zone.last_uj == seen, "the poller did not read the counter while the window was open"
        add_uj(package, 7_500_000)
    assert w.reading.joules["cpu_package"] == pytest.approx(15.0)
    assert meter._stop_polling is None  # no poller is left running once the last window closes


def test_windows_nest_and_can_be_reused(rapl, fake_clock):
    meter = rapl_meter(rapl, fake_clock)
    package = rapl / "intel-rapl:0"
    with meter.window() as outer:
        add_uj(package, 1_000_000)
        with meter.window() as inner:
            add_uj(package, 2_000_000)
            fake_clock.now += 1.0
        add_uj(package, 4_000_000)
        fake_clock.now += 1.0
    with meter.window() as again:
        add_uj(package, 8_000_000)
    assert inner.reading.joules["cpu_package"] == pytest.approx(2.0) and inner.reading.seconds == 1.0
    assert outer.reading.joules["cpu_package"] == pytest.approx(7.0) and outer.reading.seconds == 2.0
    assert again.reading.joules["cpu_package"] == pytest.approx(8.0)


def test_a_window_left_by_an_exception_still_has_its_reading(rapl, fake_clock):
    meter = rapl_meter(rapl, fake_clock)
    with pytest.raises(KeyboardInterrupt), meter.window() as w:
        add_uj(rapl / "intel-rapl:0", 2_000_000)
        raise KeyboardInterrupt
    assert w.reading.joules["cpu_package"] == pytest.approx(2.0)


def test_idle_baseline_and_above_idle_energy(rapl, fake_clock):
    package, dram = rapl / "intel-rapl:0", rapl / "intel-rapl:0" / "intel-rapl:0:0"

    def idle_draw(seconds):  # 10 W package, 2 W DRAM while the meter sleeps
        add_uj(package, round(10e6 * seconds))
        add_uj(dram, round(2e6 * seconds))

    fake_clock.on_sleep = idle_draw
    meter = rapl_meter(rapl, fake_clock)
    assert meter.measure_idle(3.0) == pytest.approx({"cpu_package": 10.0, "dram": 2.0})
    assert meter.idle_seconds == 3.0
    assert meter.status_line() == "energy: RAPL package+dram, idle 12.0 W"
    with meter.window() as w:  # a 2 s phase: 50 J package, 5 J DRAM
        add_uj(package, 50_000_000)
        add_uj(dram, 5_000_000)
        fake_clock.now += 2.0
    r = w.reading
    assert r.idle_watts == pytest.approx({"cpu_package": 10.0, "dram": 2.0})
    assert r.total_j == pytest.approx(55.0)
    assert r.above_idle_joules == pytest.approx({"cpu_package": 30.0, "dram": 1.0})  # 50 − 10×2, 5 − 2×2
    assert r.above_idle_j == pytest.approx(31.0)
    assert meter.describe()["idle_watts"] == pytest.approx({"cpu_package": 10.0, "dram": 2.0})


def test_idle_rejects_a_non_positive_duration(rapl, fake_clock):
    meter = rapl_meter(rapl, fake_clock)
    with pytest.raises(ValueError, match="positive duration"):
        meter.measure_idle(0)


def test_rapl_readable_only_by_root_says_so_and_how_to_fix(rapl, fake_clock, monkeypatch):
    energy_file = rapl / "intel-rapl:0" / "energy_uj"
    energy_file.chmod(0o400)
    if os.geteuid() == 0:  # root reads a 0400 file anyway: refuse as the kernel does for other users
        real_read_text = Path.read_text

        def refuse(path, *args, **kwargs):
            if path.name == "energy_uj":
                raise PermissionError(13, "Permission denied", str(path))
            return real_read_text(path, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", refuse)
    meter = rapl_meter(rapl, fake_clock)
    assert not meter.available
    assert "readable only by root" in meter.reason and "CVE-2020-8694" in meter.reason
    assert f"sudo chmod o+r {rapl}/intel-rapl:*/energy_uj" in meter.reason
    assert meter.status_line().startswith("energy: not measured — RAPL counters are readable only by root")


def test_a_powercap_tree_without_rapl_zones_is_not_measured(tmp_path, fake_clock):
    (tmp_path / "powercap").mkdir()
    meter = rapl_meter(tmp_path / "powercap", fake_clock)
    assert not meter.available and "no RAPL package zone" in meter.reason


# ----------------------------------------------------------------------------------------------
# No counter, no number
# ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RAPL's powercap files are Linux's")
def test_this_machine_without_powercap_is_not_measured(fake_clock):
    root = Path(energy.DEFAULT_POWERCAP_ROOT)
    if root.exists():
        pytest.skip(f"{root} exists on this machine; the fake trees above cover reading it")
    meter = energy.EnergyMeter.detect("cpu", clock=fake_clock.clock, sleep=fake_clock.sleep)
    assert not meter.available
    assert meter.reason.startswith("not measured — no /sys/class/powercap")
    assert "modprobe intel_rapl_msr" in meter.reason
    assert meter.status_line() == f"energy: {meter.reason}" and "\n" not in meter.status_line()
    assert meter.measure_idle(3.0) == {} and fake_clock.now == 100.0  # no pointless wait
    with meter.window() as w:
        pass
    assert w.reading is None
    assert energy.per_unit_text(w.reading, 100) == ""
    assert meter.describe() == {"available": False, "device": "cpu", "counter": None, "resolution_j": None,
                                "idle_watts": None, "idle_seconds": None, "reason": meter.reason,
                                "missing": {}}


def test_this_machine_cuda_run_names_the_missing_nvidia_driver():
    meter = energy.EnergyMeter.detect("cuda")
    if meter.available:
        pytest.skip("this machine has a working NVML")
    assert meter.reason.startswith("not measured — GPU: ")
    assert "NVIDIA driver" in meter.reason or "pip install nvidia-ml-py" in meter.reason


def test_an_unknown_device_is_not_measured():
    meter = energy.EnergyMeter.detect("xpu:0")
    assert not meter.available and "no energy counter for device 'xpu:0'" in meter.reason


# ----------------------------------------------------------------------------------------------
# Per-token arithmetic
# ----------------------------------------------------------------------------------------------

def test_per_token_figures_total_and_above_idle():
    r = energy.EnergyReading(seconds=4.0, joules={"gpu": 40.0, "cpu_package": 10.0},
                             idle_watts={"gpu": 5.0, "cpu_package": 1.0},
                             counter="test", resolution_j=1e-3)
    assert r.total_j == 50.0 and r.avg_watts == 12.5
    assert r.above_idle_j == pytest.approx(26.0)  # 50 − (5 + 1) W × 4 s
    figures = r.per_unit(100, "token")
    assert figures == pytest.approx({"unit": "token", "units": 100, "j_per_unit": 0.5, "units_per_j": 2.0,
                                     "above_idle_j_per_unit": 0.26, "units_per_j_above_idle": 100 / 26})
    assert energy.per_unit_text(r, 100) == "0.5 J/tok (0.26 above idle)"
    with pytest.raises(ValueError, match="positive count of tokens"):
        r.per_unit(0)
    record = json.loads(json.dumps(r.as_dict()))
    assert record["total_j"] == 50.0 and record["above_idle_joules"] == pytest.approx({"gpu": 20.0,
                                                                                      "cpu_package": 6.0})


def test_per_token_without_baseline_or_energy_leaves_those_figures_empty():
    r = energy.EnergyReading(seconds=0.01, joules={"gpu": 0.0}, idle_watts=None, counter="test",
                             resolution_j=1e-3)
    figures = r.per_unit(3)
    assert figures["j_per_unit"] == 0.0 and figures["units_per_j"] is None
    assert figures["above_idle_j_per_unit"] is None and figures["units_per_j_above_idle"] is None
    assert energy.per_unit_text(r, 3) == ""  # the counter did not move: no figure rather than "0 J/tok"


# ----------------------------------------------------------------------------------------------
# NVML (a fake pynvml: total energy in mJ that the test advances)
# ----------------------------------------------------------------------------------------------

def fake_pynvml(mj: dict, supported: bool = True, init_error: str | None = None) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def init():
        if init_error:
            raise NVMLError(init_error)

    def total_energy(handle):
        if not supported:
            raise NVMLError_NotSupported("Not Supported")
        return mj[handle]

    mod.NVMLError, mod.NVMLError_NotSupported = NVMLError, NVMLError_NotSupported
    mod.nvmlInit = init
    mod.nvmlDeviceGetHandleByIndex = lambda index: index
    mod.nvmlDeviceGetName = lambda handle: f"Fake GPU {handle}"
    mod.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return mod


def test_cuda_run_reads_nvml_gpu_energy_and_rapl(rapl, fake_clock, monkeypatch):
    mj = {0: 7_000_000, 1: 9_000_000}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(mj))
    meter = rapl_meter(rapl, fake_clock, device="cuda:1")
    assert meter.available
    with meter.window() as w:
        mj[1] += 12_345  # mJ
        mj[0] += 99_999  # another GPU: not this run's
        add_uj(rapl / "intel-rapl:0", 2_000_000)
        fake_clock.now += 0.5
    assert w.reading.joules == pytest.approx({"gpu": 12.345, "cpu_package": 2.0, "dram": 0.0})
    assert w.reading.counter.startswith("NVML total energy (GPU 1: Fake GPU 1); RAPL powercap (")
    assert w.reading.resolution_j == 1e-3
    assert meter.status_line() == "energy: NVML GPU 1 + RAPL package+dram, idle not measured"


def test_cuda_run_without_rapl_measures_the_gpu_and_says_the_cpu_is_missing(tmp_path, fake_clock, monkeypatch):
    mj = {0: 0}
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(mj))
    meter = rapl_meter(tmp_path / "no-powercap", fake_clock, device="cuda")
    with meter.window() as w:
        mj[0] += 500
    assert w.reading.joules == {"gpu": 0.5}
    assert "no-powercap" in meter.missing["cpu"]
    assert meter.status_line().startswith("energy: NVML GPU 0, idle not measured (cpu not measured — no ")


def test_gpu_without_an_energy_counter_is_not_measured(rapl, fake_clock, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({0: 0}, supported=False))
    meter = rapl_meter(rapl, fake_clock, device="cuda")
    assert not meter.available  # RAPL alone would pass the CPU's share off as the run's energy
    assert "has no NVML total-energy counter (Volta or newer has one)" in meter.reason
    assert "not integrated" in meter.reason


def test_no_nvidia_driver_is_not_measured(rapl, fake_clock, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml({}, init_error="Driver Not Loaded"))
    meter = rapl_meter(rapl, fake_clock, device="cuda")
    assert meter.reason == ("not measured — GPU: NVML did not start (Driver Not Loaded): install the "
                            "NVIDIA driver (`nvidia-smi` must work)")


def test_without_nvidia_ml_py_the_fix_is_to_install_it(rapl, fake_clock, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    meter = rapl_meter(rapl, fake_clock, device="cuda")
    assert meter.reason == "not measured — GPU: nvidia-ml-py is not installed: `pip install nvidia-ml-py`"


# ----------------------------------------------------------------------------------------------
# Apple silicon (a fake zeus_apple_silicon)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def on_apple_silicon(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(energy.platform, "machine", lambda: "arm64")


def test_apple_silicon_reads_ioreport_domains(on_apple_silicon, fake_clock, monkeypatch):
    totals = {"cpu_total_mj": 1000, "gpu_mj": 2000, "dram_mj": None, "ane_mj": 0}

    class AppleEnergyMonitor:
        def get_cumulative_energy(self):
            return types.SimpleNamespace(**totals)

    monkeypatch.setitem(sys.modules, "zeus_apple_silicon", types.SimpleNamespace(AppleEnergyMonitor=AppleEnergyMonitor))
    meter = energy.EnergyMeter.detect("mps", clock=fake_clock.clock, sleep=fake_clock.sleep)
    with meter.window() as w:
        totals["cpu_total_mj"] += 1500
        totals["gpu_mj"] += 4000
        fake_clock.now += 1.0
    assert w.reading.joules == {"cpu": 1.5, "gpu": 4.0, "ane": 0.0}  # no DRAM channel on this chip
    assert "estimates" in w.reading.counter
    assert meter.status_line() == "energy: Apple IOReport cpu+gpu+ane (estimates), idle not measured"


def test_apple_silicon_without_the_helper_says_how_to_install_it(on_apple_silicon, monkeypatch):
    monkeypatch.setitem(sys.modules, "zeus_apple_silicon", None)
    meter = energy.EnergyMeter.detect("mps")
    assert meter.status_line() == ("energy: not measured — Apple silicon's counters need the helper: "
                                   "`pip install zeus-apple-silicon`")


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------

def test_cli_prints_the_counter_and_its_description(rapl, capsys):
    assert energy.main(["--powercap-root", str(rapl)]) == 0
    out = capsys.readouterr().out
    first, _, rest = out.partition("\n")
    assert first == "energy: RAPL package+dram, idle not measured"
    assert json.loads(rest)["counter"] == "RAPL powercap (intel-rapl:0 package-0, intel-rapl:0:0 dram)"


def test_cli_without_a_counter_prints_one_line(tmp_path, capsys):
    assert energy.main(["--powercap-root", str(tmp_path / "none"), "--idle", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("energy: not measured — no ") and out.count("\n") == 1


def test_cli_rejects_a_negative_idle(capsys):
    with pytest.raises(SystemExit) as exc:
        energy.main(["--idle", "-1"])
    assert exc.value.code == 2 and "--idle must be 0 or more seconds" in capsys.readouterr().err
