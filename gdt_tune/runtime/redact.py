"""What may leave the machine: a config or a command line with any ``patient_ids`` list replaced by
its length (a config may list patient ids inline; ids never reach logs, wandb or the terminal)::

    log.info("config:\\n%s", OmegaConf.to_yaml(loggable_config(cfg)))
    sys.argv = redacted_argv(sys.argv)      # wandb records the command line
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def loggable_config(cfg: DictConfig) -> DictConfig:
    """The resolved config with every ``patient_ids`` list replaced by ``<N patient ids, not logged>``."""
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def redact(node):
        if isinstance(node, dict):
            return {k: (f"<{len(v)} patient ids, not logged>" if k == "patient_ids" and isinstance(v, list)
                        else redact(v)) for k, v in node.items()}
        return [redact(v) for v in node] if isinstance(node, list) else node

    return OmegaConf.create(redact(resolved))


def redacted_argv(argv: list[str]) -> list[str]:
    """``argv`` with the value of any ``...patient_ids=...`` override replaced by ``<redacted>``."""
    return [a.split("=", 1)[0] + "=<redacted>" if "=" in a and a.split("=", 1)[0].endswith("patient_ids") else a
            for a in argv]
