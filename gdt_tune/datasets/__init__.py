from gdt_tune.datasets.cgdb_instruct import CGDBInstructDataset, cgdb_instruct_dataset

__all__ = ["CGDBInstructDataset", "cgdb_instruct_dataset"]
