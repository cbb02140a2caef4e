"""Launchers: static rendezvous on a per-job random port; table seeds are integers, never globs."""

from __future__ import annotations

import re

from test_launch import _script


def test_slurm_uses_static_rendezvous_on_a_random_port():
    recipe = "tiny"  # the rendezvous does not depend on the recipe; tiny builds fastest
    proc = _script("train_slurm.sh", CONFIG=recipe, NODES="2", GPUS_PER_NODE="1", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    srun = proc.stdout.strip().splitlines()[-1]
    assert "c10d" not in srun and "--rdzv-endpoint" not in srun
    assert "--rdzv-backend static" in srun and 'PET_NODE_RANK="$SLURM_NODEID"' in srun
    port = int(re.search(r"--master-port (\d+)", srun).group(1))
    assert 20000 <= port < 60000
    bad = _script("train_slurm.sh", CONFIG=recipe, MASTER_PORT="1;touch x", DRY_RUN="1")
    assert bad.returncode == 2 and "MASTER_PORT must be a port number" in bad.stderr


def test_run_table_refuses_non_integer_seeds(tmp_path):
    table = tmp_path / "table"
    table.mkdir()
    (table / "control.yaml").write_text("base: tiny\narm: control\n")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "globbed-file").write_text("")
    for seeds in ("1 *", "1\n../../elsewhere\n"):
        (table / "seeds").write_text(seeds)
        proc = _script("run_table.sh", TABLE=str(table), DRY_RUN="1", CWD=str(tmp_path / "cwd"))
        assert proc.returncode == 2, proc.stdout[-2000:]
        assert "is not a non-negative integer" in proc.stderr
        assert "globbed-file" not in proc.stdout and "would train" not in proc.stdout
