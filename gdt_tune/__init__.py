"""gdt_tune: a torchtune plugin to train GDT-style clinical digital-twin models."""

__version__ = "0.1.0"
