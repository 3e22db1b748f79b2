"""Synthetic GDT cohorts and the TwinWeaver text format."""
