"""Full fine-tune with FSDP2 on CPU (gloo) or CUDA (NCCL), interim sharded checkpoints and exact
resume. Launch::

    tune run --nproc_per_node 8 gdt_tune/recipes/full_finetune_fsdp_ckpt.py \\
        --config configs/llama3_1_8b_gdt_full.yaml key=value ...

Config keys follow torchtune's ``full_finetune_distributed``; ``gdt_tune.training.config`` types
and documents them, and rejects unknown or contradictory ones at start.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from torchtune import config, training
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from tqdm import tqdm

from gdt_tune.clinical.event_scoring import score_samples
from gdt_tune.clinical.metrics import softmax
from gdt_tune.clinical.validation import KINDS, MetricSamples, choose_metric_samples, event_summary, label_kinds
from gdt_tune.coordination import FailedElsewhere, init_distributed, rank_zero_first, report_error, watch_launcher
from gdt_tune.data.layout import Layout, trained_with
from gdt_tune.datasets import PatientDataset, dropped_by_cap
from gdt_tune.prompting import tokenizer_from_config
from gdt_tune.serving import check_serving, write_serving_files
from gdt_tune.training import float8
from gdt_tune.training.activation_checkpointing import apply_activation_checkpointing
from gdt_tune.training.checkpointing import COMPLETE_MARKER, CheckpointManager, Progress, SaveFailed
from gdt_tune.training.config import check_components, check_paths, has_component, parse
from gdt_tune.training.hf_weights import (
    Placeholders,
    check_weights_fit,
    init_rope_buffers,
    prepare_for_save,
    tune_shapes,
    weights_for_rank,
)
from gdt_tune.training.loss_head import LossOnlyHead
from gdt_tune.training.mfu import decoder_flops_per_token, mfu, peak_tflops
from gdt_tune.training.resume import ResumePlan, dataset_settings, lr_schedule, run_contract
from gdt_tune.training.run_dir import OutputDirLock, finished, take_output_dir
from gdt_tune.training.sampling import EvalBatchSampler, GlobalOrderBatchSampler, rank_balance

log = logging.getLogger("gdt_tune")


def _run_record(contract: dict, progress: Progress) -> dict:
    """What rank 0 writes with each checkpoint (``checkpointing.read_run``). A plain function of
    its arguments: a closure over the recipe would make a reference cycle that keeps the model
    and its process groups alive until interpreter shutdown."""
    return {**contract, "samples_in_epoch": progress.samples_in_epoch, "validation_pending": progress.validation_pending}


def one_line(error: BaseException) -> str:
    """The message of an error as one line. An error raised in a DataLoader worker arrives as
    "Caught ValueError in DataLoader worker process 0. Original Traceback ...": its last line is ours."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n"))


