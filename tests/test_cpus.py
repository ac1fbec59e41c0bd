"""usable_cpus counts as loky does, without importing it (45 ms on a first call)."""
import os
import subprocess
import sys

import pytest

from pmap.backends import base


def test_usable_cpus_agrees_with_loky():
    import loky
    assert base.usable_cpus() == loky.cpu_count()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_usable_cpus_follows_affinity():
    code = ("import os; from pmap.backends.base import usable_cpus; "
            "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


def test_usable_cpus_follows_a_cgroup_quota(tmp_path, monkeypatch):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # one and a half CPUs' worth: rounds up to 2
    monkeypatch.setattr(base, "_CGROUP_V2_CPU_MAX", str(cpu_max))
    assert base._cgroup_cpu_quota() == 2
    cpu_max.write_text("max 100000\n")
    assert base._cgroup_cpu_quota() is None


def test_cgroup_v1_quota_when_v2_is_absent(tmp_path, monkeypatch):
    quota, period = tmp_path / "cpu.cfs_quota_us", tmp_path / "cpu.cfs_period_us"
    quota.write_text("50000\n")
    period.write_text("100000\n")
    monkeypatch.setattr(base, "_CGROUP_V2_CPU_MAX", str(tmp_path / "absent"))
    monkeypatch.setattr(base, "_CGROUP_V1_QUOTA", (str(quota), str(period)))
    assert base._cgroup_cpu_quota() == 1
    quota.write_text("-1\n")  # v1's "no limit"
    assert base._cgroup_cpu_quota() is None
