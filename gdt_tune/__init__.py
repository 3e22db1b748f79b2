"""gdt_tune: a torchtune plugin to train GDT-style clinical digital-twin models.

``gdt_tune.prompt(instruction)`` gives the exact prompt a model was trained with (text and ids).
"""

from gdt_tune.prompting import Prompt, prompt

__all__ = ["Prompt", "prompt"]
__version__ = "0.1.0"
