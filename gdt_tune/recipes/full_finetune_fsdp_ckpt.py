"""Full fine-tune with FSDP2 on CPU (gloo) or CUDA (NCCL), interim sharded checkpoints and exact
resume. Launch::

    tune run --nproc_per_node 8 gdt_tune/recipes/full_finetune_fsdp_ckpt.py \\
        --config configs/llama3_1_8b_gdt_full.yaml key=value ...

Config keys follow torchtune's ``full_finetune_distributed``; ``gdt_tune.training.config`` types
and documents them, and rejects unknown or contradictory ones at start. The recipe builds things and
runs the loop; what a row holds (``training.batches``), validation (``training.validator``),
checkpoints (``training.checkpointing``), stop signals (``training.stop_signals``) and the logged
throughput (``training.step_metrics``) each live in their own module.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import os
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor
from torchtune import config, training
from tqdm import tqdm

from gdt_tune.data.layout import Layout, trained_with
from gdt_tune.datasets import PatientDataset, dropped_by_cap, refuse_shared_patients
from gdt_tune.runtime.coordination import (
    FailedElsewhere,
    Heartbeats,
    collective_failure,
    init_distributed,
    node_first,
    rank_zero_first,
    report_error,
    watch_launcher,
)
from gdt_tune.runtime.errors import OneLineError, one_line
from gdt_tune.runtime.redact import loggable_config, redacted_argv
from gdt_tune.runtime.torch_env import CollectEvery, compile_backend, prefer_expandable_segments, torch_dtype
from gdt_tune.trained.prompting import tokenizer_from_config
from gdt_tune.trained.serving import check_serving, write_serving_files
from gdt_tune.training import float8
from gdt_tune.training.activation_checkpointing import apply_activation_checkpointing
from gdt_tune.training.batches import Batch, Batches, RowPlan, global_counts
from gdt_tune.training.checkpointing import CheckpointManager, Progress
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
from gdt_tune.training.metric_log import MetricLog
from gdt_tune.training.mfu import decoder_flops_per_token, device_peak_tflops
from gdt_tune.training.model_shapes import meta_model, state_bytes
from gdt_tune.training.prefix_trees import prefix_trees, sharing_line
from gdt_tune.training.profiling import step_profiler
from gdt_tune.training.resume import ROWS_PLAIN, ResumePlan, dataset_settings, lr_schedule, run_contract
from gdt_tune.training.run_dir import OutputDirLock, finished_run, take_output_dir
from gdt_tune.training.save_failures import SaveFailed, final_save_failed
from gdt_tune.training.step_dirs import final_dir, write_marker
from gdt_tune.training.step_metrics import StepMetrics
from gdt_tune.training.stop_signals import StopSignals
from gdt_tune.training.validator import Validator

log = logging.getLogger("gdt_tune")
#: the default group's timeout while rank 0 writes epoch_N and the others wait (gloo's default)
FINAL_SAVE_TIMEOUT = dt.timedelta(minutes=30)


class FullFinetuneRecipe:
    """One FSDP2 full fine-tune: ``setup()``, ``train()``, ``cleanup()``."""

    def __init__(self, cfg: DictConfig) -> None:
        rc = parse(cfg, torch.cuda.is_available())
        check_components(cfg)
        check_paths(cfg)
        self._cfg = cfg
        self._train_cfg, self._data_cfg, self._ckpt_cfg = rc.training, rc.data, rc.checkpoints
        self._log_cfg, self._val_cfg = rc.logging, rc.validation
        self._device, self._dtype = torch.device(rc.training.device), torch_dtype(rc.training.dtype)
        if self._device.type == "cuda":
            prefer_expandable_segments()  # before the first CUDA allocation
        self._world, self._rank, local_rank = init_distributed(self._device.type)
        if self._device.type == "cuda":
            self._device = torch.device("cuda", local_rank)
        self._is_rank_zero = self._rank == 0
        if rc.training.float8 and (problem := float8.float8_problem(self._device)):
            raise ValueError(f"config key 'float8': {problem}; set float8=false")
        self._batch_size, self._accum = rc.training.batch_size, rc.training.gradient_accumulation_steps
        self._row_multiple = 16 if rc.training.float8 else 1  # float8's matmuls need multiples of 16 tokens
        self._collective_timeout = dt.timedelta(minutes=rc.training.collective_timeout_minutes)
        self._seed = training.set_seed(seed=rc.training.seed)
        # where the last epoch's Hugging Face checkpoint goes (the checkpointer's output_dir, by default the run's)
        self._final_folder = final_dir(cfg.checkpointer.get("output_dir", self._ckpt_cfg.output_dir),
                                       rc.training.epochs - 1)
        # built by setup(), in this order
        self._tokenizer = self._train_ds = self._settings = None
        self._signals: StopSignals | None = None  # SIGTERM / Ctrl-C / SIGHUP, agreed on by every rank
        self._batches: Batches | None = None  # this rank's micro-batches, epoch by epoch
        self._validator: Validator | None = None  # None without dataset_val
        self._hf_checkpointer = None  # torchtune's FullModelHFCheckpointer: base weights in, epoch_N out
        self._lock: OutputDirLock | None = None  # rank 0's hold on output_dir
        self._metric_logger = None
        self._model = self._optimizer = self._lr_scheduler = None
        self._head: LossOnlyHead | None = None  # the model as the loss sees it: labelled positions only
        self._metrics: StepMetrics | None = None
        self._progress: Progress | None = None
        self._checkpoints: CheckpointManager | None = None  # step_N folders: save, prune, resume
        self.already_trained = False  # set by setup(): a requeue of a run whose final checkpoint is written

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        cfg, out = self._cfg, self._ckpt_cfg.output_dir
        self._signals = StopSignals(dt.timedelta(minutes=self._ckpt_cfg.checkpoint_timeout_minutes))
        # Everything is checked before anything is written to output_dir: a bad config or bad data
        # leaves an earlier run's folder as it was. Datasets before the model: bad data fails in
        # seconds, not after loading 16 GB of weights.
        self._tokenizer = tokenizer_from_config(cfg.tokenizer)
        self._train_ds = config.instantiate(cfg.dataset, self._tokenizer)
        self._settings = dataset_settings(self._train_ds, cfg.dataset)
        if self._ckpt_cfg.resume_from_checkpoint is True and (done := finished_run(out, self._final_folder)):
            if self._is_rank_zero:
                log.info("run %s has finished: %s is complete after step %s; nothing to do (to train further, start "
                         "a new run from it: checkpointer.checkpoint_dir=%s)", done.run_id, self._final_folder,
                         done.step, self._final_folder)
            self.already_trained = True
            return
        # The checkpoint (its files only): a resumed run with seed=null takes the saved seed. Only
        # this output_dir's run is resumed (run.json).
        plan = ResumePlan.find(out, self._ckpt_cfg.resume_from_checkpoint, self._rank)
        if plan.seed is not None and self._train_cfg.seed is None:
            self._seed = training.set_seed(seed=plan.seed)
        self._batches = self._setup_batches()
        total_steps = sum(self._steps_in_epoch(e) for e in range(self._train_cfg.epochs))
        if total_steps == 0:
            dropped = dropped_by_cap(self._train_ds)
            why = f" ({dropped} dropped by the length cap: raise dataset.max_seq_len)" if dropped else ""
            raise ValueError(
                f"dataset: {len(self._train_ds)} samples{why} make no optimizer step with batch_size={self._batch_size} x "
                f"{self._world} ranks x gradient_accumulation_steps={self._accum}; lower them or add data")
        model = meta_model(cfg.model, self._dtype)  # shapes only: no 16 GB read to find a typo
        self._validator = self._setup_validator(model.max_seq_len)
        d = self._data_cfg
        plan = plan.checked(run_contract(
            seed=self._seed, shuffle=d.shuffle, dataset=self._train_ds, settings=self._settings,
            world_size=self._world, accumulation=self._accum, batch_size=self._batch_size,
            lr=float(cfg.optimizer.get("lr", 0.0)), save_every=self._ckpt_cfg.save_every_n_steps,
            schedule=lr_schedule(cfg.lr_scheduler if has_component(cfg, "lr_scheduler") else None, total_steps),
            balanced_order=(f"balance_group={d.balance_group}, balance_window={d.balance_window}"
                            if d.balanced_steps else "off"),
            rows=(f"packing, pack_window={d.pack_window}{', share_prefixes' if d.share_prefixes else ''}" if d.packing
                  else ROWS_PLAIN)))
        self._hf_checkpointer = config.instantiate(cfg.checkpointer)
        hf_shapes = tune_shapes(self._hf_checkpointer) if plan.path is None else None
        if hf_shapes is not None:  # the weights' shapes from their headers
            check_weights_fit(hf_shapes, model, cfg.checkpointer.checkpoint_dir)
        try:  # a week-long run must not end with weights but no serving files
            check_serving(self._tokenizer, model.tok_embeddings.num_embeddings)
        except ValueError as e:
            raise ValueError(f"config key 'tokenizer': the final checkpoint could not be served: {e}") from None
        # Now this run takes output_dir: the lock, then the run identity (or a refusal).
        self._lock = OutputDirLock(out) if self._is_rank_zero else None
        identity = rank_zero_first(partial(take_output_dir, out, self._lock, plan.path,
                                           overwrite=self._ckpt_cfg.overwrite_output_dir,
                                           config_text=OmegaConf.to_yaml(loggable_config(cfg))))
        if self._is_rank_zero and has_component(cfg, "metric_logger"):
            self._metric_logger = MetricLog(config.instantiate(cfg.metric_logger),
                                            cfg.metric_logger.get("log_dir") or cfg.metric_logger.get("dir") or out)
            # wandb: the resolved config as its config and as a file (patient id lists redacted)
            self._metric_logger.log_config(loggable_config(cfg))
        self._model = self._setup_model(model, from_hf=plan.path is None, hf_shapes=hf_shapes)
        self._optimizer = config.instantiate(cfg.optimizer, self._model.parameters())
        self._lr_scheduler = (config.instantiate(cfg.lr_scheduler, self._optimizer, num_training_steps=total_steps)
                              if has_component(cfg, "lr_scheduler") else None)
        self._head = LossOnlyHead(self._model, config.instantiate(cfg.loss).num_output_chunks,
                                  compile=self._train_cfg.compile)
        peak = device_peak_tflops(self._device, self._log_cfg.mfu_peak_tflops, warn=self._is_rank_zero)
        self._metrics = StepMetrics(self._world, decoder_flops_per_token(model), peak, self._device,
                                    self._log_cfg.log_peak_memory_stats, self._batches.plan.row_length)
        if self._validator is not None:
            self._validator.record_scored_samples(out)
        self._progress = Progress(seed=self._seed, world_size=self._world)
        self._checkpoints = CheckpointManager.from_config(
            self._ckpt_cfg, model=self._model, optimizer=self._optimizer, lr_scheduler=self._lr_scheduler,
            progress=self._progress, signals=self._signals.listen(), rank=self._rank, contract=plan.contract,
            run_id=identity["run_id"])
        self._checkpoints.load(plan)
        p = self._progress
        if self._validator is not None:
            self._validator.resumed(p.global_step, p.validation_pending)
        self._checkpoints.refuse_foreign_steps(p.global_step + 1, total_steps)

    def _setup_batches(self) -> Batches:
        """The training samples as rows (``training.batches``), in this run's order."""
        d, ds = self._data_cfg, self._train_ds
        if d.balanced_steps and not isinstance(ds, PatientDataset):  # packing: RowPlan.for_dataset checks it
            raise ValueError("config key 'balanced_steps': needs a dataset that knows its sample lengths "
                             "(gdt_tune.datasets.cgdb_instruct_dataset); set balanced_steps=false")
        global_batch = self._batch_size * self._world * self._accum
        group = d.balance_group or global_batch
        if d.balanced_steps and self._is_rank_zero:
            if d.balance_group is None:
                log.info("balanced_steps: balance_group=%d, the global batch (batch_size x ranks x "
                         "gradient_accumulation_steps)", group)
            if group % (self._batch_size * self._world):
                log.warning("balanced_steps: balance_group=%d is not a multiple of batch_size x ranks = %d, so a "
                            "micro-batch spans two groups of different lengths; set balance_group to the global "
                            "batch (%d)", group, self._batch_size * self._world, global_batch)
        plan = RowPlan.for_dataset(ds, "dataset", packing=d.packing, window=d.pack_window, multiple=self._row_multiple,
                                   trees=self._prefix_trees(ds))
        return Batches(ds, plan, batch_size=self._batch_size, rank=self._rank, world_size=self._world,
                       accumulation=self._accum, seed=self._seed, shuffle=d.shuffle, pad_id=self._tokenizer.pad_id,
                       num_workers=d.num_workers, pin_memory=self._device.type == "cuda",
                       lengths=ds.lengths() if d.balanced_steps else None, balance_group=group,
                       balance_window=d.balance_window)

    def _prefix_trees(self, ds):
        """With ``share_prefixes``: which samples share a trie (one pass over the tokens, cached; each
        node's first rank makes it)."""
        if not self._data_cfg.share_prefixes:
            return None
        if not isinstance(ds, PatientDataset):
            raise ValueError("config key 'share_prefixes': needs gdt_tune.datasets.cgdb_instruct_dataset (it groups "
                             "the samples by meta.patientid); set share_prefixes=false")
        return node_first(lambda build: prefix_trees(ds, build=build, show_progress=self._is_rank_zero))

    def _setup_validator(self, model_max_seq_len: int) -> Validator | None:
        """``dataset_val`` and its checks; the scored samples are read now, before the weights load."""
        cfg = self._cfg
        k = self._val_cfg.val_metrics_samples
        if not has_component(cfg, "dataset_val"):
            if k and self._is_rank_zero:
                log.warning("val_metrics_samples=%d: no dataset_val, so no validation and no event metrics", k)
            return None
        val_ds = config.instantiate(cfg.dataset_val, self._tokenizer)
        if len(val_ds) == 0:
            raise ValueError(f"dataset_val: no samples ({dropped_by_cap(val_ds)} dropped by the length cap); raise "
                             "dataset_val.max_seq_len, fix dataset_val.data_files, or set dataset_val=null")
        refuse_shared_patients(self._train_ds, val_ds, warn=self._is_rank_zero)
        layout = Layout.build(self._tokenizer, trained_with(self._settings)[0])
        plan = RowPlan.for_dataset(val_ds, "dataset_val", packing=self._data_cfg.packing,
                                   window=self._data_cfg.pack_window, multiple=self._row_multiple,
                                   trees=self._prefix_trees(val_ds))
        return Validator(self._val_cfg, val_ds, plan, tokenizer=self._tokenizer,
                         layout=layout, signals=self._signals, batch_size=self._batch_size, seed=self._seed,
                         max_seq_len=model_max_seq_len, rank=self._rank, world_size=self._world, device=self._device)

    def _setup_model(self, model: torch.nn.Module, from_hf: bool, hf_shapes) -> torch.nn.Module:
        """Shard the meta-device ``model`` with FSDP2 (float8, activation checkpointing and compile
        applied first), then fill the shards from the HF checkpoint (``from_hf``), or leave them empty
        for an interim checkpoint to fill (resume: the HF weights are not read, only their file layout,
        which the final save needs)."""
        t = self._train_cfg
        if t.float8:
            float8.convert_to_float8(model)
        if t.enable_activation_checkpointing:
            apply_activation_checkpointing(model, t.ac_mode or "full", t.ac_option)
        if t.compile:  # each layer, its checkpointing included (as torchtitan)
            for layer in model.layers:
                layer.compile(backend=compile_backend())
        training.shard_model(
            model, [partial(training.get_shard_conditions, names_to_match=list(t.custom_sharded_layers or []))],
            cpu_offload=t.fsdp_cpu_offload, reshard_after_forward=t.fsdp_reshard_after_forward)
        if from_hf:  # rank 0 reads the weights; the loader scatters each rank's shards from it
            state, read = weights_for_rank(self._hf_checkpointer, self._rank, hf_shapes, self._dtype, self._device)
            if self._is_rank_zero:
                log.info("weights: read %.1f MB of HF weights on rank 0 only (%s)", read / 2**20,
                         "the other ranks' shards are scattered from it" if hf_shapes is not None
                         else "and on every rank: shapes not known from the file headers")
        else:
            prepare_for_save(self._hf_checkpointer)
            model.to_empty(device=self._device)
        init_rope_buffers(model, self._device, self._dtype)
        if from_hf:
            if not isinstance(state, Placeholders):
                check_weights_fit({k: tuple(v.shape) for k, v in state.items()}, model,
                                  self._cfg.checkpointer.checkpoint_dir)
            training.load_from_full_model_state_dict(model, state, self._device, strict=True, cpu_offload=t.fsdp_cpu_offload)
            del state
        training.validate_no_params_on_meta_device(model)
        if self._is_rank_zero:
            log.info("model: %.1fM parameters, dtype %s, %d ranks on %s",
                     sum(p.numel() for p in model.parameters()) / 1e6, self._dtype, self._world, self._device.type)
        return model

    # ---------------------------------------------------------------- loop
    def train(self) -> None:
        p = self._progress
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)
        beats = Heartbeats(self._rank, self._world)  # names a rank that stops answering
        try:
            with (step_profiler(self._cfg.get("profiler"), self._ckpt_cfg.output_dir, self._device,
                                self._is_rank_zero) as profiler, CollectEvery(50) as collector,
                  tqdm(total=p.global_step + self._steps_left(p), initial=p.global_step, desc="training",
                       unit="step", disable=not self._is_rank_zero, dynamic_ncols=True) as bar):
                # resumed after a signal cut this step's validation short: that validation first
                if p.validation_pending and not self._after_step(validate=True):
                    return
                if not self._train_epochs(bar, profiler, collector):
                    return
            if self._validator is not None and self._validator.should_validate(p.global_step, last=True):
                if not self._after_step(validate=True):
                    return
        except RuntimeError as e:  # a collective that timed out: one line naming the silent rank
            raise collective_failure(e, beats, self._collective_timeout) from None
        finally:
            beats.close()
        # the final save: rank 0 writes 16 GB while the others wait at the barrier (a slow file system)
        dist.distributed_c10d._set_pg_timeout(FINAL_SAVE_TIMEOUT)
        self.save_final()

    def _train_epochs(self, bar, profiler, collector: CollectEvery) -> bool:
        """The steps left, epoch by epoch. False when a stop signal ended the run (after saving)."""
        p = self._progress
        first = True
        while p.epoch < self._train_cfg.epochs:
            batches = iter(self._batches.loader(p.epoch, p.samples_in_epoch))
            for _ in range(self._steps_left_in_epoch(p)):
                started = time.perf_counter()
                counts, loss_sum, grad_norm = self._train_step([next(batches) for _ in range(self._accum)])
                p.advance(counts.tokens, counts.samples, counts.sample_tokens)
                self._metrics.add(counts)
                profiler.step()
                collector.step(p.global_step)
                if first:  # torch.compile compiles in the first step; from now on a silent rank ends the job
                    dist.distributed_c10d._set_pg_timeout(self._collective_timeout)
                    self._signals.set_timeout(self._collective_timeout)
                    seconds = self._metrics.first_step(started)
                    if self._is_rank_zero:
                        log.info("first step: %.1f s (%s)", seconds,
                                 "includes torch.compile" if self._train_cfg.compile else "no compile")
                    self._log({"first_step_seconds": seconds})
                    first = False
                bar.update(1)
                if p.global_step % self._log_cfg.log_every_n_steps == 0:
                    loss = _mean_loss(loss_sum, counts.labels)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    self._log(self._metrics.payload(loss=loss, lr=self._optimizer.param_groups[0]["lr"],
                                                    tokens_seen=p.tokens_seen, sample_tokens_seen=p.sample_tokens_seen,
                                                    grad_norm=None if grad_norm is None else float(grad_norm)))
                validate = self._validator is not None and self._validator.should_validate(p.global_step)
                if not self._after_step(validate):
                    return False
            p.next_epoch()
        return True

    def _train_step(self, batches: list[Batch]):
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches: (the step's
        ``StepCounts``, its summed loss, its grad norm). The loss is normalised by the label tokens
        of all micro-batches on all ranks, so the gradient equals that of the mean over the step's
        labels (FSDP averages gradients over ranks, hence x world). Loss and grad norm stay on the
        device: they are read only when logged, so steps queue up without host syncs."""
        counts = global_counts(batches, self._rank, self._world, self._metrics.flops_per_token)
        scale = self._world / max(counts.labels, 1.0)
        moved = [b.to(self._device) for b in batches]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self._device)
        for tokens, labels, kwargs in moved:
            ce = self._head(tokens, labels, **kwargs)
            (ce * scale).backward()
            loss_sum += ce.detach().double()
        grad_norm = None
        if self._train_cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=float(self._train_cfg.clip_grad_norm))
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        if self._train_cfg.float8:
            float8.after_optimizer_step(self._model)
        if self._lr_scheduler is not None:
            self._lr_scheduler.step()
        return counts, loss_sum, grad_norm

    def _after_step(self, validate: bool) -> bool:
        """The end of a step: its validation (``validate``), then the checkpoint manager's save (on the
        interval, or on a stop signal seen by any rank). False when a stop signal ends the run: the step
        is saved, and a validation the signal cut short is pending (run first on resume)."""
        p = self._progress
        if validate:
            values = self._validator.validate(self._head, p.global_step)
            p.validation_pending = values is None
            if values is None and self._is_rank_zero:
                log.warning("validation of step %d stopped by %s; the resumed run validates step %d first",
                            p.global_step, self._signals.name, p.global_step)
            elif values is not None:
                self._log(values)
        started = time.perf_counter()
        if self._checkpoints.save(p.global_step):
            self._log({"checkpoint_blocked_seconds": time.perf_counter() - started})
        return not self._signals.requested

    def _steps_in_epoch(self, epoch: int) -> int:
        """Optimizer steps of ``epoch``: whole global batches of rows, at most ``max_steps_per_epoch``."""
        steps = self._batches.steps_in_epoch(epoch)
        cap = self._train_cfg.max_steps_per_epoch
        return steps if cap is None else min(steps, cap)

    def _steps_left_in_epoch(self, p: Progress) -> int:
        """The epoch's steps left; after a resume with another global batch the position need not be a
        multiple of it, so also the whole global batches left from the position."""
        return max(0, min(self._steps_in_epoch(p.epoch) - p.step_in_epoch,
                          self._batches.steps_in_epoch(p.epoch, p.samples_in_epoch)))

    def _steps_left(self, p: Progress) -> int:
        return self._steps_left_in_epoch(p) + sum(self._steps_in_epoch(e) for e in range(p.epoch + 1, self._train_cfg.epochs))

    def _log(self, payload: dict) -> None:
        if self._metric_logger is not None:
            self._metric_logger.log_dict(payload, step=self._progress.global_step)

    def save_final(self) -> None:
        """Consolidated Hugging Face checkpoint of the last epoch in ``${output_dir}/epoch_N/``, written
        by rank 0, its marker last. A stop signal during it is only noted: stopping would lose the
        finished run, finishing it is the fastest way out (docs/reliability.md, "Signals")."""
        self._checkpoints.wait()
        state = training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)
        if self._is_rank_zero:
            try:
                self._hf_checkpointer.save_checkpoint({training.MODEL_KEY: state}, epoch=self._train_cfg.epochs - 1)
                write_serving_files(self._final_folder, self._cfg.tokenizer.path, self._tokenizer,
                                    *trained_with(self._settings), self._model.tok_embeddings.num_embeddings)
                # last: the folder is whole (a requeue of this run then has nothing to do)
                write_marker(self._final_folder, self._checkpoints.run_id, self._progress.global_step)
            except Exception as e:
                raise final_save_failed(self._final_folder, e, state_bytes(self._model), self._ckpt_cfg.output_dir,
                                        self._checkpoints.run_id) from None
            log.info("final checkpoint: %s (serves with the training prompt: tokenizer.json, chat template, "
                     "generation_config.json)", self._final_folder)
            if self._data_cfg.share_prefixes:
                log.info("%s trained", sharing_line(self._progress.tokens_seen, self._progress.sample_tokens_seen))
        dist.barrier()

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT) after saving: the process exits 130."""
        return self._signals is not None and self._signals.name == "SIGINT"

    def cleanup(self) -> bool:
        """Close everything; False when an async save in flight failed (its line is printed)."""
        saved = True
        try:
            if self._checkpoints is not None:
                self._checkpoints.close()
        except SaveFailed as e:  # after the loop failed or stopped: the save's own line, not a traceback
            report_error(f"error: {one_line(e)}")
            saved = False
        if self._signals is not None:
            self._signals.close()
        if self._lock is not None:
            self._lock.release()
        if self._metric_logger is not None:
            self._metric_logger.close()
        dist.destroy_process_group()
        return saved


