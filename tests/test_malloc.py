"""``flowlib.malloc``: importing flowlib lets glibc reuse freed tensor memory, unless told otherwise.

Each case runs in a fresh interpreter, because the setting is process-wide and is applied on import.
The property checked is the one that makes CPU backbones faster: after a warm-up, a typical pass of a
small convolutional network allocates no fresh pages (page faults counted by the kernel; the median of
nine passes, since the heap may still grow once), whereas with glibc's defaults every pass faults in
thousands of pages.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, torch, flowlib.malloc as m
torch.set_num_threads(1)
conv, relu = torch.nn.Conv2d, torch.nn.ReLU
net = torch.nn.Sequential(conv(3, 32, 3, padding=1), relu(), conv(32, 32, 3, padding=1), relu(),
                          conv(32, 8, 3, padding=1))
x = torch.rand(8, 3, 128, 128)  # activations of 16 MiB, above glibc's initial mmap threshold
faults = []
with torch.inference_mode():
    for _ in range(2):
        net(x)
    for _ in range(9):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(m.STATUS)
print(sorted(faults)[4])  # the median pass: a heap that still grows once in a while does not count
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned")


def _probe(**env: str) -> tuple[str, float]:
    ours = ("FLOWLIB_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    clean = {k: v for k, v in os.environ.items() if k not in ours}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**clean, **env},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    status, faults = proc.stdout.strip().splitlines()[-2:]
    return status, float(faults)


@glibc_only
def test_importing_flowlib_stops_the_page_faults_of_repeated_forward_passes():
    status, faults = _probe()
    assert status.startswith("tuned")
    assert faults < 100, f"{faults} page faults in the median forward pass with freed memory reused"


@glibc_only
def test_the_default_can_be_kept_and_then_the_pages_are_fresh_every_call():
    status, faults = _probe(FLOWLIB_MALLOC="default")
    assert status == "default (FLOWLIB_MALLOC=default)"
    assert faults > 1000, f"only {faults} page faults in the median pass: glibc's defaults showed no cost"


@glibc_only
def test_glibc_settings_from_the_environment_are_respected():
    status, _ = _probe(MALLOC_TRIM_THRESHOLD_="1048576")
    assert status == "set by the environment (MALLOC_TRIM_THRESHOLD_)"


def test_a_bad_setting_is_named_with_the_choices():
    proc = subprocess.run([sys.executable, "-c", "import flowlib"], capture_output=True, text=True,
                          env={**os.environ, "FLOWLIB_MALLOC": "fast"}, timeout=120)
    assert proc.returncode != 0
    assert "FLOWLIB_MALLOC='fast' is not one of ('tuned', 'default')" in proc.stderr
