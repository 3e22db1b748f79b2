"""What a row of a micro-batch holds, decided here and nowhere else: the rows of an epoch, the tensors
of a row, the step's global counts. Three ways of filling a row, one representation::

    packing: false          # one sample a row (GDT's layout; rows padded to the longest in the batch)
    packing: true           # rows of exactly max_seq_len tokens, samples placed best-fit-decreasing
    share_prefixes: true    # packed rows in which a patient's samples share their common prefixes (a trie)

A row is a tuple of *documents*, a document a tuple of sample indices: one sample, or several laid
out as a trie (:func:`lay_out`). Every layout gives a token its position (its depth: the position it
has in its own sample, so RoPE is as unpacked) and ``span_end``: token ``q`` attends to token ``kv``
exactly when ``kv <= q < span_end[kv]``, which is causal attention within a sample, no attention
across samples, and in a trie attention along the token's own root-to-leaf path. Labels are shifted
once, per sample (``data.layout.shift_labels``: position t predicts token t+1), so no label crosses a
sample boundary; in a trie a label shared by k samples has weight k. The loss normalised by the
weighted label count of the step then has the gradient of the separate samples (tests/test_batches.py).

    batches = Batches(dataset, plan, batch_size=1, rank=0, world_size=8, accumulation=1, seed=42, ...)
    batches.steps_in_epoch(epoch)
    for batch in batches.loader(epoch, start_sample):      # Batch: CPU tensors and counts
        tokens, labels, kwargs = batch.to(device)            # kwargs: weights, mask, input_pos
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from gdt_tune.data.layout import shift_labels
from gdt_tune.training.sampling import EvalBatchSampler, GlobalOrderBatchSampler, rank_balance

IGNORE = CROSS_ENTROPY_IGNORE_IDX
Row = tuple[tuple[int, ...], ...] | int  # documents, each a tuple of sample indices; an int: that sample alone


# ---------------------------------------------------------------- one document
@dataclass
class Document:
    """A document's tensors as lists: ``span_end`` relative to the document's first token."""

    tokens: list[int]
    positions: list[int]
    span_end: list[int]
    targets: list[int]  # shifted labels, IGNORE where no loss
    weights: list[float]  # how many samples share each label (1.0 unless a trie shares it)
    tags: list[int]  # a tag per label (``tag``), -1 elsewhere
    sample_tokens: int  # the separate samples' tokens


def walk_trie(samples: list[dict]):
    """The trie of ``samples`` (``{"tokens", "labels"}``, labels unshifted): yields, for each sample in
    depth-first (sorted) order, ``(index, shared, targets, path)``: how many of its leading tokens it
    shares with the trie so far, its shifted labels, and its node at each depth. A sample shares the longest prefix of the one
    before it on which no node would have to predict two different labelled tokens (the node where
    they differ is its own, a copy: every position predicts one target)."""
    order = sorted(range(len(samples)), key=lambda i: list(samples[i]["tokens"]))
    target: dict[int, int] = {}  # node -> the labelled token it predicts
    path = np.zeros(0, dtype=np.int64)  # the previous sample's nodes, by depth
    previous = np.zeros(0, dtype=np.int64)
    nodes = 0
    for i in order:
        seq = np.asarray(samples[i]["tokens"], dtype=np.int64)
        targets = shift_labels(list(samples[i]["labels"]))
        m = min(len(seq), len(previous))
        differ = np.flatnonzero(seq[:m] != previous[:m])
        shared = int(differ[0]) if len(differ) else m
        labelled = [d for d, t in enumerate(targets) if t != IGNORE]
        for d in labelled:  # the first shared node that predicts another labelled token
            if d >= shared:
                break
            if target.get(int(path[d]), targets[d]) != targets[d]:
                shared = d
                break
        path = np.concatenate([path[:shared], np.arange(nodes, nodes + len(seq) - shared)])
        nodes += len(seq) - shared
        for d in labelled:
            target.setdefault(int(path[d]), targets[d])
        previous = seq
        yield i, shared, targets, path


def lay_out(samples: list[dict], tag: Callable[[list[int]], list[int]] | None = None) -> Document:
    """The document of ``samples`` (``{"tokens", "labels"}``, labels unshifted as the dataset gives
    them): one sample as it is, several as a trie in depth-first order (:func:`walk_trie`): each
    shared prefix once, each sample's other tokens as a branch, a label shared by k samples weighted k.
    ``tag(targets)`` gives a tag per label of one sample (validation: the task type of each label)."""
    if len(samples) == 1:
        tokens, targets = list(samples[0]["tokens"]), shift_labels(list(samples[0]["labels"]))
        n = len(tokens)
        tags = [-1] * n
        if tag is not None:
            at = [i for i, t in enumerate(targets) if t != IGNORE]
            for i, value in zip(at, tag([targets[i] for i in at])):
                tags[i] = value
        return Document(tokens, list(range(n)), [n] * n, targets, [1.0] * n, tags, n)
    tokens, positions, span_end = [], [], np.zeros(0, dtype=np.int64)
    entries: dict[int, list] = {}  # node -> [token, weight, tag]
    for i, shared, targets, path in walk_trie(samples):
        seq = samples[i]["tokens"]
        tokens.extend(seq[shared:])
        positions.extend(range(shared, len(seq)))
        span_end = np.concatenate([span_end, np.zeros(len(seq) - shared, dtype=np.int64)])
        span_end[path] = len(tokens)  # every node on the path now spans this sample's nodes
        labelled = [d for d, t in enumerate(targets) if t != IGNORE]
        tags = tag([targets[d] for d in labelled]) if tag is not None else [-1] * len(labelled)
        for d, value in zip(labelled, tags):
            entries.setdefault(int(path[d]), [targets[d], 0.0, value])[1] += 1.0
    targets_out, weights, tags_out = [IGNORE] * len(tokens), [1.0] * len(tokens), [-1] * len(tokens)
    for node, (token, weight, value) in entries.items():
        targets_out[node], weights[node], tags_out[node] = token, weight, value
    return Document(list(tokens), positions, span_end.tolist(), targets_out, weights, tags_out,
                    sum(len(s["tokens"]) for s in samples))


def trie_size(samples: list[list[int]]) -> int:
    """Tokens of the trie of token sequences ``samples`` without labels (shared prefixes once; with
    labels, :func:`lay_out` may copy a node: use ``len(lay_out(...).tokens)``)."""
    unlabelled = [{"tokens": s, "labels": [IGNORE] * len(s)} for s in samples]
    return sum(len(unlabelled[i]["tokens"]) - shared for i, shared, _, _ in walk_trie(unlabelled))


# ---------------------------------------------------------------- a micro-batch
@dataclass
class Batch:
    """One micro-batch of rows on the CPU. ``input_pos`` and ``span_end`` are None when every row holds
    one sample (plain causal attention: the stock path); ``weights`` when no label is shared."""

    tokens: torch.Tensor  # [rows, length]
    labels: torch.Tensor  # [rows, length], shifted
    weights: torch.Tensor | None = None
    input_pos: torch.Tensor | None = None
    span_end: torch.Tensor | None = None
    tags: torch.Tensor | None = None
    samples: int = 0
    sample_tokens: int = 0  # the separate samples' tokens
    real_tokens: int = 0  # tokens of the rows that are not padding
    attention_work: float = 0.0  # sum over real tokens of 2 * position + 1 (a sample of n tokens: n^2)

    def pin_memory(self) -> Batch:
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def label_count(self) -> float:
        """Labels of the micro-batch, each counted with its weight (the loss normaliser)."""
        keep = self.labels != IGNORE
        return float(keep.sum()) if self.weights is None else float(self.weights[keep].double().sum())

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(tokens, labels, keyword arguments of the loss head: ``weights``, ``mask``, ``input_pos``)."""
        move = partial(torch.Tensor.to, device=device, non_blocking=True)
        kwargs = {}
        if self.weights is not None:
            kwargs["weights"] = move(self.weights)
        if self.span_end is not None:
            kwargs["mask"] = attention_mask(move(self.span_end))
            kwargs["input_pos"] = move(self.input_pos)
        return move(self.tokens), move(self.labels), kwargs