def _mean_loss(loss_sum: torch.Tensor, labels: float) -> float:
    """The step's loss per label token over all ranks (a host sync: every rank at the same step)."""
    total = loss_sum.clone()
    dist.all_reduce(total)
    return total.item() / max(labels, 1.0)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s gdt_tune: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    recipe = None
    sys.argv = redacted_argv(sys.argv)  # wandb records the command line
    watch_launcher()
    try:
        recipe = FullFinetuneRecipe(cfg)
        if recipe._is_rank_zero:
            log.info("config:\n%s", OmegaConf.to_yaml(loggable_config(cfg)))
        recipe.setup()
        if recipe.already_trained:  # a requeue of a finished run
            return
        recipe.train()
        if recipe.interrupted:
            raise SystemExit(130)
    except (ValueError, OneLineError) as e:  # bad config or data, a failed save: one line with the fix
        report_error(f"error: {one_line(e)}")
        raise SystemExit(1) from None
    except FailedElsewhere:  # another rank failed and printed why
        raise SystemExit(1) from None
    finally:
        failed = recipe is not None and dist.is_initialized() and not recipe.cleanup()
        # Free the model, its DTensors and their process groups now, while the interpreter is whole
        # (at interpreter shutdown their C++ destructors can abort: "terminate called without an
        # active exception").
        del recipe
        gc.collect()
        gc.freeze()  # what is left lives to the exit: the interpreter's last collections skip it (1.3 s a rank)
        if failed:
            raise SystemExit(1)  # noqa: B012 (the failed save's line is printed)


def main() -> None:
    try:
        sys.exit(recipe_main())
    except KeyboardInterrupt:  # Ctrl-C before training (during training it saves and stops)
        print("error: interrupted (Ctrl-C) before training started; nothing was saved", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
