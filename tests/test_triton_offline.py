"""The Triton kernels compiled for GPUs this machine does not have (scripts/triton_offline_check.py): every
kernel the launchers pick for sm80, sm86 and sm90 must compile, and fit the shared memory a block of that GPU may
have. The interpreter tests check the numerics; this checks what only a GPU compile would otherwise reveal."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.triton
def test_triton_kernels_compile_for_gpus_within_their_shared_memory(tmp_path):
    out = tmp_path / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_offline_check.py"), "--quick",
                          "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert res.returncode == 0 and not data["failures"], "\n".join(data["failures"]) + res.stderr[-2000:]
    kernels = {(r["arch"], r["kernel"]) for r in data["rows"]}
    for arch in (80, 86, 90):  # each op's kernels were compiled for each target, not an empty run
        for k in ("_gn_stats_kernel", "_gn_apply_kernel", "_gn_bwd_sums_kernel", "_attn_fwd", "_attn_bwd_dkdv",
                  "_attn_bwd_dq", "_sampler_step_kernel"):
            assert (arch, k) in kernels, (arch, k)
    assert all(r["registers"] > 0 for r in data["rows"])
