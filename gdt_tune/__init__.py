"""gdt_tune: a torchtune plugin to train GDT-style clinical digital-twin models.

``gdt_tune.prompt(instruction)`` gives the exact prompt a model was trained with (text and ids).
"""

__all__ = ["Prompt", "prompt"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``prompt`` and ``Prompt`` on first use: ``import gdt_tune.data...`` (the synthetic generator,
    the format) does not load torch and torchtune."""
    if name in __all__:
        from gdt_tune.trained import prompting

        return getattr(prompting, name)
    raise AttributeError(f"module 'gdt_tune' has no attribute {name!r}")
