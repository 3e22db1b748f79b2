"""``python -m gdt_tune.cli ...`` = ``gdt-tune ...`` (``gdt-tune evaluate --nproc_per_node N`` runs it under torchrun)."""

import sys

from gdt_tune.cli.main import main

sys.exit(main())
