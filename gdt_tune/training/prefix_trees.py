"""Which samples share a trie (``share_prefixes: true``): GDT draws ten split dates per patient and line
of therapy, and every split's instruction repeats the patient's history up to its date, so a patient's
samples share long token prefixes. One pass over every sample's tokens finds, for each sample, its
place among its patient's samples (sorted, as a trie lays them out) and the tokens it shares with the
ones before it (``training.batches.walk_trie``); the pass is cached beside the dataset index and made
by the first rank of each node, as the index is::

    packing: true
    share_prefixes: true      # a patient's samples as one trie, cut where a trie would not fit a row

    trees = node_first(lambda build: prefix_trees(dataset, build=build))
    trees.documents(order, capacity)      # [(samples, tokens)]: the epoch's tries, in the patients' order
    trees.sharing(capacity)               # (tree tokens, separate-sample tokens): data-report's line

A trie's size is its first sample's tokens plus, for each next one, the tokens it does not share (at
most what the trie lays out: a sample shares at least as much with fewer samples before it).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gdt_tune.runtime.cpus import available_cpus
from gdt_tune.runtime.files import atomic_output
from gdt_tune.training.batches import walk_trie

log = logging.getLogger("gdt_tune")
VERSION = 1


@dataclass
class PrefixTrees:
    group: np.ndarray  # the sample's patient (``dataset.patient_groups()``)
    rank: np.ndarray  # its place among its patient's samples, sorted
    shared: np.ndarray  # tokens it shares with the trie of its patient's samples before it
    lengths: np.ndarray  # its tokens

    def documents(self, order, capacity: int) -> list[tuple[tuple[int, ...], int]]:
        """The tries of an epoch: patients in the order their first sample has in ``order`` (a seeded
        shuffle of the samples shuffles the patients), each patient's samples in trie order, cut into
        consecutive runs whose trie fits ``capacity`` tokens (each run repeats its own prefix).
        Returns (samples, tokens) per trie."""
        order = np.asarray(order, dtype=np.int64)
        groups = self.group[order]
        _, first = np.unique(groups, return_index=True)
        patients = groups[np.sort(first)]
        by_group = np.argsort(self.group, kind="stable")
        starts = np.searchsorted(self.group[by_group], patients)
        ends = np.searchsorted(self.group[by_group], patients, side="right")
        docs: list[tuple[tuple[int, ...], int]] = []
        for a, b in zip(starts, ends):
            members = by_group[a:b]
            members = members[np.argsort(self.rank[members])]
            run, size = [int(members[0])], int(self.lengths[members[0]])
            for i in members[1:]:
                more = int(self.lengths[i] - self.shared[i])
                if size + more > capacity:
                    docs.append((tuple(run), size))
                    run, size = [int(i)], int(self.lengths[i])
                else:
                    run.append(int(i))
                    size += more
            docs.append((tuple(run), size))
        return docs

    def sharing(self, capacity: int) -> tuple[int, int]:
        """(tokens the tries of all samples hold, cut to ``capacity``; the samples' own tokens)."""
        docs = self.documents(np.arange(len(self.group)), capacity)
        return sum(size for _, size in docs), int(self.lengths.sum())


def sharing_line(tree_tokens: int, sample_tokens: int) -> str:
    """``prefix sharing: X of Y tokens (Z×)``: what data-report prints and training logs at its end."""
    return (f"prefix sharing: {tree_tokens:,} of {sample_tokens:,} tokens "
            f"({sample_tokens / max(tree_tokens, 1):.2f}×)")


def _walk_group(members: list[int]) -> list[tuple[int, int, int]]:
    """(sample, rank, shared) of one patient's samples (reads them from the pool's dataset)."""
    samples = [_DATASET[i] for i in members]
    return [(members[local], rank, shared) for rank, (local, shared, _, _) in enumerate(walk_trie(samples))]


_DATASET = None


def _start(dataset) -> None:
    global _DATASET
    _DATASET = dataset


def compute(dataset, workers: int | None = None, show_progress: bool = True) -> PrefixTrees:
    """The pass over every sample of ``dataset`` (a ``CGDBInstructDataset``), patients spread over
    ``workers`` processes (default: every CPU this process may use)."""
    groups = dataset.patient_groups()
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    patients = [chunk.tolist() for chunk in np.split(order, bounds)] if len(order) else []
    rank = np.zeros(len(groups), dtype=np.int64)
    shared = np.zeros(len(groups), dtype=np.int64)
    workers = min(workers or available_cpus(), max(1, len(patients) // 64))
    with tqdm(total=len(groups), desc="prefix trees", unit="sample", disable=not show_progress) as bar:
        if workers <= 1:
            _start(dataset)
            results = map(_walk_group, patients)
        else:
            pool = mp.get_context("fork").Pool(workers, initializer=_start, initargs=(dataset,))
            results = pool.imap(_walk_group, patients, chunksize=16)
        try:
            for part in results:
                for i, r, s in part:
                    rank[i], shared[i] = r, s
                bar.update(len(part))
        finally:
            if workers > 1:
                pool.terminate()
            _start(None)
    return PrefixTrees(groups, rank, shared, np.asarray(dataset.lengths(), dtype=np.int64))


def prefix_trees(dataset, build: bool = True, show_progress: bool = True) -> PrefixTrees:
    """:func:`compute`, cached in the dataset's index cache under the digest of its tokens; with
    ``build=False`` (the node's other ranks, after its first built it) a missing cache is an error."""
    name = hashlib.sha256(f"v{VERSION}|{dataset.tokens_digest()}".encode()).hexdigest()[:24]
    path = Path(dataset.cache_dir) / f"prefix-trees-{name}.npz" if dataset.cache_dir else None
    if path is not None and path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return PrefixTrees(**{f.name: z[f.name] for f in fields(PrefixTrees)})
        except (OSError, ValueError, KeyError, EOFError):
            pass  # rebuilt below
    if not build:
        raise ValueError(f"dataset.cache_dir: no prefix trees of the data in {dataset.cache_dir} after the node's "
                         "first rank built them; give every rank of a node the same cache_dir")
    trees = compute(dataset, show_progress=show_progress)
    if path is not None:
        try:
            with atomic_output(path) as tmp, open(tmp, "wb") as out:
                np.savez(out, **{f.name: getattr(trees, f.name) for f in fields(trees)})
        except OSError as e:
            raise ValueError(f"dataset.cache_dir: cannot write {path} ({e.strerror}); set cache_dir or "
                             "$GDT_TUNE_CACHE_DIR to a writable folder") from None
    return trees
