from gdt_tune.datasets.cgdb_instruct import (
    CGDBInstructDataset,
    PatientDataset,
    cgdb_instruct_dataset,
    dropped_by_cap,
    refuse_shared_patients,
)

__all__ = ["CGDBInstructDataset", "PatientDataset", "cgdb_instruct_dataset", "dropped_by_cap", "refuse_shared_patients"]
