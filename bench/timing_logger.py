"""A metric logger for the benchmarks: one JSON line per ``log_dict`` call with the wall-clock time,
so that step times can be read off any recipe that takes ``metric_logger`` from its config.

    metric_logger:
      _component_: timing_logger.TimingLogger   # with bench/ on PYTHONPATH
      log_dir: /tmp/run/logs
"""

import json
import os
import time


class TimingLogger:
    def __init__(self, log_dir: str, **kwargs):
        os.makedirs(log_dir, exist_ok=True)
        self._f = open(os.path.join(log_dir, "timing.jsonl"), "a")

    def log(self, name, data, step):
        self.log_dict({name: data}, step)

    def log_dict(self, payload, step):
        row = {"step": int(step), "time": time.time()}
        row.update({k: float(v) for k, v in payload.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def log_config(self, config):
        pass

    def close(self):
        self._f.close()