def loggable_config(cfg: DictConfig) -> DictConfig:
    """The resolved config for logs and wandb, with any ``patient_ids`` list replaced by its
    length (a config may list patient ids inline; ids never leave the machine)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def redact(node):
        if isinstance(node, dict):
            return {k: (f"<{len(v)} patient ids, not logged>" if k == "patient_ids" and isinstance(v, list)
                        else redact(v)) for k, v in node.items()}
        return [redact(v) for v in node] if isinstance(node, list) else node

    return OmegaConf.create(redact(resolved))


class FullFinetuneRecipe:
    """One FSDP2 full fine-tune: ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(self, cfg: DictConfig) -> None:
        rc = parse(cfg, torch.cuda.is_available())
        check_components(cfg)
        check_paths(cfg)
        self._cfg, self._train_cfg, self._ckpt_cfg, self._log_cfg = cfg, rc.training, rc.checkpoints, rc.logging
        self._data_cfg = rc.data
        self._device = torch.device(rc.training.device)
        self._dtype = torch.bfloat16 if rc.training.dtype == "bf16" else torch.float32
        self._world, self._rank, local_rank = init_distributed(self._device.type)
        if self._device.type == "cuda":
            self._device = torch.device("cuda", local_rank)
        self._is_rank_zero = self._rank == 0
        self._float8 = rc.training.float8
        if self._float8 and (problem := float8.float8_problem(self._device)):
            raise ValueError(f"config key 'float8': {problem}; set float8=false")
        self._peak_tflops = rc.logging.mfu_peak_tflops
        if self._peak_tflops is None and self._device.type == "cuda":
            self._peak_tflops = peak_tflops(torch.cuda.get_device_name(self._device))
            if self._peak_tflops is None and self._is_rank_zero:
                log.warning("mfu: unknown GPU %r; set mfu_peak_tflops=<its dense bf16 TFLOP/s> to log MFU",
                            torch.cuda.get_device_name(self._device))
        self._batch_size = rc.training.batch_size
        self._accum = rc.training.gradient_accumulation_steps
        self._seed = training.set_seed(seed=rc.training.seed)
        # built by setup()
        self._tokenizer = self._train_ds = self._val_ds = self._settings = None
        self._sampler = self._train_loader = None
        self._global_batch = self._steps_per_epoch = 0
        self._hf_checkpointer = None  # torchtune's FullModelHFCheckpointer: base weights in, epoch_N out
        self._hf_shapes = None  # {name: shape} of the base weights, from their headers (fresh start)
        self._vocab_size = 0  # the model's embedding rows (the serving files' ids must fit)
        self._interim: CheckpointManager | None = None  # step_N checkpoints and resume
        self._lock: OutputDirLock | None = None  # rank 0's hold on output_dir
        self._metric_logger = self._profiler = None
        self._model = self._optimizer = self._lr_scheduler = self._head = None
        self._progress: Progress | None = None
        self._metric_samples = MetricSamples()  # val_metrics_samples: tasks, sequences, file:line
        self._flops_per_token = None  # (mean sequence length) -> FLOPs per token, for MFU
        self._validated_step = -1  # the last step whose validation finished (and was logged)
        self.finished = False  # set by setup(): a requeue of a run whose final checkpoint is written

    def _final_folder(self) -> str:
        """Where the last epoch's Hugging Face checkpoint goes (the checkpointer's output_dir, by
        default the run's)."""
        return os.path.join(self._cfg.checkpointer.get("output_dir", self._ckpt_cfg.output_dir),
                            f"epoch_{self._train_cfg.epochs - 1}")

    def _finished(self, steps: int) -> bool:
        """With ``resume_from_checkpoint=true``: whether this output_dir's run has written its last
        ``epoch_N`` after the ``steps`` this config trains (a Slurm requeue or a job array rerunning a
        finished job). Says so in one line; then nothing is loaded or written and the run exits 0."""
        if self._ckpt_cfg.resume_from_checkpoint is not True:
            return False
        run_id = finished(self._ckpt_cfg.output_dir, self._final_folder(), steps)
        if run_id and self._is_rank_zero:
            log.info("run %s has finished: %s is complete after step %d; nothing to do (to train further, start a "
                     "new run from it: checkpointer.checkpoint_dir=%s)", run_id, self._final_folder(), steps,
                     self._final_folder())
        return run_id is not None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, out = self._cfg, self._ckpt_cfg.output_dir
        # Everything is checked before anything is written to output_dir: a bad config or bad data
        # leaves an earlier run's folder as it was. Datasets before the model: bad data fails in
        # seconds, not after loading 16 GB of weights.
        self._tokenizer = tokenizer_from_config(cfg.tokenizer)
        self._train_ds = config.instantiate(cfg.dataset, self._tokenizer)
        self._global_batch = self._batch_size * self._world * self._accum
        self._steps_per_epoch = len(self._train_ds) // self._global_batch
        if self._train_cfg.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self._train_cfg.max_steps_per_epoch)
        self.finished = self._finished(self._steps_per_epoch * self._train_cfg.epochs)
        if self.finished:
            return
        # The checkpoint (its files only): a resumed run with seed=null takes the saved seed. Only
        # this output_dir's run is resumed (run.json).
        plan = ResumePlan.find(out, self._ckpt_cfg.resume_from_checkpoint, self._rank)
        if plan.seed is not None and self._train_cfg.seed is None:
            self._seed = training.set_seed(seed=plan.seed)
        self._val_ds = config.instantiate(cfg.dataset_val, self._tokenizer) if has_component(cfg, "dataset_val") else None
        if self._val_ds is not None and len(self._val_ds) == 0:
            raise ValueError(f"dataset_val: no samples ({dropped_by_cap(self._val_ds)} dropped by the length cap); raise "
                             "dataset_val.max_seq_len, fix dataset_val.data_files, or set dataset_val=null")
        self._check_no_shared_patients()
        self._settings = dataset_settings(self._train_ds, cfg.dataset)
        self._metric_samples = self._val_metric_samples()
        self._sampler, self._train_loader = self._setup_train_loader(self._train_ds)
        if self._steps_per_epoch == 0:
            dropped = dropped_by_cap(self._train_ds)
            why = f" ({dropped} dropped by the length cap: raise dataset.max_seq_len)" if dropped else ""
            raise ValueError(
                f"dataset: {len(self._train_ds)} samples{why} make no optimizer step with batch_size={self._batch_size} x "
                f"{self._world} ranks x gradient_accumulation_steps={self._accum}; lower them or add data")
        schedule_steps = self._steps_per_epoch * self._train_cfg.epochs
        plan = plan.checked(run_contract(
            seed=self._seed, shuffle=self._data_cfg.shuffle, dataset=self._train_ds, settings=self._settings,
            world_size=self._world, accumulation=self._accum, batch_size=self._batch_size,
            lr=float(cfg.optimizer.get("lr", 0.0)), save_every=self._ckpt_cfg.save_every_n_steps,
            schedule=lr_schedule(cfg.lr_scheduler if has_component(cfg, "lr_scheduler") else None, schedule_steps),
            balanced_order=(f"balance_group={self._data_cfg.balance_group}, balance_window={self._data_cfg.balance_window}"
                            if self._data_cfg.balanced_steps else "off")))
        self._hf_checkpointer = config.instantiate(cfg.checkpointer)
        self._hf_shapes = tune_shapes(self._hf_checkpointer) if plan.path is None else None
        with torch.device("meta"):  # shapes only: no 16 GB read to find a typo
            meta_model = config.instantiate(cfg.model)
        if self._hf_shapes is not None:  # the weights' shapes from their headers
            check_weights_fit(self._hf_shapes, meta_model, cfg.checkpointer.checkpoint_dir)
        self._vocab_size = meta_model.tok_embeddings.num_embeddings
        del meta_model
        self._check_final_save()
        # Now this run takes output_dir: the lock, then the run identity (or a refusal).
        self._lock = OutputDirLock(out) if self._is_rank_zero else None
        identity = rank_zero_first(partial(take_output_dir, out, self._lock, plan.path,
                                           overwrite=self._ckpt_cfg.overwrite_output_dir,
                                           config_text=OmegaConf.to_yaml(loggable_config(cfg))))
        if self._is_rank_zero and has_component(cfg, "metric_logger"):
            self._metric_logger = config.instantiate(cfg.metric_logger)
            # wandb: the resolved config as its config and as a file (patient id lists redacted)
            self._metric_logger.log_config(loggable_config(cfg))
        self._profiler = self._setup_profiler(cfg.get("profiler"))
        self._model = self._setup_model(cfg.model, from_hf=plan.path is None)
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
        self._lr_scheduler = (config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=schedule_steps)
                              if has_component(cfg, "lr_scheduler") else None)
        # the projection and cross-entropy of labelled positions only, in loss.num_output_chunks chunks
        self._head = LossOnlyHead(self._model, config.instantiate(cfg.loss).num_output_chunks,
                                  compile=self._train_cfg.compile)
        self._record_val_metric_samples()
        self._progress = Progress(seed=self._seed, world_size=self._world)
        self._interim = CheckpointManager.from_config(
            self._ckpt_cfg, model=self._model, optimizer=self._optimizer, lr_scheduler=self._lr_scheduler,
            progress=self._progress, rank=self._rank,
            run_info=partial(_run_record, plan.contract, self._progress), run_id=identity["run_id"])
        self._interim.load(plan)
        p = self._progress  # a resumed step's validation ran before its save, unless a signal cut it short
        if p.global_step and self._validation_due(p.global_step) and not p.validation_pending:
            self._validated_step = p.global_step
        self._interim.refuse_foreign_steps(self._progress.global_step + 1,
                                           self._progress.global_step + self._steps_left(self._progress))

    def _check_final_save(self) -> None:
        """What ``save_final`` needs, checked before the first step: a week-long run must not end
        with weights but no serving files. The tokenizer's special tokens must make a ``tokenizer.json``
        for this model's vocabulary (the checkpointer's ``output_dir`` and the base ``config.json``
        were checked with the paths and by the checkpointer)."""
        try:
            check_serving(self._tokenizer, self._vocab_size)
        except ValueError as e:
            raise ValueError(f"config key 'tokenizer': the final checkpoint could not be served: {e}") from None

    def _setup_profiler(self, cfg_profiler: DictConfig | None):
        """torchtune's profiler (``torchtune.training.setup_torch_profiler``), traces in
        ``${output_dir}/profiling`` unless ``profiler.output_dir`` says otherwise::

            profiler:
              _component_: torchtune.training.setup_torch_profiler
              enabled: true
              wait_steps: 5
              warmup_steps: 3
              active_steps: 2
              num_cycles: 1
        """
        if cfg_profiler is None or not cfg_profiler.get("enabled", False):
            return None
        cfg_profiler = OmegaConf.merge({"_component_": "torchtune.training.setup_torch_profiler",
                                        "output_dir": os.path.join(self._ckpt_cfg.output_dir, "profiling"),
                                        "cuda": self._device.type == "cuda"}, cfg_profiler)
        profiler, _ = config.instantiate(cfg_profiler)
        if self._is_rank_zero:
            log.info("profiler: traces in %s", cfg_profiler.output_dir)
        return profiler

    def _check_no_shared_patients(self) -> None:
        if not (isinstance(self._train_ds, PatientDataset) and isinstance(self._val_ds, PatientDataset)):
            return
        if self._train_ds.id_key_fingerprint != self._val_ds.id_key_fingerprint:
            raise ValueError("dataset.cache_dir and dataset_val.cache_dir hold different id-hashing keys, so the "
                             "train/validation patient overlap cannot be checked; give both the same cache_dir")
        for key, ds in (("dataset", self._train_ds), ("dataset_val", self._val_ds)):
            if (missing := ds.counts.get("no_patient_id", 0)) and self._is_rank_zero:
                log.warning("%s: %d of %d samples have no meta.patientid, so whether their patients also appear in "
                            "the other split cannot be checked; give every sample meta.patientid", key, missing, len(ds))
        shared = self._train_ds.patient_ids() & self._val_ds.patient_ids()
        if shared:
            first = min(shared)  # named by where it is, not by its id
            raise ValueError(f"dataset and dataset_val share {len(shared)} patients (e.g. the patient of "
                             f"{self._train_ds.where_patient(first)} and {self._val_ds.where_patient(first)}); "
                             "split train/validation by patient")

    def _collate(self):
        return partial(padded_collate_sft, padding_idx=self._tokenizer.pad_id, ignore_idx=CROSS_ENTROPY_IGNORE_IDX)

    def _setup_train_loader(self, ds) -> tuple[GlobalOrderBatchSampler, DataLoader]:
        d, lengths = self._data_cfg, None
        if d.balanced_steps:
            if not isinstance(ds, PatientDataset):
                raise ValueError("config key 'balanced_steps': needs a dataset that knows its sample lengths "
                                 "(gdt_tune.datasets.cgdb_instruct_dataset); set balanced_steps=false")
            lengths = ds.lengths()
            across_ranks = self._batch_size * self._world
            if d.balance_group is None:
                d = self._data_cfg = replace(d, balance_group=self._global_batch)
                if self._is_rank_zero:
                    log.info("balanced_steps: balance_group=%d, the global batch (batch_size x ranks x "
                             "gradient_accumulation_steps)", d.balance_group)
            if d.balance_group % across_ranks and self._is_rank_zero:
                log.warning("balanced_steps: balance_group=%d is not a multiple of batch_size x ranks = %d, so a "
                            "micro-batch spans two groups of different lengths; set balance_group to the global "
                            "batch (%d)", d.balance_group, across_ranks, across_ranks * self._accum)
        sampler = GlobalOrderBatchSampler(len(ds), self._batch_size, self._rank, self._world, seed=self._seed,
                                          shuffle=d.shuffle, lengths=lengths, group=d.balance_group or 0,
                                          window=d.balance_window)
        workers = self._data_cfg.num_workers
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=self._collate(), num_workers=workers,
                            persistent_workers=False, prefetch_factor=2 if workers else None,
                            pin_memory=self._device.type == "cuda")
        return sampler, loader

    def _setup_model(self, cfg_model: DictConfig, from_hf: bool) -> torch.nn.Module:
        """Build on the meta device, shard with FSDP2, then fill the shards from the HF checkpoint
        (``from_hf``), or leave them empty for an interim checkpoint to fill (resume: the HF
        weights are not read, only their file layout, which the final save needs)."""
        with training.set_default_dtype(self._dtype), torch.device("meta"):
            model = config.instantiate(cfg_model)
        self._flops_per_token = decoder_flops_per_token(model)
        if self._float8:
            float8.convert_to_float8(model)
        if self._train_cfg.enable_activation_checkpointing:
            apply_activation_checkpointing(model, self._train_cfg.ac_mode or "full", self._train_cfg.ac_option)
        if self._train_cfg.compile:  # each layer, its checkpointing included (as torchtitan)
            for layer in model.layers:
                layer.compile(backend=os.environ.get("TORCH_COMPILE_BACKEND", "inductor"))
        custom = list(self._train_cfg.custom_sharded_layers or [])
        training.shard_model(
            model, [partial(training.get_shard_conditions, names_to_match=custom)],
            cpu_offload=self._train_cfg.fsdp_cpu_offload,
            reshard_after_forward=self._train_cfg.fsdp_reshard_after_forward)
        if from_hf:  # rank 0 reads the weights; the loader scatters each rank's shards from it
            state, read = weights_for_rank(self._hf_checkpointer, self._rank, self._hf_shapes, self._dtype,
                                           self._device)
            if self._is_rank_zero:
                log.info("weights: read %.1f MB of HF weights on rank 0 only (%s)", read / 2**20,
                         "the other ranks' shards are scattered from it" if self._hf_shapes is not None
                         else "and on every rank: shapes not known from the file headers")
        else:
            prepare_for_save(self._hf_checkpointer)
            model.to_empty(device=self._device)
        init_rope_buffers(model, self._device, self._dtype)
        if from_hf:
            if not isinstance(state, Placeholders):
                check_weights_fit({k: tuple(v.shape) for k, v in state.items()}, model,
                                  self._cfg.checkpointer.checkpoint_dir)
            training.load_from_full_model_state_dict(
                model, state, self._device, strict=True, cpu_offload=self._train_cfg.fsdp_cpu_offload)
            del state
        training.validate_no_params_on_meta_device(model)
        n_params = sum(p.numel() for p in model.parameters())
        if self._is_rank_zero:
            log.info("model: %.1fM parameters, dtype %s, %d ranks on %s", n_params / 1e6, self._dtype,
                     self._world, self._device.type)
        return model

    # ---------------------------------------------------------------- steps
    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"].to(self._device, non_blocking=True)
        labels = batch["labels"].to(self._device, non_blocking=True)
        # position t predicts token t+1
        shifted = torch.full_like(labels, CROSS_ENTROPY_IGNORE_IDX)
        shifted[:, :-1] = labels[:, 1:]
        return tokens, shifted

    def _global_counts(self, batches: list[dict]) -> tuple[float, float, float]:
        """Label tokens (after the shift) and non-pad tokens of this step on all ranks, and the
        step's ``rank_balance`` (each rank's work: the FLOPs of its padded micro-batches,
        ``training.mfu``), counted on the CPU batches: a CPU all-reduce (gloo), so the GPU never
        waits for the host."""
        counts = torch.zeros(2 + self._world, dtype=torch.float64)
        counts[0] = sum(float((b["labels"][:, 1:] != CROSS_ENTROPY_IGNORE_IDX).sum()) for b in batches)
        counts[1] = sum(float((b["tokens"] != self._tokenizer.pad_id).sum()) for b in batches)
        counts[2 + self._rank] = sum(b["tokens"].numel() * self._flops_per_token(b["tokens"].shape[1]) for b in batches)
        dist.all_reduce(counts)
        return counts[0].item(), counts[1].item(), rank_balance(counts[2:].tolist())

    def _train_step(self, batches: list[dict]) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches. The loss is
        normalised by the label tokens of all micro-batches on all ranks, so the gradient equals
        that of the mean over the global batch (FSDP averages gradients over ranks, hence x world).
        Loss and grad norm stay on the device (``loss_sum``, ``grad_norm``): read them only when
        logging (:meth:`_read_step`), so steps queue up without host syncs."""
        n_labels, n_tokens, balance = self._global_counts(batches)
        scale = self._world / max(n_labels, 1.0)
        moved = [self._to_device(b) for b in batches]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        for tokens, labels in moved:
            ce = self._head(tokens, labels)
            (ce * scale).backward()
            loss_sum += ce.detach().double()
        grad_norm = None
        if self._train_cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=float(self._train_cfg.clip_grad_norm))
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._float8:
            float8.after_optimizer_step(self._model)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return {"loss_sum": loss_sum, "grad_norm": grad_norm, "tokens": n_tokens, "label_tokens": n_labels,
                "rank_balance": balance,
                "seq_len": n_tokens / (len(batches) * self._batch_size * self._world)}

    def _read_step(self, stats: dict) -> dict[str, float]:
        """Loss per label token over all ranks, and the grad norm, as numbers (a host sync; every
        rank must call it at the same step)."""
        total = stats["loss_sum"].clone()
        dist.all_reduce(total)
        out = {"loss": total.item() / max(stats["label_tokens"], 1.0)}
        if stats["grad_norm"] is not None:
            out["grad_norm"] = float(stats["grad_norm"])
        return out

    def _val_metric_samples(self) -> MetricSamples:
        """The ``val_metrics_samples`` subset, read and packed at setup (before the weights)."""
        k = self._log_cfg.val_metrics_samples
        if k and self._val_ds is None and self._is_rank_zero:
            log.warning("val_metrics_samples=%d: no dataset_val, so no validation and no event metrics", k)
        if not k or self._val_ds is None:
            return MetricSamples()
        if not isinstance(self._val_ds, PatientDataset):
            raise ValueError("config key 'val_metrics_samples': needs dataset_val from "
                             "gdt_tune.datasets.cgdb_instruct_dataset; set val_metrics_samples=0")
        with torch.device("meta"):
            limit = config.instantiate(self._cfg.model).max_seq_len
        chosen = choose_metric_samples(self._val_ds, Layout.build(self._tokenizer, trained_with(self._settings)[0]), k,
                                       self._seed, limit)
        if chosen.too_long and self._is_rank_zero:
            log.warning("val_metrics_samples: %d of the chosen validation samples are longer than model.max_seq_len "
                        "(%d) and are not scored, e.g. %s", len(chosen.too_long), limit, chosen.too_long[0])
        return chosen

    def _record_val_metric_samples(self) -> None:
        """Rank 0 lists the scored samples (``file:line``, no text) in ``output_dir/val_metrics_samples.txt``
        for reviewers and for ``gdt-tune evaluate`` of the same samples."""
        chosen = self._metric_samples
        if not chosen.where or not self._is_rank_zero:
            return
        path = os.path.join(self._ckpt_cfg.output_dir, "val_metrics_samples.txt")
        with open(path, "w") as f:
            f.writelines(f"{where}\n" for where in chosen.where)
        tasks = sum(map(len, chosen.tasks))
        if tasks == 0:
            log.warning("val_metrics_samples: the %d chosen validation samples hold no event task, so no val_events_* "
                        "is logged (raise val_metrics_samples or check dataset_val)", len(chosen.where))
        else:
            log.info("val_metrics_samples: %d event tasks of %d of the %d validation samples (listed in %s)", tasks,
                     len(chosen.where), len(self._val_ds), path)

    def _run_validation(self) -> None:
        """Validate and log. A stop signal (SIGTERM, Ctrl-C, SIGHUP) cuts it short within one batch on
        every rank: nothing is logged, the caller saves the step with its validation pending, and the
        resumed run runs that validation first."""
        p = self._progress
        values = self.validate()
        p.validation_pending = values is None
        if values is None:
            if self._is_rank_zero:
                log.warning("validation of step %d stopped by %s; the resumed run validates step %d first",
                            p.global_step, self._interim.stop_signal, p.global_step)
            return
        self._validated_step = p.global_step
        self._log(values)

    @torch.no_grad()
    def validate(self) -> dict[str, float] | None:
        """``val_loss`` (mean loss per label token over the whole validation set, each sample
        once), ``val_loss_forecasting`` and ``val_loss_events`` (``clinical.validation``) and,
        with ``val_metrics_samples``, the event metrics of :meth:`_val_event_metrics`. None when
        a stop signal arrived (asked of every rank before each batch)."""
        sampler = EvalBatchSampler(len(self._val_ds), self._log_cfg.batch_size_val or self._batch_size,
                                   self._rank, self._world)
        loader = DataLoader(self._val_ds, batch_sampler=sampler, collate_fn=self._collate())
        self._model.eval()
        # loss sum and label tokens: all, then each of KINDS
        sums = torch.zeros(1 + len(KINDS), dtype=torch.float64, device=self._device)
        counts = torch.zeros(1 + len(KINDS), dtype=torch.float64)
        last = None
        batches = iter(loader)
        for _ in tqdm(range(sampler.num_batches_all_ranks), desc="validation", leave=False,
                      disable=not self._is_rank_zero):
            if self._interim.poll("validation"):
                self._model.train()
                return None
            batch = next(batches, None)
            if batch is None:  # this rank ran out (or had none): a masked batch keeps FSDP collectives matched
                last = last or self._collate()([self._val_ds[0]])
                batch = dict(last, labels=torch.full_like(last["labels"], CROSS_ENTROPY_IGNORE_IDX))
            targets = batch["labels"][:, 1:]
            kinds = torch.tensor([k for row in targets for k in label_kinds(
                self._tokenizer, row[row != CROSS_ENTROPY_IGNORE_IDX].tolist())], dtype=torch.long)
            counts[0] += len(kinds)
            counts[1:] += torch.bincount(kinds[kinds >= 0], minlength=len(KINDS)).double()
            tokens, labels = self._to_device(batch)
            ce = self._head(tokens, labels, per_token=True).double()
            sums[0] += ce.sum()
            sums[1:].index_add_(0, kinds[kinds >= 0].to(self._device), ce[(kinds >= 0).to(self._device)])
            last = batch
        self._model.train()
        totals = torch.cat([sums, counts.to(self._device)])
        dist.all_reduce(totals)
        loss, n = totals[:1 + len(KINDS)].tolist(), totals[1 + len(KINDS):].tolist()
        out = {"val_loss": loss[0] / max(n[0], 1.0)}
        out.update({f"val_loss_{kind}": loss[1 + i] / n[1 + i] for i, kind in enumerate(KINDS) if n[1 + i]})
        if any(self._metric_samples.packs):
            events = self._val_event_metrics()
            if events is None:
                return None
            out.update(events)
        return out

    @torch.no_grad()
    def _val_event_metrics(self) -> dict[str, float] | None:
        """The event metrics of the ``val_metrics_samples`` subset with the sharded model in place:
        sample i is scored on rank i % world (one forward per sample, ``clinical.event_scoring``),
        every rank runs as many forwards (FSDP's all-gathers stay matched), the scores are gathered."""
        started = time.perf_counter()
        size, packs = self._log_cfg.batch_size_val or self._batch_size, self._metric_samples.packs
        mine = range(self._rank, len(packs), self._world)
        forwards = max(-(-sum(len(packs[i]) for i in range(r, len(packs), self._world)) // size)
                       for r in range(self._world))
        self._model.eval()
        scores = score_samples(self._head, [packs[i] for i in mine], self._tokenizer.pad_id, self._device, size,
                               forwards=forwards, filler=next(p for sample in packs for p in sample),
                               stop=lambda: self._interim.poll("event scoring"))
        self._model.train()
        if scores is None:  # a stop signal
            return None
        parts = [None] * self._world
        dist.all_gather_object(parts, dict(zip(mine, scores)))
        by_sample = {i: s for part in parts for i, s in part.items()}
        tasks = [t for sample in self._metric_samples.tasks for t in sample]
        probs = [softmax(s) for i in range(len(packs)) for s in by_sample[i]]
        return {**event_summary(tasks, probs), "val_metrics_seconds": time.perf_counter() - started}

    # ---------------------------------------------------------------- loop
    def train(self) -> None:
        p = self._progress
        bar = tqdm(total=p.global_step + self._steps_left(p), initial=p.global_step, desc="training", unit="step",
                   disable=not self._is_rank_zero, dynamic_ncols=True)
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        if self._profiler is not None:
            self._profiler.start()
        try:
            # resumed after a signal cut this step's validation short: that validation first
            stopped = p.validation_pending and self._validate_or_stop()
            stopped = stopped or self._train_epochs(bar)
        finally:
            bar.close()
            if self._profiler is not None:
                self._profiler.stop()
                self._profiler = None
        if stopped or (self._val_ds is not None and self._validated_step != p.global_step and self._validate_or_stop()):
            return
        self.save_final()

    def _validate_or_stop(self) -> bool:
        """Validation outside the step loop (a resumed step's pending one, the final one): True when
        a signal stopped it, after saving the step (with its validation pending)."""
        self._run_validation()
        if self._interim.stop_requested:
            self._interim.save(self._progress.global_step)
        return self._interim.stop_requested

    def _train_epochs(self, bar) -> bool:
        """The steps left, epoch by epoch; True when a signal stopped training (after saving)."""
        p = self._progress
        window = {"tokens": 0.0, "label_tokens": 0.0, "seq_len": 0.0, "rank_balance": 0.0, "steps": 0,
                  "t0": time.perf_counter()}
        first_step_logged = False
        while p.epoch < self._train_cfg.epochs:
            self._sampler.set_epoch(p.epoch, start_sample=p.samples_in_epoch)
            batches = iter(self._train_loader)
            for _ in range(self._steps_left_in_epoch(p)):
                started = time.perf_counter()
                stats = self._train_step([next(batches) for _ in range(self._accum)])
                p.advance(stats["tokens"], self._global_batch)
                if self._profiler is not None:
                    self._profiler.step()
                if not first_step_logged:
                    self._log_first_step(started)
                    first_step_logged = True
                bar.update(1)
                for k in ("tokens", "label_tokens", "seq_len", "rank_balance"):
                    window[k] += stats[k]
                window["steps"] += 1
                if p.global_step % self._log_cfg.log_every_n_steps == 0:
                    values = self._read_step(stats)
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                    self._log_metrics(values, window)
                if self._validation_due(p.global_step):
                    self._run_validation()
                started = time.perf_counter()
                if self._interim.save(p.global_step):
                    self._log({"checkpoint_blocked_seconds": time.perf_counter() - started})
                if self._interim.stop_requested:
                    return True
            p.next_epoch()
        return False

    def _steps_left_in_epoch(self, p: Progress) -> int:
        """Up to ``max_steps_per_epoch`` steps an epoch, while a whole global batch of the epoch's
        samples is left (after a resume with another global batch the position need not be a
        multiple of it)."""
        by_samples = (len(self._train_ds) - p.samples_in_epoch) // self._global_batch
        return max(0, min(self._steps_per_epoch - p.step_in_epoch, by_samples))

    def _steps_left(self, p: Progress) -> int:
        return self._steps_left_in_epoch(p) + max(0, self._train_cfg.epochs - p.epoch - 1) * self._steps_per_epoch

    def _validation_due(self, step: int) -> bool:
        return self._val_ds is not None and bool(self._log_cfg.run_val_every_n_steps) and step % self._log_cfg.run_val_every_n_steps == 0

    def _log(self, payload: dict) -> None:
        if self._metric_logger is not None:
            self._metric_logger.log_dict(payload, step=self._progress.global_step)

    def _log_first_step(self, started: float) -> None:
        """Once per process: how long the first step took (torch.compile compiles in it)."""
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        seconds = time.perf_counter() - started
        if self._is_rank_zero:
            what = "includes torch.compile" if self._train_cfg.compile else "no compile"
            log.info("first step: %.1f s (%s)", seconds, what)
        self._log({"first_step_seconds": seconds})

    def _log_metrics(self, stats: dict, window: dict) -> None:
        elapsed = time.perf_counter() - window["t0"]
        per_device = window["tokens"] / self._world / elapsed
        payload = {
            "loss": stats["loss"],
            "lr": self._optimizer.param_groups[0]["lr"],
            "tokens_per_second_per_device": per_device,
            "label_tokens_per_second_per_device": window["label_tokens"] / self._world / elapsed,
            "tokens_seen": self._progress.tokens_seen,
            "rank_balance": window["rank_balance"] / window["steps"],
        }
        if "grad_norm" in stats:
            payload["grad_norm"] = stats["grad_norm"]
        if self._peak_tflops is not None:
            payload["mfu"] = mfu(per_device, self._flops_per_token(window["seq_len"] / window["steps"]),
                                 self._peak_tflops)
        if self._device.type == "cuda":
            if self._log_cfg.log_peak_memory_stats:
                payload["peak_memory_alloc_gib"] = torch.cuda.max_memory_allocated(self._device) / 2**30
                payload["peak_memory_reserved_gib"] = torch.cuda.max_memory_reserved(self._device) / 2**30
        self._log(payload)
        window.update(tokens=0.0, label_tokens=0.0, seq_len=0.0, rank_balance=0.0, steps=0, t0=time.perf_counter())

    def save_final(self) -> None:
        """Consolidated Hugging Face checkpoint of the last epoch in ``${output_dir}/epoch_N/``, written
        by rank 0, its ``COMPLETE`` marker last. A stop signal during it is only noted: stopping would
        lose the finished run, finishing it is the fastest way out (docs/reliability.md, "Signals")."""
        self._interim.wait()
        state = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        if self._is_rank_zero:
            self._hf_checkpointer.save_checkpoint({training.MODEL_KEY: state}, epoch=self._train_cfg.epochs - 1)
            folder = self._final_folder()
            write_serving_files(folder, self._cfg.tokenizer.path, self._tokenizer, *trained_with(self._settings),
                                self._vocab_size)
            # last: the folder is whole (a requeue of this run then has nothing to do, see finished())
            with open(os.path.join(folder, COMPLETE_MARKER), "w") as f:
                f.write(f"{self._interim.run_id}\n{self._progress.global_step}\n")
            log.info("final checkpoint: %s (serves with the training prompt: tokenizer.json, chat template, "
                     "generation_config.json)", folder)
        dist.barrier()

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT) after saving: the process exits 130."""
        return self._interim is not None and self._interim.stop_signal == "SIGINT"

    def cleanup(self) -> None:
        if self._interim is not None:
            self._interim.close()
        if self._lock is not None:
            self._lock.release()
        if self._metric_logger is not None:
            self._metric_logger.close()
        dist.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s gdt_tune: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    recipe = None
    # wandb records the command line: an inline patient id list given as an override must not reach it
    sys.argv = [a.split("=", 1)[0] + "=<redacted>" if a.split("=", 1)[0].endswith("patient_ids") and "=" in a else a
                for a in sys.argv]
    watch_launcher()
    try:
        recipe = FullFinetuneRecipe(cfg)
        if recipe._is_rank_zero:
            log.info("config:\n%s", OmegaConf.to_yaml(loggable_config(cfg)))
        recipe.setup()
        if recipe.finished:  # a requeue of a finished run
            return
        recipe.train()
        if recipe.interrupted:
            raise SystemExit(130)
    except (ValueError, SaveFailed) as e:  # bad config or data, a failed save: one line with the fix
        report_error(f"error: {one_line(e)}")
        raise SystemExit(1) from None
    except FailedElsewhere:  # another rank failed and printed why
        raise SystemExit(1) from None
    finally:
        if recipe is not None and dist.is_initialized():
            recipe.cleanup()
        # Free the model, its DTensors and their process groups now, while the interpreter is whole
        # (at interpreter shutdown their C++ destructors can abort: "terminate called without an
        # active exception").
        del recipe
        gc.collect()


def main() -> None:
    try:
        sys.exit(recipe_main())
    except KeyboardInterrupt:  # Ctrl-C before training (during training it saves and stops)
        print("error: interrupted (Ctrl-C) before training started; nothing was saved", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
