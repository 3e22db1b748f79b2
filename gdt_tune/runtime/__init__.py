"""How this process runs, with no knowledge of GDT: process groups and ranks (``coordination``),
CPUs (``cpus``), files written whole (``files``), a full disk named (``disk``), error lines
(``errors``), what may be logged (``redact``) and torch's settings (``torch_env``)."""
