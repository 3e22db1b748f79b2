"""The config's ``metric_logger`` on rank 0, whose writes a full disk refuses in one line::

    metric_logger:
      _component_: torchtune.training.metric_logging.DiskLogger
      log_dir: ${output_dir}/logs

    logs = MetricLog(config.instantiate(cfg.metric_logger), cfg.metric_logger.get("log_dir"))
    logs.log_dict({"loss": 1.2}, step=5)   # a full disk: OneLineError naming it, not a 25-line traceback
    logs.close()

After a refused write the logger is closed at once, quietly (its buffer cannot be written either),
so neither ``close()`` nor the logger's ``__del__`` repeats the failure as a traceback.
"""

from __future__ import annotations

from contextlib import suppress

from gdt_tune.runtime.disk import disk_full
from gdt_tune.runtime.errors import OneLineError


class MetricLog:
    """``folder``: where the logger writes (``log_dir``; for wandb its ``dir``)."""

    def __init__(self, logger, folder) -> None:
        self._logger, self.folder = logger, folder

    def log_config(self, cfg) -> None:
        self._write(self._logger.log_config, cfg)

    def log_dict(self, payload: dict, step: int) -> None:
        self._write(self._logger.log_dict, payload, step=step)

    def close(self) -> None:
        if self._logger is not None:
            self._logger.close()

    def _write(self, write, *args, **kwargs) -> None:
        if self._logger is None:
            return
        try:
            write(*args, **kwargs)
        except OSError as e:
            if (full := disk_full(e, self.folder)) is None:
                raise
            logger, self._logger = self._logger, None
            with suppress(OSError):
                logger.close()
            raise OneLineError(f"metric_logger: writing the metric log in {self.folder} failed: {full}; free space "
                               "there (or set metric_logger.log_dir to another disk), then resume with "
                               "resume_from_checkpoint=true (or train again)") from None