def attention_mask(span_end: torch.Tensor):
    """The mask of rows whose token ``q`` sees ``kv`` when ``kv <= q < span_end[kv]``: flex attention's
    block mask on a GPU that runs it (torchtune then calls flex attention), the same mask as a dense
    boolean tensor ``[rows, q, kv]`` elsewhere (scaled dot-product attention)."""
    if span_end.device.type == "cuda" and torch.cuda.get_device_capability(span_end.device) >= (7, 5):
        return flex_block_mask(span_end)
    index = torch.arange(span_end.shape[1], device=span_end.device)
    return (index[None, None, :] <= index[None, :, None]) & (index[None, :, None] < span_end[:, None, :])


def flex_block_mask(span_end: torch.Tensor):
    """:func:`attention_mask` as flex attention's ``BlockMask`` (any device; tests compare it on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def sees(b, h, q, kv):
        return (kv <= q) & (q < span_end[b, kv])

    rows, length = span_end.shape
    return create_block_mask(sees, rows, None, length, length, device=span_end.device)


def collate(rows: list[list[list[dict]]], pad_id: int, length: int | None = None, multiple: int = 1,
            tag: Callable[[list[int]], list[int]] | None = None) -> Batch:
    """The :class:`Batch` of ``rows`` (per row, per document, its samples as the dataset gives them),
    each row ``length`` tokens (None: the longest row's), rounded up to a multiple of ``multiple``
    (float8's matmuls need multiples of 16). Padding has token ``pad_id``, no label, and sees only
    itself."""
    docs = [[lay_out(samples, tag) for samples in row] for row in rows]
    sizes = [sum(len(d.tokens) for d in row) for row in docs]
    width = max(sizes) if length is None else length
    width = -(-width // multiple) * multiple
    if max(sizes) > width:
        raise ValueError(f"internal error: a row of {max(sizes)} tokens does not fit {width}")
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    weights = torch.ones((len(rows), width), dtype=torch.float32)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    span_end = torch.arange(1, width + 1).repeat(len(rows), 1)  # padding sees itself
    tags = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(docs):
        at = 0
        for d in row:
            end = at + len(d.tokens)
            tokens[r, at:end] = torch.tensor(d.tokens)
            labels[r, at:end] = torch.tensor(d.targets)
            weights[r, at:end] = torch.tensor(d.weights)
            pos[r, at:end] = torch.tensor(d.positions)
            span_end[r, at:end] = torch.tensor(d.span_end) + at
            tags[r, at:end] = torch.tensor(d.tags)
            at = end
    one_sample_each = all(len(row) == 1 and len(row[0]) == 1 for row in rows)
    shared = bool((weights != 1.0).any())
    real = sum(sizes)
    return Batch(tokens, labels, weights if shared else None, None if one_sample_each else pos,
                 None if one_sample_each else span_end, tags if tag is not None else None,
                 samples=sum(len(samples) for row in rows for samples in row),
                 sample_tokens=sum(d.sample_tokens for row in docs for d in row), real_tokens=real,
                 attention_work=float(sum(2 * sum(d.positions) + len(d.positions) for row in docs for d in row)))


# ---------------------------------------------------------------- which samples share a row
def best_fit_rows(sizes: list[int], capacity: int, window: int, seed: int) -> list[list[int]]:
    """Items (indices into ``sizes``, in their given order) placed into rows of ``capacity`` tokens:
    each window of ``window`` consecutive items best-fit-decreasing (the longest first, each into the
    fullest row it fits), the window's rows in a seeded random order. Depends only on its arguments."""
    rows: list[list[int]] = []
    for start in range(0, len(sizes), window):
        items = sorted(range(start, min(start + window, len(sizes))), key=lambda i: -sizes[i])
        room: list[tuple[int, int]] = []  # (free tokens, row), sorted
        filled: list[list[int]] = []
        for i in items:
            k = bisect.bisect_left(room, (sizes[i], -1))
            if k == len(room):
                filled.append([i])
                bisect.insort(room, (capacity - sizes[i], len(filled) - 1))
            else:
                free, r = room.pop(k)
                filled[r].append(i)
                bisect.insort(room, (free - sizes[i], r))
        perm = torch.randperm(len(filled), generator=torch.Generator().manual_seed(seed + start)).tolist()
        rows.extend(filled[j] for j in perm)
    return rows


@dataclass(frozen=True)
class RowPlan:
    """How an epoch's sample order becomes rows. ``capacity``: a packed row's tokens (the dataset's
    ``max_seq_len``); ``lengths``: each sample's tokens."""

    packing: bool = False
    capacity: int = 0
    window: int = 1024
    lengths: np.ndarray | None = None
    multiple: int = 1  # rows rounded up to a multiple of this many tokens (16 with float8)
    trees: object | None = None  # training.prefix_trees.PrefixTrees: a patient's samples share a trie

    def rows(self, order: list[int], seed: int) -> list[Row]:
        if not self.packing:
            return list(order)
        if self.trees is not None:  # documents: a patient's tries, in the patients' shuffled order
            docs = self.trees.documents(order, self.capacity)
            rows = best_fit_rows([size for _, size in docs], self.capacity, self.window, seed)
            return [tuple(docs[j][0] for j in row) for row in rows]
        sizes = [int(self.lengths[i]) for i in order]
        return [tuple((order[j],) for j in row) for row in best_fit_rows(sizes, self.capacity, self.window, seed)]

    @classmethod
    def for_dataset(cls, dataset, key: str, *, packing: bool, window: int, multiple: int, trees=None) -> RowPlan:
        """The plan of a ``cgdb_instruct_dataset`` (config key ``key``): packed rows hold its
        ``max_seq_len`` tokens; with ``trees`` (``training.prefix_trees``) a patient's samples share them."""
        if not packing:
            return cls(multiple=multiple)
        settings = getattr(dataset, "settings", None)
        if not isinstance(settings, dict) or not hasattr(dataset, "lengths"):
            raise ValueError(f"config key 'packing': {key} must be a gdt_tune.datasets.cgdb_instruct_dataset (rows are "
                             "filled up to its max_seq_len); set packing=false")
        return cls(packing=True, capacity=int(settings["max_seq_len"]), window=window, lengths=dataset.lengths(),
                   multiple=multiple, trees=trees)

    @property
    def row_length(self) -> int | None:
        """Every row's tokens (None: the longest row of each micro-batch)."""
        return self.capacity if self.packing else None


def row_samples(row: Row) -> int:
    return 1 if isinstance(row, int) else sum(len(doc) for doc in row)


class RowDataset(Dataset):
    """``dataset[row]`` for a :data:`Row`: per document, its samples as the dataset gives them."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: Row) -> list[list[dict]]:
        if isinstance(row, int):
            return [[self.dataset[row]]]
        return [[self.dataset[i] for i in doc] for doc in row]


class Batches:
    """The training data of one rank as micro-batches (see the module docstring)."""

    def __init__(self, dataset, plan: RowPlan, *, batch_size: int, rank: int, world_size: int, accumulation: int,
                 seed: int, shuffle: bool, pad_id: int, num_workers: int = 0, pin_memory: bool = False,
                 lengths=None, balance_group: int = 0, balance_window: int = 64):
        self.dataset, self.plan = dataset, plan
        self.rows_per_step = batch_size * world_size * accumulation
        self.sampler = GlobalOrderBatchSampler(len(dataset), batch_size, rank, world_size, seed=seed, shuffle=shuffle,
                                               lengths=lengths, group=balance_group, window=balance_window,
                                               rows=plan.rows if plan.packing else None, samples_of=row_samples)
        self._collate = partial(collate, pad_id=pad_id, length=plan.row_length, multiple=plan.multiple)
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def steps_in_epoch(self, epoch: int, start_sample: int = 0) -> int:
        """Whole optimizer steps left in ``epoch`` from ``start_sample`` on."""
        return self.sampler.rows_left(epoch, start_sample) // self.rows_per_step

    def loader(self, epoch: int, start_sample: int = 0) -> DataLoader:
        self.sampler.set_epoch(epoch, start_sample=start_sample)
        workers = self.num_workers
        return DataLoader(RowDataset(self.dataset), batch_sampler=self.sampler, collate_fn=self._collate,
                          num_workers=workers, persistent_workers=False, prefetch_factor=2 if workers else None,
                          pin_memory=self.pin_memory)


class EvalRows:
    """Every sample of ``dataset`` once over all ranks, in rows as ``plan`` lays them out (in index
    order), ``batch_size`` rows a batch: iterate this rank's batches; every rank runs
    ``num_batches_all_ranks`` forwards (FSDP's collectives stay matched), filling with :meth:`filler`."""

    def __init__(self, dataset, plan: RowPlan, batch_size: int, rank: int, world_size: int, pad_id: int,
                 tag: Callable[[list[int]], list[int]] | None = None):
        self._rows = plan.rows(list(range(len(dataset))), seed=0)
        self._sampler = EvalBatchSampler(len(self._rows), batch_size, rank, world_size)
        self._reader = RowDataset(dataset)
        self._collate = partial(collate, pad_id=pad_id, length=plan.row_length, multiple=plan.multiple, tag=tag)
        self.num_batches_all_ranks = self._sampler.num_batches_all_ranks

    def __iter__(self):
        for idx in self._sampler:
            yield self._collate([self._reader[self._rows[i]] for i in idx])

    def filler(self) -> Batch:
        """A batch without labels: a rank with no batch left runs it (nothing is counted)."""
        batch = self._collate([self._reader[self._rows[0]]])
        return replace(batch, labels=torch.full_like(batch.labels, IGNORE), weights=None, samples=0, sample_tokens=0,
                       real_tokens=0, attention_work=0.0)


# ---------------------------------------------------------------- a step's counts
@dataclass(frozen=True)
class StepCounts:
    """A step's counts over all ranks: the loss normaliser and what the throughput logs read."""

    labels: float  # weighted label tokens: the loss of the step is their mean
    tokens: float  # tokens of the rows that are not padding
    sample_tokens: float  # the separate samples' tokens
    samples: int  # samples (the data position advances by this many)
    rows: int
    attention_work: float
    rank_balance: float


def global_counts(batches: list[Batch], rank: int, world_size: int, flops_per_token) -> StepCounts:
    """:class:`StepCounts` of this step's micro-batches on every rank: one all-reduce of CPU numbers
    (gloo), so the GPU never waits for the host. ``flops_per_token(length)``: a rank's work is the
    FLOPs of its padded micro-batches (``training.mfu``), which ``rank_balance`` compares."""
    counts = torch.zeros(6 + world_size, dtype=torch.float64)
    counts[0] = sum(b.label_count() for b in batches)
    counts[1] = sum(b.real_tokens for b in batches)
    counts[2] = sum(b.sample_tokens for b in batches)
    counts[3] = sum(b.samples for b in batches)
    counts[4] = sum(b.tokens.shape[0] for b in batches)
    counts[5] = sum(b.attention_work for b in batches)
    counts[6 + rank] = sum(b.tokens.numel() * flops_per_token(b.tokens.shape[1]) for b in batches)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return StepCounts(labels=counts[0].item(), tokens=counts[1].item(), sample_tokens=counts[2].item(),
                      samples=int(counts[3].item()), rows=int(counts[4].item()), attention_work=counts[5].item(),
                      rank_balance=rank_balance(counts[6:].tolist()))
