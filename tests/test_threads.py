"""Thread choice (``--threads``, ``OMP_NUM_THREADS``, automatic) and the CPU share between egomotion jobs."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter.errors import CaffeError
from runner import threads
from runner.threads import CpuShare, ThreadChoice, cgroup_cpu_quota, choose_threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_flag_wins_over_the_environment_which_wins_over_auto(monkeypatch):
    monkeypatch.setattr(threads, "usable_cpus", lambda: 6)
    assert (choose_threads(3, {"OMP_NUM_THREADS": "5"}).count, choose_threads(3, {}).source) == (3, "--threads")
    env = choose_threads(None, {"OMP_NUM_THREADS": "5,2"})  # OpenMP's nested list: the first level
    assert (env.count, env.source) == (5, "OMP_NUM_THREADS")
    auto = choose_threads(None, {"OMP_NUM_THREADS": "  "})
    assert (auto.count, auto.source, auto.usable) == (6, "auto", 6)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "2.5"])
def test_a_bad_omp_num_threads_is_one_line(value):
    with pytest.raises(CaffeError, match=f"OMP_NUM_THREADS='{value}' is not a positive thread count"):
        choose_threads(None, {"OMP_NUM_THREADS": value})


def test_cgroup_v2_quota_is_the_tightest_along_the_path(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/jobs/one\n")
    root = tmp_path / "fs"
    (root / "jobs" / "one").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "jobs" / "cpu.max").write_text("150000 100000\n")
    (root / "jobs" / "one" / "cpu.max").write_text("300000 100000\n")
    assert cgroup_cpu_quota(root, membership) == 1.5
    (root / "jobs" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, membership) == 3.0
    (root / "jobs" / "one" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(root, membership) is None


def test_cgroup_v1_quota(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("4:memory:/a\n3:cpu,cpuacct:/a\n")
    folder = tmp_path / "fs" / "cpu,cpuacct" / "a"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("250000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", membership) == 2.5
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path / "fs", membership) is None


def _auto(usable: int) -> ThreadChoice:
    return ThreadChoice(usable, "auto", usable)


def test_jobs_share_the_cpus_and_take_them_back(tmp_path):
    first = CpuShare(_auto(4), tmp_path)
    assert (torch.get_num_threads(), first.jobs) == (4, 1)
    second = CpuShare(_auto(4), tmp_path)  # sees the first at once
    assert (torch.get_num_threads(), second.jobs) == (2, 2)
    third = CpuShare(_auto(4), tmp_path)
    assert third.choice.count == 1  # 4 // 3
    assert "3 egomotion job(s) share 4 CPU(s)" in first.rebalance(force=True)
    assert first.choice.count == 1
    third.close()
    second.close()
    assert first.rebalance(force=True) == "Intra-op threads 1 -> 4: 1 egomotion job(s) share 4 CPU(s)"
    assert torch.get_num_threads() == 4
    first.close()
    assert not list(tmp_path.iterdir())


def test_a_dead_jobs_file_is_removed_and_other_cpus_do_not_count(tmp_path):
    (tmp_path / "999999.1").write_text("0;auto")  # nobody holds its lock: its job died
    elsewhere = tmp_path / "elsewhere"
    other_cpus = max(threads.affinity()) + 1
    with open(elsewhere, "w") as held:  # a live job on CPUs this process cannot use
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{other_cpus};auto")
        held.flush()
        share = CpuShare(_auto(2), tmp_path)
        assert share.jobs == 1 and share.choice.count == 2
        assert not (tmp_path / "999999.1").exists() and elsewhere.exists()
        share.close()


def test_fixed_counts_keep_theirs_and_the_automatic_jobs_share_the_rest(tmp_path):
    automatic = CpuShare(_auto(8), tmp_path)
    fixed = CpuShare(ThreadChoice(3, "--threads", 8), tmp_path)
    assert fixed.rebalance(force=True) is None and fixed.choice.count == 3  # a fixed count never changes
    assert torch.get_num_threads() == 3
    assert automatic.rebalance(force=True) == ("Intra-op threads 8 -> 5: 1 egomotion job(s) share 8 CPU(s) "
                                               "(3 thread(s) taken by jobs with a fixed count)")
    second = CpuShare(_auto(8), tmp_path)
    assert second.choice.count == 2
    assert second.choice.describe(second.jobs, second.fixed) == (
        "2 intra-op thread(s) (automatic: 8 usable CPU(s), shared by 2 egomotion jobs, 3 taken by jobs with a "
        "fixed count; --threads N fixes the count, and with it the last bits of the results)")
    crowded = CpuShare(ThreadChoice(9, "OMP_NUM_THREADS", 8), tmp_path)
    assert second.rebalance(force=True) and second.choice.count == 1  # never below one
    for share in (crowded, second, fixed, automatic):
        share.close()
    assert not list(tmp_path.iterdir())


def _egomotion(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


LENET = ROOT.parent / "shared" / "reference" / "timing" / "lenet_b64.prototxt"


@pytest.mark.skipif(not LENET.exists(), reason="../shared/reference/timing is not here")
def test_the_log_header_names_the_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["TMPDIR"] = str(tmp_path)  # a jobs folder of its own: no other job of the machine is counted
    out = _egomotion(["time", "--model", str(LENET), "--iterations", "1"], env)
    assert out.returncode == 0, out.stderr
    usable = threads.usable_cpus()
    assert f"Using {usable} intra-op thread(s) (automatic: {usable} usable CPU(s);" in out.stderr
    out = _egomotion(["time", "--model", str(LENET), "--iterations", "1", "--threads", "1"], env)
    assert "Using 1 intra-op thread(s) (--threads)" in out.stderr
    out = _egomotion(["time", "--model", str(LENET), "--iterations", "1"], {**env, "OMP_NUM_THREADS": "1"})
    assert "Using 1 intra-op thread(s) (OMP_NUM_THREADS)" in out.stderr
    out = _egomotion(["time", "--model", str(LENET), "--iterations", "1"], {**env, "OMP_NUM_THREADS": "x"})
    assert out.returncode == 2
    assert out.stderr.strip() == "egomotion time: error: OMP_NUM_THREADS='x' is not a positive thread count"
    assert not list(tmp_path.glob("egomotion-jobs-*/*"))  # every job removed its entry
