"""The record format, with no training code: finding and reading JSONL files (``records``), the
TwinWeaver text format (``text``), parsing answers (``answers``), the Llama 3 token layout, length
cap and training defaults (``layout``), and synthetic cohorts (``synthetic``)."""
