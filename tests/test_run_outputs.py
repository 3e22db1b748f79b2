"""What a run writes besides checkpoints: the resolved config to wandb (dict and file, patient-id
lists redacted) and torch profiler traces under ${output_dir}/profiling."""

import json
import re

import pytest
import yaml
from recipe_utils import logged, run_recipe


def test_wandb_config_and_profiler_traces(demo_dir, tmp_path):
    pytest.importorskip("wandb")
    ids = sorted({json.loads(line)["meta"]["patientid"]
                  for line in (demo_dir / "data" / "train" / "part-00000.jsonl").read_text().splitlines()})[:3]
    out = tmp_path / "run"
    run_recipe(demo_dir, out, "max_steps_per_epoch=4", "dataset_val=null", "run_val_every_n_steps=null",
               "save_every_n_steps=null", "metric_logger=torchtune.training.metric_logging.WandBLogger",
               f"metric_logger.log_dir={out / 'logs'}", "metric_logger.project=gdt_tune_test",
               f"dataset.patient_ids=[{','.join(ids)}]",
               "profiler.enabled=true", "profiler.wait_steps=0", "profiler.warmup_steps=1", "profiler.active_steps=2",
               "profiler.num_cycles=1", nproc=1)
    run_dir = next((out / "logs" / "wandb").glob("offline-run-*"))
    # the config dict: offline, wandb keeps it in the run's record file (JSON values inside protobuf)
    record = next(run_dir.glob("*.wandb")).read_bytes()
    for value in (json.dumps(str(out)), json.dumps(f"{demo_dir}/data/train"), '"<3 patient ids, not logged>"'):
        assert value.encode() in record, value
    # no unresolved interpolation (the record is binary: look for "${name}", not for any "${" bytes)
    assert re.search(rb"\$\{[A-Za-z_][A-Za-z0-9_.]*\}", record) is None
    # the config file, resolved, saved beside the run and uploaded with it
    text = (run_dir / "files" / "torchtune_config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["max_steps_per_epoch"] == 4 and saved["output_dir"] == str(out) and "${" not in text
    assert saved["dataset"]["patient_ids"] == "<3 patient ids, not logged>"
    assert (out / "torchtune_config.yaml").read_text() == text
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert not any(i.encode() in path.read_bytes() for i in ids), path
    # profiler: one cycle of wait 0, warmup 1, active 2 steps, exported by torchtune's trace handler
    traces = sorted(p.name for p in (out / "profiling").rglob("*") if p.is_file())
    assert any(name.endswith(".json") or name.endswith(".json.gz") for name in traces), traces
    assert sorted(logged(out, "loss")) == []  # the metrics went to wandb, not to a DiskLogger file
