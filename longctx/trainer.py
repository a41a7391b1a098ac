"""The training loop on the DeepSpeed engine: build → resume → step → log → checkpoint → final model.

Works under `deepspeed --num_gpus N --module longctx.cli train ...` (any ZeRO stage, GPU or CPU/gloo) and as a
plain single process (`longctx train ...`), where a 1-rank process group is set up here.

The loss of a step is the mean over every label token of the global batch: each micro batch contributes its sum
of token losses divided by the number of label tokens in the whole global batch (all ranks, all accumulation
steps), so sequences with padding or short documents weigh what their tokens weigh.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx import attention, checkpoint, parallel, tiling
from longctx.atomic import write_text_atomic
from longctx.config import MemoryConfig, RunConfig, save_config
from longctx.data import IGNORE_INDEX
from longctx.distributed import init_distributed
from longctx.ds_config import resolve_deepspeed_config
from longctx.errors import UserError
from longctx.feasibility import check_run
from longctx.model import build_model, count_parameters, load_hf_config, resolve_model_path

# Exit status of a run stopped by SIGTERM or SIGUSR1 after writing a complete checkpoint (EX_TEMPFAIL: "try
# again"): launch/slurm.sbatch requeues the job on it and tells it apart from a crash.
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the checkpoint of a preempted run is on disk; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)


class PreemptionFlag:
    """Notes SIGTERM/SIGUSR1 (SLURM's --signal, a preemption, a `kill`) instead of dying mid-step.

    The handler only sets a flag; the loop all-reduces it at every step boundary, so all ranks stop after the same
    step even when only some of them were signalled, and checkpoint that step together.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for signum in PREEMPTION_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._note)

    def _note(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self, device) -> bool:
        """Whether any rank got a signal so far (a collective: every rank calls it at the same step)."""
        flag = torch.tensor(0 if self.received is None else 1, device=device)
        parallel.all_reduce_(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def __enter__(self) -> PreemptionFlag:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


OOM_MESSAGE = (
    "out of memory at train.seq_len={seq_len}, train.micro_batch_size={micro}: the most effective knobs are "
    "deepspeed.config=ds_configs/stage3_offload.json (ZeRO-3 with CPU offload), a smaller train.micro_batch_size "
    "(with more gradient accumulation), model.activation_checkpointing=true, and "
    "parallel.sequence_parallel_size > 1 (sequence parallelism)"
)

# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def partitioned_loading(cfg: RunConfig, ds_config: dict[str, Any]):
    """Under ZeRO-3, let transformers load model.path inside deepspeed.zero.Init, so that each rank only ever
    holds its own shard of the weights (a 70B model never lands whole in one process's memory).

    Not for random-init models (model.init: demo, tests, benchmarks), which are small and built whole, because zero.Init
    draws the random weights in another order: built whole, they are the same weights with or without ZeRO-3. Not for
    a 4-bit base either: transformers never quantizes inside zero.Init, and refuses the `device_map` with which each
    rank quantizes straight onto its GPU while ZeRO-3 is announced; the engine partitions the 4-bit weights afterwards.
    """
    if not loads_partitioned(cfg, ds_config):
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_deepspeed_config = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()  # later single-rank loads (the final model on rank 0) must not partition
        del hf_deepspeed_config


def loads_partitioned(cfg: RunConfig, ds_config: dict[str, Any]) -> bool:
    """Whether model.path is loaded inside zero.Init (see `partitioned_loading`)."""
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3
    return zero3 and bool(cfg.model.path) and not cfg.quant.enabled


def lr_lambda(cfg: RunConfig):
    """Multiplier of train.lr at each optimizer step: linear warm-up, then constant or cosine decay."""
    train = cfg.train

    def multiplier(step: int) -> float:
        if step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        if train.schedule == "constant":
            return 1.0
        progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def load_train_dataset(cfg: RunConfig, hf_config, *, verify: bool = False):
    """data.train as a PackedDataset, refused unless its seq_len, vocabulary and tokenizer are the model's.

    verify: hash every shard file now (else each is hashed when first read)."""
    from data_prep.tokenizer import check_shards_tokenizer
    from longctx.data import PackedDataset

    if not cfg.data.train:
        raise UserError("data.train is not set: give the directory of shards written by `longctx prep pack`")
    dataset = PackedDataset(
        cfg.data.train,
        seq_len=cfg.train.seq_len,
        vocab_size=hf_config.vocab_size,
        isolate_documents=cfg.attention.isolate_documents,
    )
    check_shards_tokenizer(cfg.model.path, dataset.manifest, cfg.data.train)
    if verify:
        dataset.shards.verify(progress=True)
    return dataset


def shards_tokenizer(cfg: RunConfig, dataset):
    """The tokenizer saved with the final model: the model's own, else the one the shards were packed with."""
    from data_prep.tokenizer import model_tokenizer, packed_with

    return model_tokenizer(cfg.model.path) or packed_with(getattr(dataset, "manifest", {}))


def micro_batches(dataset, sampler, micro_batch_size: int):
    """Endless stream of (B, N) micro batches in the sampler's order.

    Indices are drawn only when a micro batch is built (no prefetch), so the sampler's state at a checkpoint is
    exactly what the finished steps consumed.
    """
    while True:
        indices: list[int] = []
        for index in sampler:
            indices.append(index)
            if len(indices) == micro_batch_size:
                items = [dataset[i] for i in indices]
                yield {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}
                indices = []
        # The sampler moved on to the next epoch by itself; a tail shorter than a micro batch is dropped.


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def token_loss_sum(engine, batch: dict[str, torch.Tensor], memory: MemoryConfig | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropies over the target tokens of a (sharded) micro batch (float32).

    batch: `parallel.shard_batch`'s {input_ids, position_ids, target_ids}, each (B, n), or a whole micro batch
    {input_ids, labels[, position_ids]}. memory.tiled_loss computes the logits and loss in chunks from the final
    hidden states; memory.offload_activations keeps what the forward saves for backward in host memory.
    """
    memory = memory or MemoryConfig()
    if "target_ids" not in batch:
        batch = parallel.shard_batch(batch, 1, 0)
    with tiling.offload_activations(memory.offload_activations):
        if not memory.tiled_loss:
            logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # (B, n, V)
            return F.cross_entropy(
                logits.float().flatten(0, 1), batch["target_ids"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        output = engine(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            logits_to_keep=torch.empty(0, dtype=torch.long, device=batch["input_ids"].device),  # no logits here
            output_hidden_states=-1,  # only the last: the final normed hidden states
        )
        lm_head = getattr(engine, "module", engine).get_output_embeddings()  # the DeepSpeed engine's model
        return tiling.tiled_loss_sum(lm_head, output.hidden_states[-1], batch["target_ids"], memory.loss_chunk_tokens)


@dataclass
class Run:
    """A built training run: the engine and everything `loop` steps, logs and checkpoints."""

    cfg: RunConfig
    engine: Any
    scheduler: Any
    dataset: Any
    sampler: Any
    ds_config: dict[str, Any]
    sp: parallel.SequenceParallel
    metrics: MetricsLog
    preemption: PreemptionFlag
    base: dict[str, Any]
    """`checkpoint.base_record`: saved with every checkpoint, which holds only what training changes."""
    step: int
    """The step training starts from (0, or the resumed checkpoint's)."""

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def train(cfg: RunConfig, *, dataset=None) -> dict[str, Any]:
    """Run cfg to train.max_steps (resuming when asked); return the summary. `dataset` replaces data.train."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_out_of_memory_as_user_error(cfg))
        # From the start: a signal while the model loads still ends in a checkpoint.
        preemption = stack.enter_context(PreemptionFlag())
        run = build(cfg, dataset, preemption)
        last_save = loop(run)
        return finish(run, last_save)


@contextlib.contextmanager
def _out_of_memory_as_user_error(cfg: RunConfig):
    try:
        yield
    except torch.OutOfMemoryError:
        raise UserError(OOM_MESSAGE.format(seq_len=cfg.train.seq_len, micro=cfg.train.micro_batch_size)) from None


@contextlib.contextmanager
def startup_stage(what: str, fix: str):
    """One line for an exception from inside a library (DeepSpeed, transformers, peft, bitsandbytes) while starting:
    the stage, what the library said, and what to change. The exception stays chained: --debug shows it."""
    try:
        yield
    except (UserError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        said = str(e).strip().splitlines()[0].strip() if str(e).strip() else "no message"
        raise UserError(f"{what} failed ({type(e).__name__}: {said}): {fix}") from e


def preflight(cfg: RunConfig) -> Path | None:
    """What only reading the run's inputs decides, before a process group, a model or a file exists: the config
    against the model's config.json, the model's weight files (present, not truncated), and the checkpoint to
    resume (complete, this run's, the same base). Returns that checkpoint, or None."""
    from longctx.tensor_files import check_model_weights

    check_run(cfg, load_hf_config(cfg))
    if cfg.model.path:
        check_model_weights(cfg.model.path)
    resume_from = checkpoint.find_resume_checkpoint(cfg)
    if resume_from is not None:
        checkpoint.check_resumable(resume_from, cfg)
        checkpoint.check_complete(resume_from, int(os.environ.get("WORLD_SIZE", "1")))
    return resume_from


def build(cfg: RunConfig, dataset, preemption: PreemptionFlag) -> Run:
    """Process group, DeepSpeed JSON, model, data, engine, and the checkpoint to resume from: everything but steps."""
    # Deprecations inside DeepSpeed's and peft's own calls, one per collective: nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing. is deprecated", category=FutureWarning)
    cfg = resolve_model_path(cfg)  # a Hub id: its snapshot in the HF cache, the directory every step below reads
    resume_from = preflight(cfg)
    if dataset is None:  # rank 0 hashes every shard file before anything is created; the others as they read
        dataset = load_train_dataset(cfg, load_hf_config(cfg), verify=int(os.environ.get("RANK", "0")) == 0)
    init_distributed()  # it names the accelerator before DeepSpeed is imported
    import deepspeed

    from longctx.data import ResumableDistributedSampler

    rank, world_size = dist.get_rank(), dist.get_world_size()
    ds_config = resolve_deepspeed_config(cfg, world_size)
    sp = parallel.init_sequence_parallel(cfg.parallel.sequence_parallel_size)
    micro, accum = ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]
    output_dir = Path(cfg.train.output_dir)

    torch.manual_seed(cfg.train.seed)
    with startup_stage("loading the model", "check model.path, model.dtype and quant.* (--debug shows where)"):
        with partitioned_loading(cfg, ds_config):
            model = build_model(cfg)
    base = checkpoint.base_record(cfg, model)
    parallel.enable_on_model(
        model,
        sp,
        micro_batch_size=micro,
        seq_len=cfg.train.seq_len,
        implementation=cfg.attention.implementation,
        mode=cfg.parallel.sequence_parallel_mode,
    )
    # The ranks of a sequence group read the same sequences: the sampler splits over data-parallel groups only.
    sampler = ResumableDistributedSampler(
        len(dataset), num_replicas=sp.data_parallel_size, rank=sp.data_parallel_rank, seed=cfg.train.seed
    )
    if len(sampler) < micro:
        raise UserError(
            f"the training data has {len(dataset)} sequences, fewer than train.micro_batch_size={micro} per rank "
            f"on {sp.data_parallel_size} data-parallel rank(s): pack more data or lower the micro batch size"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:  # torch AdamW runs everywhere; a JSON optimizer (e.g. CPU Adam) wins
        optimizer = torch.optim.AdamW(
            params, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas), weight_decay=cfg.train.weight_decay
        )
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    engine_fix = (
        f"check deepspeed.config={cfg.deepspeed.config} against the run (ZeRO-{stage}, model.dtype={cfg.model.dtype}, "
        "quant.type, lora.*); --debug shows where"
    )
    with startup_stage(f"building the ZeRO-{stage} engine (deepspeed.initialize)", engine_fix):
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
            config=ds_config,
            mpu=sp.mpu,
        )
    num_trainable, num_total = count_parameters(engine.module)

    step = 0
    if resume_from is not None:
        resume_fix = (
            "resume with the world size and longctx version that wrote it, or start over with train.resume=none"
        )
        with startup_stage(f"resuming from {resume_from}", resume_fix):
            state = checkpoint.load_checkpoint(engine, resume_from, trust_pickles=cfg.train.trust_checkpoint_pickles)
        sampler.load_state_dict(state["sampler"])
        step = state["step"]
    # Only now, with the model, the data, the engine and the resumed state in hand, does the run write anything.
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    metrics = MetricsLog(output_dir, rank, resumed_at=step, total_steps=cfg.train.max_steps)
    metrics.message(
        f"training {num_trainable:,} of {num_total:,} parameters on {world_size} rank(s): "
        f"global batch {ds_config['train_batch_size']} = {micro} × {accum} accumulation × {sp.data_parallel_size}, "
        f"seq_len {cfg.train.seq_len}"
        + (f" split over {sp.size} sequence-parallel ranks" if sp.size > 1 else "")
        + (f"; resumed from {resume_from} at step {step}" if resume_from else "")
    )
    return Run(cfg, engine, scheduler, dataset, sampler, ds_config, sp, metrics, preemption, base, step)


def dense_phase_start(cfg: RunConfig) -> int:
    """The first step (counting from 0) of the dense phase: the last round(dense_phase × max_steps) steps."""
    return cfg.train.max_steps - round(cfg.attention.dense_phase * cfg.train.max_steps)


def loop(run: Run) -> Path | None:
    """Steps from run.step to train.max_steps; returns the last checkpoint written (None if none was).

    Raises Preempted after checkpointing the step at which any rank got SIGTERM/SIGUSR1.
    """
    cfg, engine, sp = run.cfg, run.engine, run.sp
    device, accum = engine.device, run.ds_config["gradient_accumulation_steps"]
    grad_factor = parallel.gradient_sum_factor(run.ds_config, sp)
    batches = micro_batches(run.dataset, run.sampler, run.ds_config["train_micro_batch_size_per_gpu"])
    engine.train()
    step, last_save = run.step, None
    dense_from = dense_phase_start(cfg)
    start = time.perf_counter()
    while step < cfg.train.max_steps:
        step_start = time.perf_counter()
        if step == max(dense_from, run.step) and step < cfg.train.max_steps and cfg.attention.dense_phase:
            model = engine.module
            attention.set_dense_training(model.get_base_model() if hasattr(model, "get_base_model") else model, True)
            run.metrics.message(
                f"step {step + 1}: dense attention from here to step {cfg.train.max_steps} (attention.dense_phase="
                f"{cfg.attention.dense_phase})"
            )
        # Labels are shifted before the sequence is split; each rank keeps its chunk (the whole of it when sp.size=1).
        step_batches = [
            parallel.shard_batch({k: v.to(device) for k, v in next(batches).items()}, sp.size, sp.rank)
            for _ in range(accum)
        ]
        label_tokens = torch.stack([(b["target_ids"] != IGNORE_INDEX).sum() for b in step_batches]).sum()
        label_tokens = label_tokens.to(torch.float64)
        parallel.all_reduce_(label_tokens)  # host-device sync: the global token count weights every micro batch
        label_tokens.clamp_(min=1)  # a batch of padding only contributes zero loss, not NaN
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        lr = run.scheduler.get_last_lr()[0]
        for batch in step_batches:
            micro_loss_sum = token_loss_sum(engine, batch, cfg.memory)
            # DeepSpeed averages gradients over ranks (see parallel.gradient_sum_factor): this turns that into a sum.
            engine.backward(micro_loss_sum * grad_factor / label_tokens, scale_wrt_gas=False)
            engine.step()
            loss_sum += micro_loss_sum.detach()
        parallel.all_reduce_(loss_sum)
        step += 1
        grad_norm = engine.get_global_grad_norm()
        elapsed = time.perf_counter() - start
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            step_seconds = time.perf_counter() - step_start
            # Every rank holds a batch of the same shape: tokens processed, padding and prompts included.
            num_tokens = sum(b["input_ids"].numel() for b in step_batches) * dist.get_world_size()
            run.metrics.log(
                step=step,
                loss=(loss_sum / label_tokens).item(),  # host-device sync
                lr=lr,
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                tokens_per_s=num_tokens / step_seconds,
                supervised_tokens_per_s=label_tokens.item() / step_seconds,  # tokens the loss is computed on
                elapsed_s=elapsed,
                memory_gb=peak_memory_gb(),
            )
        scheduled_save = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == cfg.train.max_steps
        preempted = step < cfg.train.max_steps and run.preemption.any_rank(device)
        if scheduled_save or preempted:
            last_save = save(run, step)
        if preempted:
            received = run.preemption.received
            received = signal.Signals(received).name if received else "another rank's signal"
            run.metrics.message(
                f"preempted ({received}): checkpoint {last_save} holds step {step}; exiting with "
                f"{PREEMPTED_EXIT_CODE}, run again with train.resume=auto to continue"
            )
            dist.barrier()
            raise Preempted()
    return last_save


def finish(run: Run, last_save: Path | None) -> dict[str, Any]:
    """Rank 0 writes the final model; every rank returns the summary."""
    if last_save is None:  # resumed at max_steps: nothing left to train
        last_save = checkpoint.complete_checkpoints(run.cfg.train.output_dir)[-1]
    final_dir = run.output_dir / "final"
    if dist.get_rank() == 0:
        # Streamed tensor by tensor from the checkpoint and the base (bounded memory, any model size); the other
        # ranks are done and exit instead of waiting for it in a barrier that could time out.
        from longctx.merge import write_final_model

        run.metrics.message(f"writing the final model to {final_dir}")
        write_final_model(
            last_save,
            final_dir,
            tokenizer=shards_tokenizer(run.cfg, run.dataset),
            trust_remote_code=run.cfg.model.trust_remote_code,
        )
    return run.metrics.close(step=run.cfg.train.max_steps, checkpoint=str(last_save), final_model=str(final_dir))


def save(run: Run, step: int) -> Path:
    trainer_state = {"step": step, "sampler": run.sampler.state_dict()}
    path = checkpoint.save_checkpoint(run.engine, step, run.cfg, run.ds_config, trainer_state, run.base)
    if dist.get_rank() == 0:
        checkpoint.prune_checkpoints(run.cfg.train.output_dir, run.cfg.train.keep_last)
    return path


def peak_memory_gb() -> float:
    """Peak accelerator memory of this rank, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class MetricsLog:
    """Rank 0's step log: one dense printed line, a JSONL line and TensorBoard scalars per step; a tqdm bar."""

    def __init__(self, output_dir: Path, rank: int, resumed_at: int, total_steps: int | None = None):
        self.enabled = rank == 0
        self.last: dict[str, Any] = {}
        self.start_step = resumed_at
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.path = output_dir / "metrics.jsonl"
        _truncate_metrics(self.path, resumed_at)  # lines past the checkpoint belong to the interrupted run
        self.file = self.path.open("a")
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(initial=resumed_at, total=total_steps, unit="step", dynamic_ncols=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def log(self, **values: Any) -> None:
        self.last = values
        if not self.enabled:
            return
        v = values
        self.bar.write(
            f"step {v['step']:>6} | loss {v['loss']:.4f} | lr {v['lr']:.2e} | grad norm {v['grad_norm']:.3f} | "
            f"{v['tokens_per_s']:,.0f} tok/s ({v['supervised_tokens_per_s']:,.1f} supervised) | "
            f"{v['elapsed_s']:.1f}s | mem {v['memory_gb']:.2f} GB"
        )
        self.file.write(json.dumps(values) + "\n")
        self.file.flush()
        for key, value in values.items():
            if key != "step":
                self.tensorboard.add_scalar(f"train/{key}", value, v["step"])
        self.bar.update(v["step"] - self.bar.n)

    def close(self, **extra: Any) -> dict[str, Any]:
        summary = {**self.last, **extra}
        if self.enabled:
            self.bar.close()
            self.tensorboard.close()
            self.file.close()
            print(
                f"done: step {summary.get('step')} | final loss {summary.get('loss', float('nan')):.4f} | "
                f"{summary.get('supervised_tokens_per_s', 0.0):,.1f} supervised tok/s | "
                f"{summary.get('elapsed_s', 0.0):.1f}s | checkpoint {extra['checkpoint']} | "
                f"model {extra['final_model']}",
                flush=True,
            )
        return summary


def _truncate_metrics(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in kept))
